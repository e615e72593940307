"""Vision-Flan Chat (stage 2, docs/REFERENCE.md §4.4): Vision-Flan Base tuned on 1,000 GPT-4 conversations.

1,000 instances drawn (seeded) from LLaVA-Instruct-158K, lr 1e-5, global batch 64, 128 steps
(~8.2 passes over the 1,000), projector + LLM trainable, starting from stage 1.

    python -m vflan_jax.train --config configs/vflan_stage2.py:size=13b,llava_dir=/data/llava \
        --config.init_from=/mnt/shared/runs/vflan/stage1-13b --workdir /mnt/shared/runs/vflan/stage2-13b

llava_dir holds llava_instruct_150k.json and coco/train2017/. init_from may be the stage-1 workdir
(its model/ is used). Expected runtime: minutes on 8 A100s (128 steps of 64 examples).

Target slice (size=7b and 13b): 8 chips, TPU v5p 2x2x2 (v5p-16) or 8 x 80 GB GPUs; global batch
64 gives 8 sequences per chip. Check with `python -m vflan_jax.aot --config configs/vflan_stage2.py:size=13b
--topology v5p:2x2x2` (docs/PERFORMANCE.md, memory at scale).
"""
from vflan_jax.train import recipes


def get_config(arg: str | None = None):
    a = recipes.parse_arg(arg, size="13b", lora=False, quantize="none", llava_dir="data/llava", num_conversations=1000)
    c = recipes.llava15_finetune(a["size"])
    c.optim.learning_rate = 1e-5
    recipes.use_lora(c, a["lora"], a["quantize"])   # lora=1: LLaVA's LoRA recipe (lr 2e-4)
    c.global_batch_size = 64
    c.total_steps = 128
    c.checkpoint_every_steps = 64
    c.data.sources.llava = recipes.llava_instruct_source(a["llava_dir"], subset=a["num_conversations"])
    return c
