"""Vision-Flan Base (stage 1, recipe §4.4): LLaVA-1.5 tuned on all 187 Vision-Flan tasks.

Starts from the pretrained LLaVA-1.5 (projector trained on LCS-558K, LLM and CLIP untouched),
trains projector + LLM for one epoch (1,664,261 instances, global batch 128 -> 13,003 steps),
lr 2e-5, cosine with 3% warmup, tower frozen.

    python -m vflan_jax.convert import-hf --vision_tower clip-vit-large-patch14-336 \
        --llm vicuna-13b-v1.5 --projector llava-v1.5-mlp2x-336px-pretrain-vicuna-13b-v1.5/mm_projector.bin \
        --out ckpt/llava15-13b-pretrained
    python -m vflan_jax.train --config configs/vflan_stage1.py:size=13b,data_dir=/data/vision-flan \
        --config.init_from=ckpt/llava15-13b-pretrained --workdir /mnt/shared/runs/vflan/stage1-13b

data_dir holds vision_flan.json and images/ (the Vision-Flan/vision-flan release, shards unzipped).
Expected runtime: the paper trained on 8 A100s; LLaVA-1.5's 665K-example finetune took ~20 h on
8 A100-80G for 13B, so this 1.66M-example epoch is ~2 days there (recipe §4.2); see
docs/PERFORMANCE.md for our measured step times.
"""
from vflan_jax import recipes


def get_config(arg: str | None = None):
    a = recipes.parse_arg(arg, size="13b", data_dir="data/vision-flan")
    c = recipes.llava15_finetune(a["size"])
    c.optim.learning_rate = 2e-5
    c.global_batch_size = 128
    c.total_steps = recipes.steps(recipes.VISION_FLAN_INSTANCES, c.global_batch_size)   # 1 epoch
    c.data.sources.vflan = recipes.vision_flan_source(a["data_dir"])
    c.data.num_epochs = 1
    return c
