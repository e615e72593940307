"""Parameter-tree surgery for LoRA (models/lora.py): adapters added to a plain model's parameters (its
kernels quantized when the config asks), and adapters merged back into plain kernels.

Both work on the nested params dict of LlavaForConditionalGeneration, layer stacks included
(kernel [L, in, out], lora_a [L, in, r], lora_b [L, r, out]); one layer at a time where the
temporaries would otherwise be the size of a whole stack.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from vflan_jax.models.config import ModelConfig
from vflan_jax.models.lora import PARENT, PROJECTIONS, LoraConfig, dequantize, lora_a_init, quantize


def _modules(params):
    """(projection name, its param dict) for every decoder projection."""
    layers = params["language_model"]["layers"]
    return [(n, layers[PARENT[n]][n]) for n in PROJECTIONS]


def _per_layer(fn, *arrays):
    """fn over the leading layer axis, one layer at a time (stacked outputs)."""
    return jnp.stack([fn(*(a[i] for a in arrays)) for i in range(arrays[0].shape[0])])


def float_kernel(module: dict, lora: LoraConfig | None) -> jax.Array:
    """A projection's base kernel as float32 (dequantized when stored quantized)."""
    if lora is None or lora.quantize == "none" or "kernel_scale" not in module:
        return jnp.asarray(module["kernel"], jnp.float32)
    return _per_layer(lambda q, s: dequantize(q, s, lora.quantize, lora.block_size), module["kernel"],
                      module["kernel_scale"])


def merged(params: dict, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
    """Adapters folded into their kernels (W + alpha/r A B, in float32, cast to the stored float
    dtype): the plain model that gives the same logits, and its config (text.lora None)."""
    lora = cfg.text.lora
    if lora is None:
        return params, cfg
    dtype = jnp.dtype(cfg.param_dtype)
    out = jax.tree.map(lambda x: x, params)   # new containers, same leaves
    for _, module in _modules(out):
        if "lora_a" not in module:
            continue
        w = float_kernel(module, lora)
        delta = _per_layer(lambda a, b: lora.scale * (jnp.asarray(a, jnp.float32) @ jnp.asarray(b, jnp.float32)),
                           module["lora_a"], module["lora_b"])
        module.clear()
        module["kernel"] = (w + delta).astype(dtype)
    return out, dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, lora=None))


def with_adapters(params: dict, cfg: ModelConfig, seed: int = 0) -> dict:
    """A plain model's parameters (e.g. init_from) for the LoRA model `cfg`: each targeted kernel
    stored as the config says (quantized for QLoRA), fresh adapters beside it (A drawn, B zero)."""
    lora = cfg.text.lora
    out = jax.tree.map(lambda x: x, params)
    key = jax.random.key(seed)
    for index, (name, module) in enumerate(_modules(out)):
        if name not in lora.targets:
            continue
        if "lora_a" in module:
            raise ValueError(f"{name} already has adapters; merge them first (models/lora_params.merged)")
        kernel = module["kernel"]
        n_layers, n_in, n_out = kernel.shape
        if lora.quantize != "none":
            quantized = [quantize(kernel[i], lora.quantize, lora.block_size) for i in range(n_layers)]
            codes, scales = zip(*quantized, strict=True)
            module["kernel"], module["kernel_scale"] = jnp.stack(codes), jnp.stack(scales)
        keys = jax.random.split(jax.random.fold_in(key, index), n_layers)
        module["lora_a"] = jnp.stack([lora_a_init(k, (n_in, lora.rank)) for k in keys])
        module["lora_b"] = jnp.zeros((n_layers, lora.rank, n_out), jnp.float32)
    return out


def for_model(params: dict, loaded: ModelConfig, cfg: ModelConfig, seed: int = 0) -> dict:
    """init_from's parameters -> the parameters `cfg` trains: a loaded model with adapters is merged
    first (a Chat stage on a LoRA Base starts from the Base's merged weights), then fresh adapters."""
    if loaded.text.lora is not None:
        params, _ = merged(params, loaded)
    return params if cfg.text.lora is None else with_adapters(params, cfg, seed)


def adapter_leaves(params: dict) -> dict[str, np.ndarray]:
    """{'self_attn/q_proj/lora_a': [L, in, r], ...} of the adapters present (host arrays)."""
    out = {}
    for name, module in _modules(params):
        for leaf in ("lora_a", "lora_b"):
            if leaf in module:
                out[f"{PARENT[name]}/{name}/{leaf}"] = np.asarray(jax.device_get(module[leaf]))
    return out
