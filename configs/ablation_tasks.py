"""Tasks vs instances at a fixed budget (docs/REFERENCE.md §4.5 Table 3): stage 1 on T tasks x N instances each.

The paper's points: 10 x 10,000 vs 187 x 500 (100K) and 20 x 10,000 vs 187 x 1,000 (200K).
Tasks and instances are drawn with the config's seed; everything else is stage 1.

    python -m vflan_jax.train --config configs/ablation_tasks.py:data_dir=/data/vision-flan,tasks=10,per_task=10000 \
        --config.init_from=ckpt/llava15-13b-pretrained --workdir /mnt/shared/runs/vflan/ablation-10x10000

(size=13b by default; `,size=7b` after the `:` for 7B).

Expected runtime: budget / 1.66M of a stage-1 epoch (100K examples: ~6% of it).

Target slice (size=7b and 13b): as stage 1, 8 chips, TPU v5p 2x2x2 (v5p-16) or 8 x 80 GB GPUs
(same model, batch and length, so the same per-chip memory; docs/PERFORMANCE.md, memory at scale).
"""
from vflan_jax.train import recipes


def get_config(arg: str | None = None):
    a = recipes.parse_arg(arg, size="13b", data_dir="data/vision-flan", tasks=187, per_task=500)
    tasks, per_task = a["tasks"], a["per_task"]
    c = recipes.llava15_finetune(a["size"])
    c.optim.learning_rate = 2e-5
    c.global_batch_size = 128
    c.total_steps = recipes.steps(tasks * per_task, c.global_batch_size)
    c.data.sources.vflan = recipes.vision_flan_source(a["data_dir"], budget_tasks=tasks, budget_per_task=per_task)
    c.data.num_epochs = 1
    return c
