"""One table that says where every vflan_jax parameter lives in a transformers LLaVA checkpoint.

Import and export both read it, so the two directions cannot drift apart. Names are the
canonical transformers >= 4.52 in-memory names (docs/REFERENCE.md §6.2); `canonical_key` maps the other
layouts (<= 4.51 / hub llava-hf, the on-disk layout of v5 save_pretrained, `vision_model.`
prefixes) onto them.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from vflan_jax.models.config import ModelConfig
from vflan_jax.models.projector import parse_projector_type

# (pattern, replacement), applied in order to every key of a checkpoint.
_RENAMES = (
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    (r"^model\.vision_tower\.vision_model\.", "model.vision_tower."),
)


def canonical_key(key: str) -> str:
    for pattern, replacement in _RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


@dataclasses.dataclass(frozen=True)
class ParamSource:
    """How to build one Flax parameter from checkpoint tensors.

    keys: one key, or one per stacked layer (the Flax tensor has a leading layer axis).
    kind: 'copy' (same layout), 'linear' (torch [out, in] <-> flax [in, out]),
          'conv' (torch [out, in, kh, kw] <-> flax [kh, kw, in, out]).
    """
    keys: tuple[str, ...]
    kind: str
    stacked: bool


def to_flax(array: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return array.T
    if kind == "conv":
        return array.transpose(2, 3, 1, 0)
    return array


def to_torch(array: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return array.T
    if kind == "conv":
        return array.transpose(3, 2, 0, 1)
    return array


def _module_params(prefix: str, module: str, kind: str) -> dict[tuple[str, ...], tuple[str, str]]:
    """Flax leaf path -> (torch suffix, kind) for one Dense/LayerNorm/RMSNorm module."""
    if kind == "linear":
        return {(module, "kernel"): (f"{prefix}{module}.weight", "linear"),
                (module, "bias"): (f"{prefix}{module}.bias", "copy")}
    if kind == "linear_nobias":
        return {(module, "kernel"): (f"{prefix}{module}.weight", "linear")}
    if kind == "layernorm":
        return {(module, "scale"): (f"{prefix}{module}.weight", "copy"),
                (module, "bias"): (f"{prefix}{module}.bias", "copy")}
    if kind == "rmsnorm":
        return {(module, "scale"): (f"{prefix}{module}.weight", "copy")}
    raise ValueError(kind)


def _clip_layer() -> dict[tuple[str, ...], tuple[str, str]]:
    out = {}
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        out.update({("self_attn",) + k: v for k, v in _module_params("self_attn.", proj, "linear").items()})
    for fc in ("fc1", "fc2"):
        out.update({("mlp",) + k: v for k, v in _module_params("mlp.", fc, "linear").items()})
    out.update(_module_params("", "layer_norm1", "layernorm"))
    out.update(_module_params("", "layer_norm2", "layernorm"))
    return out


def _llama_layer() -> dict[tuple[str, ...], tuple[str, str]]:
    out = {}
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        out.update({("self_attn",) + k: v for k, v in _module_params("self_attn.", proj, "linear_nobias").items()})
    for proj in ("gate_proj", "up_proj", "down_proj"):
        out.update({("mlp",) + k: v for k, v in _module_params("mlp.", proj, "linear_nobias").items()})
    out.update(_module_params("", "input_layernorm", "rmsnorm"))
    out.update(_module_params("", "post_attention_layernorm", "rmsnorm"))
    return out


def _stacked(flax_prefix: tuple[str, ...], torch_prefix: str, layer: dict, layer_ids: range) -> dict:
    return {flax_prefix + path: ParamSource(tuple(f"{torch_prefix}{i}.{suffix}" for i in layer_ids), kind, True)
            for path, (suffix, kind) in layer.items()}


def vision_tower_layout(cfg: ModelConfig,
                        torch_prefix: str = "model.vision_tower.") -> dict[tuple[str, ...], ParamSource]:
    """Flax paths under params['vision_tower'] -> sources, with `torch_prefix` before CLIP's own names."""
    v, used = cfg.vision, cfg.vision_layers_used
    p = torch_prefix
    out = {
        ("embeddings", "class_embedding"): ParamSource((f"{p}embeddings.class_embedding",), "copy", False),
        ("embeddings", "patch_embedding", "kernel"):
            ParamSource((f"{p}embeddings.patch_embedding.weight",), "conv", False),
        ("embeddings", "position_embedding"): ParamSource((f"{p}embeddings.position_embedding.weight",), "copy", False),
    }
    for name in ("pre_layrnorm", "post_layernorm"):
        norm = _module_params(p, name, "layernorm")
        out.update({path: ParamSource((key,), kind, False) for path, (key, kind) in norm.items()})
    if used:
        out.update(_stacked(("layers",), f"{p}encoder.layers.", _clip_layer(), range(used)))
    if v.num_layers > used:
        out.update(_stacked(("unused_layers",), f"{p}encoder.layers.", _clip_layer(), range(used, v.num_layers)))
    return out


def projector_layout(cfg: ModelConfig, torch_prefix: str = "model.multi_modal_projector.",
                     torch_names: tuple[str, ...] | None = None) -> dict[tuple[str, ...], ParamSource]:
    """torch_names: the torch module names of the Linear layers (HF: linear_1, linear_2; LLaVA's
    own nn.Sequential: 0, 2)."""
    depth = parse_projector_type(cfg.projector_type)
    names = torch_names or tuple(f"linear_{i + 1}" for i in range(depth))
    out = {}
    for i, tname in enumerate(names):
        out[(f"linear_{i + 1}", "kernel")] = ParamSource((f"{torch_prefix}{tname}.weight",), "linear", False)
        out[(f"linear_{i + 1}", "bias")] = ParamSource((f"{torch_prefix}{tname}.bias",), "copy", False)
    return out


def language_model_layout(cfg: ModelConfig, model_prefix: str = "model.language_model.",
                          lm_head_key: str = "lm_head.weight") -> dict[tuple[str, ...], ParamSource]:
    t = cfg.text
    out = {
        ("embed_tokens", "embedding"): ParamSource((f"{model_prefix}embed_tokens.weight",), "copy", False),
        ("norm", "scale"): ParamSource((f"{model_prefix}norm.weight",), "copy", False),
    }
    out.update(_stacked(("layers",), f"{model_prefix}layers.", _llama_layer(), range(t.num_layers)))
    if not t.tie_word_embeddings:
        out[("lm_head", "kernel")] = ParamSource((lm_head_key,), "linear", False)
    return out


def llava_layout(cfg: ModelConfig) -> dict[tuple[str, ...], ParamSource]:
    """Every Flax parameter path of LlavaForConditionalGeneration -> its canonical HF source."""
    out = {}
    for top, part in (("vision_tower", vision_tower_layout(cfg)),
                      ("multi_modal_projector", projector_layout(cfg)),
                      ("language_model", language_model_layout(cfg))):
        out.update({(top,) + path: src for path, src in part.items()})
    return out


def flax_path_name(path: tuple[str, ...]) -> str:
    return "/".join(path)
