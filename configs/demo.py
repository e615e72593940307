"""The README's main job: a tiny LLaVA trained on the offline Vision-Flan-like task suite.

    python -m vflan_jax.train --config configs/demo.py --workdir /tmp/vflan_demo

Runs on a laptop CPU (2 cores: about 5 minutes) with nothing downloaded: the task suite
(17 task types, each with its own expert instruction: 14 trained on, 3 held out; see
vflan_jax/data/synthetic.py) and a LLaMA-style tokenizer are generated into <workdir>/synthetic
on first use. The loss falls clearly, and exact-match accuracy on the never-trained held-out tasks is printed next to
its chance level, beside the accuracy on new instances of the trained tasks. Shorter: --config.total_steps=20.

`configs/demo.py:lora=1[,quantize=int8|nf4]` trains LoRA adapters (rank 64, LLaVA's dropout 0.05) and the
projector over a frozen base. Over the never-pretrained base it learns little (its frozen random lm_head
after the frozen final norm bounds every logit near |2.6|; held-out accuracy stayed below chance). As LoRA is
used, on a base that has been trained a little first (the base alone is at chance on the held-out tasks),
it learns them (2 CPU cores: about 35 s + 55 s; docs/PERFORMANCE.md, "The LoRA demo"):

    python -m vflan_jax.train --config configs/demo.py --workdir runs/demo-base --config.total_steps=120
    python -m vflan_jax.train --config configs/demo.py:lora=1 --workdir runs/demo-lora \
        --config.init_from=runs/demo-base/model --config.total_steps=300
"""
from vflan_jax.data.pipeline import source_config
from vflan_jax.data.synthetic import HELDOUT_TASKS, task_name
from vflan_jax.train import recipes
from vflan_jax.train.config import base_config


def get_config(arg: str | None = None):
    a = recipes.parse_arg(arg, lora=False, quantize="none")
    c = base_config()
    c.seed = 0
    c.total_steps = 400
    c.log_every_steps = 10
    c.checkpoint_every_steps = 100
    c.eval_every_steps = 100
    c.global_batch_size = 8
    c.synthetic_suite = "{workdir}/synthetic"
    c.synthetic_instances_per_task = 160
    c.tokenizer = "{synthetic}/tokenizer"

    c.model.preset = "tiny"
    c.model.dtype = "float32"        # CPUs have no fast bf16 matmul
    c.model.remat_policy = "none"

    c.optim.learning_rate = 2e-3     # a from-scratch tiny model, not a fine-tune of Vicuna
    c.optim.warmup_ratio = 0.05
    c.optim.trainable = ("projector", "llm")
    # lora=1[,quantize=int8|nf4]: adapters on every projection of the (random) LLM, projector trained;
    # a rank near the tiny model's width, since here the base was never pretrained; LLaVA's dropout 0.05.
    recipes.use_lora(c, a["lora"], a["quantize"], rank=64, alpha=128.0, learning_rate=2e-3,
                     projector_learning_rate=None)

    c.data.sources.train = source_config("{synthetic}/train.json", "{synthetic}/images")
    c.data.sources.heldout = source_config("{synthetic}/heldout.json", "{synthetic}/images")
    c.data.heldout_tasks = tuple(task_name(t) for t in HELDOUT_TASKS)
    c.eval_data.val = source_config("{synthetic}/val.json", "{synthetic}/images")  # seen tasks, new images
    c.data.max_length = 256
    c.data.image_aspect = "pad"
    c.data.num_workers = 0
    return c
