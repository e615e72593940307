"""LLaVA-1.5 feature alignment (docs/REFERENCE.md §4.1): train the projector alone on LCS-558K captions.

plain template (the caption is the whole answer), 'square' images (shortest-side resize + centre
crop), lr 1e-3, global batch 256, 1 epoch, cosine with 3% warmup, LLM and tower frozen.

    python -m vflan_jax.convert import-hf --vision_tower clip-vit-large-patch14-336 --llm vicuna-13b-v1.5 \
        --out ckpt/vicuna13b-clip
    python -m vflan_jax.train --config configs/llava15_pretrain.py:size=13b,data_dir=/data/LLaVA-Pretrain \
        --config.init_from=ckpt/vicuna13b-clip --workdir /mnt/shared/runs/llava15/pretrain-13b

data_dir holds blip_laion_cc_sbu_558k.json and images/. Expected runtime: ~5.5 h (13B) / ~3.5 h
(7B) on 8 A100-80G for the original (docs/REFERENCE.md §4.1).

Target slice (size=7b and 13b): 8 chips, TPU v5p 2x2x2 (v5p-16) or 8 x 80 GB GPUs. Only the
projector trains, so the optimizer state is small; check with `python -m vflan_jax.aot --config
configs/llava15_pretrain.py:size=13b --topology v5p:2x2x2` (docs/PERFORMANCE.md, memory at scale).
"""
from vflan_jax.data.pipeline import source_config
from vflan_jax.train import recipes


def get_config(arg: str | None = None):
    a = recipes.parse_arg(arg, size="13b", data_dir="data/LLaVA-Pretrain")
    c = recipes.llava15_finetune(a["size"])
    c.optim.trainable = ("projector",)
    c.optim.learning_rate = 1e-3
    c.global_batch_size = 256
    c.total_steps = recipes.steps(recipes.LLAVA_PRETRAIN_INSTANCES, c.global_batch_size)
    c.data.template = "plain"
    c.data.image_aspect = "square"
    c.data.num_epochs = 1
    c.data.sources.lcs558k = source_config(f"{a['data_dir']}/blip_laion_cc_sbu_558k.json", f"{a['data_dir']}/images",
                                           format="llava", default_task="lcs558k_caption")
    return c
