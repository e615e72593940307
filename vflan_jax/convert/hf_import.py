"""Build vflan_jax parameters from transformers/LLaVA checkpoints, one tensor at a time,
straight into their target shardings.

Every parameter is created with `jax.make_array_from_callback`: each device shard's callback
reads only the rows it needs from the safetensors file (transposing torch [out, in] to Flax
[in, out] on the fly; stacked layers read layer by layer), so host memory holds the finished
parameters plus one tensor in flight, never a second copy of the model. On a multi-host
mesh each process reads only its own shards.
"""
from __future__ import annotations

import functools
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from vflan_jax.convert import layout as L
from vflan_jax.convert.import_plan import Entry, ImportPlan, check_plan, plan_composed, plan_llava_hf
from vflan_jax.convert.tensors import flatten, nest
from vflan_jax.models.config import ModelConfig
from vflan_jax.models.projector import Projector
from vflan_jax.parallel import DEFAULT_RULES, abstract_params, make_mesh, param_shardings

# flax axis j of a per-layer parameter is torch axis _TORCH_AXIS[kind][j] (layout.to_flax)
_TORCH_AXIS = {"copy": None, "linear": (1, 0), "conv": (2, 3, 1, 0)}


def _full_index(index, shape) -> tuple[slice, ...]:
    index = tuple(index or ()) + (slice(None),) * (len(shape) - len(index or ()))
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape, strict=True))


def _read_part(entry: Entry, key: str, flax_index: tuple[slice, ...], dtype) -> np.ndarray:
    """The flax_index window of one (per-layer) parameter, read from its torch tensor."""
    axes = _TORCH_AXIS[entry.source.kind]
    torch_index = flax_index
    if axes is not None:
        torch_index = [None] * len(axes)
        for flax_axis, torch_axis in enumerate(axes):
            torch_index[torch_axis] = flax_index[flax_axis]
        torch_index = tuple(torch_index)
    rows = torch_index[0] if torch_index else None
    part = entry.tensors.read(key, rows)  # only these rows leave the disk
    if torch_index:
        part = part[(slice(None),) + torch_index[1:]]
    return np.ascontiguousarray(L.to_flax(part, entry.source.kind).astype(dtype, copy=False))


def _read_shard(entry: Entry, shape: tuple[int, ...], dtype, index) -> np.ndarray:
    index = _full_index(index, shape)
    if not entry.source.stacked:
        return _read_part(entry, entry.source.keys[0], index, dtype)
    layers = range(*index[0].indices(shape[0]))
    out = None
    for j, i in enumerate(layers):  # filled layer by layer: no list of parts next to the stacked copy
        part = _read_part(entry, entry.source.keys[i], index[1:], dtype)
        if out is None:
            out = np.empty((len(layers),) + part.shape, dtype)
        out[j] = part
    return out


def _init_fresh(cfg: ModelConfig, group: str, shardings: dict, mesh, rules, seed: int) -> dict:
    """Parameters no checkpoint provides; only the projector can be missing (LLaVA stage 1
    starts from a PyTorch-default-initialised projector, which Projector's initialisers follow)."""
    if group != "multi_modal_projector":
        raise ValueError(f"cannot initialise {group}")
    proj = Projector(cfg.projector_type, cfg.text.hidden_size, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype))
    x = jnp.zeros((1, 1, cfg.vision.hidden_size), jnp.float32)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jax.jit(lambda k: nn.unbox(proj.init(k, x)["params"]), out_shardings=shardings)(jax.random.key(seed))


def import_params(plan: ImportPlan, mesh=None, rules=DEFAULT_RULES, seed: int = 0, progress: bool = True) -> dict:
    """The nested params tree of plan.config, each leaf a jax.Array in its parallel.param_shardings sharding."""
    cfg = plan.config
    mesh = mesh if mesh is not None else make_mesh()
    boxed = abstract_params(cfg)
    shapes = {path: tuple(x.shape) for path, x in flatten(nn.unbox(boxed)).items()}
    check_plan(plan, shapes)  # all errors before any weight is read
    shardings = param_shardings(boxed, mesh, rules)
    flat_shardings = flatten(shardings)
    dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    out = {}
    for path, entry in tqdm(plan.entries.items(), desc="import", unit="param", disable=not progress or None):
        shape = shapes[path]
        out[path] = jax.make_array_from_callback(shape, flat_shardings[path],
                                                 functools.partial(_read_shard, entry, shape, dtype))
    params = nest(out)
    for group in plan.fresh:
        params[group] = _init_fresh(cfg, group, shardings[group], mesh, rules, seed)
    return params


def import_llava_hf(hf_dir: str | pathlib.Path, mesh=None, rules=DEFAULT_RULES, param_dtype: str = "float32",
                    progress: bool = True) -> tuple[dict, ModelConfig, pathlib.Path | None]:
    """(params, model_config, tokenizer_dir or None) from a LlavaForConditionalGeneration directory."""
    plan = plan_llava_hf(hf_dir, param_dtype)
    return import_params(plan, mesh, rules, progress=progress), plan.config, plan.tokenizer_dir


def import_composed(vision_tower, llm, projector=None, mesh=None, rules=DEFAULT_RULES, param_dtype: str = "float32",
                    seed: int = 0, progress: bool = True, **feature_options):
    """(params, model_config, tokenizer_dir or None) from CLIP + LLaMA/original-LLaVA (+ projector file)."""
    plan = plan_composed(vision_tower, llm, projector, param_dtype, **feature_options)
    return import_params(plan, mesh, rules, seed=seed, progress=progress), plan.config, plan.tokenizer_dir
