"""Building blocks shared by the recipe configs in configs/ (docs/REFERENCE.md §4), so that each config file
says only what its experiment changes.
"""
from __future__ import annotations

import math

from vflan_jax.data.pipeline import source_config
from vflan_jax.train.config import base_config

VISION_FLAN_INSTANCES = 1_664_261     # the 187-task release, docs/REFERENCE.md §2.4
LLAVA_PRETRAIN_INSTANCES = 558_128    # LCS-558K (docs/REFERENCE.md §4.1; count from memory, docs/REFERENCE.md §7.6)
SIZES = ("7b", "13b")


_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


def _typed(key: str, text: str, default):
    """`text` as the type of `default` (big_vision's configs/common.py parse_arg does the same)."""
    if isinstance(default, bool):   # before int: bool is an int subclass, and int("true") fails
        if text.lower() not in _TRUE + _FALSE:
            raise ValueError(f"config argument {key}={text!r}: use 1 or 0 (or true / false)")
        return text.lower() in _TRUE
    if isinstance(default, (int, float)):
        try:
            return type(default)(text)
        except ValueError:
            raise ValueError(f"config argument {key}={text!r}: expected {type(default).__name__}, "
                             f"like the default {default!r}") from None
    return text


def parse_arg(arg: str | None, **defaults):
    """'size=7b,tasks=10' -> {'size': '7b', 'tasks': 10, ...the other defaults}: each value typed as its
    default (bool, int, float or str); an unknown key or a value of the wrong type is an error naming it."""
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"config argument {item!r}: use key=value (known keys: {sorted(defaults)})")
        if key not in defaults:
            raise ValueError(f"config argument {key!r} is unknown; known keys: {sorted(defaults)}")
        values[key] = _typed(key, value, defaults[key])
    if "size" in values and values["size"] not in SIZES:
        raise ValueError(f"config argument size={values['size']!r}: use one of {SIZES}")
    return values


def steps(num_examples: int, global_batch: int, epochs: float = 1.0) -> int:
    return math.ceil(num_examples * epochs / global_batch)


def llava15_finetune(size: str):
    """LLaVA-1.5 visual instruction tuning settings (docs/REFERENCE.md §4.2/4.3), the base of both Vision-Flan stages:
    projector + LLM trainable, tower frozen, AdamW(0.9, 0.999, 1e-8), wd 0, clip 1.0, cosine with
    3% warmup, max_length 2048, vicuna_v1 template, 'pad' images, bf16 compute with float32 master
    weights. One example per row (pad-to-longest, as LLaVA) so that a step sees exactly
    global_batch_size examples; data.packing='best_fit' trades that for throughput."""
    c = base_config()
    c.model.preset = size
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat_policy = "full"
    c.model.attention_impl = "auto"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.optim.trainable = ("projector", "llm")
    c.optim.warmup_ratio = 0.03
    c.optim.weight_decay = 0.0
    c.optim.max_grad_norm = 1.0
    c.data.template = "vicuna_v1"
    c.data.image_aspect = "pad"
    c.data.max_length = 2048
    c.data.packing = "pad_to_longest"
    c.data.num_workers = 8
    c.log_every_steps = 10
    c.checkpoint_every_steps = 1000
    return c


def use_lora(c, enabled: bool = True, quantize: str = "none", rank: int = 128, alpha: float = 256.0,
             learning_rate: float = 2e-4, projector_learning_rate: float | None = 2e-5, dropout: float = 0.05):
    """LoRA instead of full tuning of the LLM (config arguments lora=1[,quantize=int8|nf4]). Defaults:
    LLaVA-1.5's LoRA recipe (scripts/v1_5/finetune_lora.sh: rank 128, alpha 256, lora_dropout 0.05,
    lr 2e-4, projector lr 2e-5); the projector stays fully trained, the tower and base LLM frozen."""
    if not enabled:
        if quantize != "none":
            raise ValueError(f"config argument quantize={quantize!r} needs lora=1")
        return c
    c.lora.rank, c.lora.alpha, c.lora.dropout, c.lora.quantize = rank, alpha, dropout, quantize
    c.optim.learning_rate = learning_rate
    c.optim.projector_learning_rate = projector_learning_rate
    c.optim.trainable = ("projector", "llm")   # with adapters, "llm" trains the adapters only (optim.py)
    return c


def vision_flan_source(data_dir: str, **kw):
    """The full release: vision_flan.json (LLaVA format + task_name) and its image folder."""
    return source_config(f"{data_dir}/vision_flan.json", f"{data_dir}/images", format="llava", **kw)


def llava_instruct_source(llava_dir: str, **kw):
    """LLaVA-Instruct-158K (llava_instruct_150k.json, GPT-4 conversations on COCO train2017)."""
    return source_config(f"{llava_dir}/llava_instruct_150k.json", f"{llava_dir}/coco/train2017", format="llava",
                         default_task="llava_instruct", **kw)
