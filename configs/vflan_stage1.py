"""Vision-Flan Base (stage 1, docs/REFERENCE.md §4.4): LLaVA-1.5 tuned on all 187 Vision-Flan tasks.

Starts from the pretrained LLaVA-1.5 (projector trained on LCS-558K, LLM and CLIP untouched),
trains projector + LLM for one epoch (1,664,261 instances, global batch 128 -> 13,003 steps),
lr 2e-5, cosine with 3% warmup, tower frozen.

    python -m vflan_jax.convert import-hf --vision_tower clip-vit-large-patch14-336 \
        --llm vicuna-13b-v1.5 --projector llava-v1.5-mlp2x-336px-pretrain-vicuna-13b-v1.5/mm_projector.bin \
        --out ckpt/llava15-13b-pretrained
    python -m vflan_jax.train --config configs/vflan_stage1.py:size=13b,data_dir=/data/vision-flan \
        --config.init_from=ckpt/llava15-13b-pretrained --workdir /mnt/shared/runs/vflan/stage1-13b

data_dir holds vision_flan.json and images/ (the Vision-Flan/vision-flan release, shards unzipped),
or is a folder or bucket prepared from them once (every host then starts in seconds):
    python -m vflan_jax.data.prepare --data /data/vision-flan/vision_flan.json \
        --image_folder /data/vision-flan/images --out gs://BUCKET/vision-flan-prepared
Expected runtime: the paper trained on 8 A100s; LLaVA-1.5's 665K-example finetune took ~20 h on
8 A100-80G for 13B, so this 1.66M-example epoch is ~2 days there (docs/REFERENCE.md §4.2); see
docs/PERFORMANCE.md for our measured step times.

Target slice (size=7b and 13b): 8 chips, TPU v5p 2x2x2 (accelerator type v5p-16, 95.74 GiB HBM
per chip) or 8 x 80 GB GPUs, the paper's 8 A100s. Compiled for the slice with
`python -m vflan_jax.aot --config configs/vflan_stage1.py:size=13b --topology v5p:2x2x2`: 13B peaks
at 64.1 GiB per chip (33% headroom on v5p; 14% under an 80 GB GPU), 7B at 39.9 GiB (58%), with
splash attention (`auto` on TPU). Details: docs/PERFORMANCE.md, memory at scale.
"""
from vflan_jax.data.pipeline import prepared_source_config
from vflan_jax.data.prepared_source import is_prepared
from vflan_jax.train import recipes


def get_config(arg: str | None = None):
    a = recipes.parse_arg(arg, size="13b", lora=False, quantize="none", data_dir="data/vision-flan")
    c = recipes.llava15_finetune(a["size"])
    c.optim.learning_rate = 2e-5
    recipes.use_lora(c, a["lora"], a["quantize"])   # lora=1: LLaVA's LoRA recipe (lr 2e-4)
    c.global_batch_size = 128
    c.total_steps = recipes.steps(recipes.VISION_FLAN_INSTANCES, c.global_batch_size)   # 1 epoch
    # data_dir: the release (vision_flan.json + images/) or its prepared shards (a folder or gs:// path
    # with manifest.json, from python -m vflan_jax.data.prepare), which start in seconds on every host.
    prepared = is_prepared(a["data_dir"])
    c.data.sources.vflan = (prepared_source_config(a["data_dir"]) if prepared
                            else recipes.vision_flan_source(a["data_dir"]))
    c.data.num_epochs = 1
    return c
