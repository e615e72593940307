"""AdamW with warmup + cosine, freezing by regex, and the split into trainable and frozen trees.

Frozen parameters are not differentiated at all: the train step takes the gradient of the
trainable sub-tree only, so frozen weights get neither gradient computation nor optimizer
state, and the global-norm clip covers exactly the trainable gradients (as HF Trainer's
clip over requires_grad parameters).
"""
from __future__ import annotations

import math
import re
from typing import Mapping

import ml_collections
import optax
from flax import traverse_util

# Parameter groups. Paths are '/'-joined Flax paths, e.g. 'language_model/layers/mlp/up_proj/kernel'.
GROUP_PATTERNS = {
    "vision_tower": r"^vision_tower/",
    "projector": r"^multi_modal_projector/",
    "llm": r"^language_model/",
    "lora": r"/lora_[ab]$",
}
# With LoRA adapters (models/lora.py) the LLM trains through them only, as in LLaVA's LoRA recipe:
# "llm" then means its adapters, and no pattern can make an adapted (or quantized) base trainable.
_ADAPTER = re.compile(GROUP_PATTERNS["lora"])


def default_optim_config() -> ml_collections.ConfigDict:
    """Recipe §4.3 (HF Trainer defaults as LLaVA uses them)."""
    c = ml_collections.ConfigDict()
    c.learning_rate = 2e-5
    c.projector_learning_rate = ml_collections.config_dict.placeholder(float)  # None = learning_rate
    c.warmup_ratio = 0.03
    c.schedule = "cosine"          # "cosine" | "constant"
    c.b1 = 0.9
    c.b2 = 0.999
    c.eps = 1e-8
    c.weight_decay = 0.0
    c.max_grad_norm = 1.0          # global norm over trainable gradients; 0 = off
    c.trainable = ("projector", "llm")   # groups of GROUP_PATTERNS, or raw regexes on the path
    return c


def path_name(path: tuple[str, ...]) -> str:
    return "/".join(str(p) for p in path)


def _patterns(trainable) -> list[str]:
    if isinstance(trainable, str):
        trainable = (trainable,)
    return [GROUP_PATTERNS.get(t, t) for t in trainable]


def trainable_mask(params: Mapping, trainable) -> dict[tuple[str, ...], bool]:
    """Flat {path: is_trainable}; raises when a pattern matches nothing (a typo would otherwise
    silently freeze the model)."""
    flat = traverse_util.flatten_dict(params)
    adapted = {p[:-1] for p in flat if _ADAPTER.search(path_name(p))}
    if adapted:
        names = (trainable,) if isinstance(trainable, str) else trainable
        trainable = tuple("lora" if t == "llm" else t for t in names)
    patterns = _patterns(trainable)
    for pattern in patterns:
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"optim.trainable: {pattern!r} is not a valid regex ({e})") from None
        if not any(compiled.search(path_name(p)) for p in flat):
            raise ValueError(f"optim.trainable: {pattern!r} matches no parameter; groups are {sorted(GROUP_PATTERNS)}")
    frozen_base = {p for p in flat if p[:-1] in adapted and not _ADAPTER.search(path_name(p))}
    return {p: p not in frozen_base and any(re.search(pattern, path_name(p)) for pattern in patterns) for p in flat}


def split(params: Mapping, mask: Mapping[tuple[str, ...], bool]) -> tuple[dict, dict]:
    """(trainable, frozen) sub-trees of a nested dict."""
    flat = traverse_util.flatten_dict(params)
    trainable = {p: v for p, v in flat.items() if mask[p]}
    frozen = {p: v for p, v in flat.items() if not mask[p]}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge(trainable: Mapping, frozen: Mapping) -> dict:
    flat = traverse_util.flatten_dict(trainable) | traverse_util.flatten_dict(frozen)
    return traverse_util.unflatten_dict(flat)


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(warmup_ratio * total_steps)


def learning_rate_schedule(peak: float, total_steps: int, warmup_ratio: float, kind: str = "cosine"):
    """HF get_cosine_schedule_with_warmup: linear 0 -> peak over ceil(ratio*total) steps, then a
    half cosine to 0 at total_steps. Step s is the update count before the update (0-based)."""
    warm = warmup_steps(total_steps, warmup_ratio)
    if kind == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warm, 1)), optax.constant_schedule(peak)],
                                    [warm]) if warm else optax.constant_schedule(peak)
    if kind != "cosine":
        raise ValueError(f"optim.schedule: {kind!r} is not one of ('cosine', 'constant')")
    decay = optax.cosine_decay_schedule(peak, max(total_steps - warm, 1))
    if not warm:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), decay], [warm])


def _decay_mask(params):
    # HF/LLaVA: no weight decay on biases and norm weights (irrelevant at the recipe's wd 0).
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({p: p[-1] in ("kernel", "embedding") for p in flat})


def make_optimizer(cfg: ml_collections.ConfigDict, trainable_params: Mapping, total_steps: int):
    """Optimizer over the trainable tree. Returns (optax transform, {group: schedule})."""
    schedules = {"default": learning_rate_schedule(cfg.learning_rate, total_steps, cfg.warmup_ratio, cfg.schedule)}
    adam = dict(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=_decay_mask)
    if cfg.projector_learning_rate is not None:
        schedules["projector"] = learning_rate_schedule(cfg.projector_learning_rate, total_steps,
                                                        cfg.warmup_ratio, cfg.schedule)
        labels = traverse_util.unflatten_dict({
            p: "projector" if re.search(GROUP_PATTERNS["projector"], path_name(p)) else "default"
            for p in traverse_util.flatten_dict(trainable_params)})
        inner = optax.multi_transform({g: optax.adamw(s, **adam) for g, s in schedules.items()}, labels)
    else:
        inner = optax.adamw(schedules["default"], **adam)
    chain = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm else []
    return optax.chain(*chain, inner), schedules
