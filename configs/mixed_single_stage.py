"""Baseline of docs/REFERENCE.md §4.5 Table 4: one stage on Vision-Flan plus N GPT-4 conversations mixed in.

Same settings as stage 1 (lr 2e-5, global batch 128, one epoch over the union); N = 1,000 or
158,000 in the paper (Table 4: MME 1364.0 / 1317.9, LLaVA-Bench 52.7 / 63.9).

    python -m vflan_jax.train --config configs/mixed_single_stage.py:data_dir=/data/vision-flan,llava_dir=/data/llava \
        --config.init_from=ckpt/llava15-13b-pretrained --workdir /mnt/shared/runs/vflan/mixed-1k

(defaults size=13b, num_conversations=1000; add e.g. `,size=7b,num_conversations=158000` after the `:`).

Expected runtime: as stage 1 (one epoch of 1.66M + N examples).

Target slice (size=7b and 13b): as stage 1, 8 chips, TPU v5p 2x2x2 (v5p-16) or 8 x 80 GB GPUs
(same model, batch and length, so the same per-chip memory; docs/PERFORMANCE.md, memory at scale).
"""
from vflan_jax.train import recipes


def get_config(arg: str | None = None):
    a = recipes.parse_arg(arg, size="13b", data_dir="data/vision-flan", llava_dir="data/llava",
                          num_conversations=1000)
    n = a["num_conversations"]
    c = recipes.llava15_finetune(a["size"])
    c.optim.learning_rate = 2e-5
    c.global_batch_size = 128
    c.total_steps = recipes.steps(recipes.VISION_FLAN_INSTANCES + n, c.global_batch_size)
    c.data.sources.vflan = recipes.vision_flan_source(a["data_dir"])
    c.data.sources.llava = recipes.llava_instruct_source(a["llava_dir"], subset=n)
    c.data.num_epochs = 1
    return c
