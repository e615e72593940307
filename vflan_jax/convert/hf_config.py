"""ModelConfig <-> transformers config.json (LlavaConfig, CLIPConfig, LlamaConfig dicts).

Reads both transformers 4.x and 5.x spellings (image_token_index / image_token_id,
rope_theta / rope_parameters) so that checkpoints from either generation import.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from vflan_jax.convert.errors import ConversionError
from vflan_jax.models.config import ModelConfig, TextConfig, VisionConfig


class UnsupportedCheckpoint(ConversionError):
    """The directory holds something other than the architectures vflan_jax implements."""


def vision_config_from_hf(v: dict[str, Any]) -> VisionConfig:
    if v.get("model_type") == "clip":  # a full CLIPModel config: the tower is its vision_config
        v = v["vision_config"]
    if v.get("model_type") not in (None, "clip_vision_model"):
        raise UnsupportedCheckpoint(f"vision tower model_type {v.get('model_type')!r} is not CLIP")
    return VisionConfig(
        hidden_size=v.get("hidden_size", 768), intermediate_size=v.get("intermediate_size", 3072),
        num_layers=v.get("num_hidden_layers", 12), num_heads=v.get("num_attention_heads", 12),
        image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32),
        layer_norm_eps=v.get("layer_norm_eps", 1e-5), hidden_act=v.get("hidden_act", "quick_gelu"))


def text_config_from_hf(t: dict[str, Any]) -> TextConfig:
    if t.get("model_type", "llama") != "llama":
        raise UnsupportedCheckpoint(f"language model model_type {t.get('model_type')!r} is not llama")
    if t.get("rope_scaling") or (t.get("rope_parameters") or {}).get("rope_type", "default") != "default":
        raise UnsupportedCheckpoint("RoPE scaling is not implemented; LLaVA-1.5 / Vicuna v1.5 use none")
    if t.get("attention_bias") or t.get("mlp_bias"):
        raise UnsupportedCheckpoint("LLaMA variants with attention/MLP biases are not implemented")
    heads = t.get("num_attention_heads", 32)
    hidden = t.get("hidden_size", 4096)
    head_dim = t.get("head_dim")
    theta = (t.get("rope_parameters") or {}).get("rope_theta", t.get("rope_theta", 10000.0))
    return TextConfig(
        vocab_size=t.get("vocab_size", 32000), hidden_size=hidden, intermediate_size=t.get("intermediate_size", 11008),
        num_layers=t.get("num_hidden_layers", 32), num_heads=heads,
        num_kv_heads=t.get("num_key_value_heads") or heads,
        head_dim=None if head_dim in (None, hidden // heads) else head_dim,
        rope_theta=float(theta), rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        max_position_embeddings=t.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(t.get("tie_word_embeddings", False)),
        bos_token_id=_first(t.get("bos_token_id"), 1), eos_token_id=_first(t.get("eos_token_id"), 2),
        pad_token_id=_first(t.get("pad_token_id"), 0))


def _first(value, default):
    if value is None:
        return default
    return value[0] if isinstance(value, list) else value


def model_config_from_hf(cfg: dict[str, Any], **overrides: Any) -> ModelConfig:
    """From a LlavaForConditionalGeneration config.json dict."""
    if cfg.get("model_type") != "llava":
        raise UnsupportedCheckpoint(
            f"config.json has model_type {cfg.get('model_type')!r} (architectures {cfg.get('architectures')}); "
            "expected a transformers 'llava' checkpoint (LlavaForConditionalGeneration)")
    act = cfg.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise UnsupportedCheckpoint(f"projector_hidden_act {act!r}: only exact 'gelu' (LLaVA-1.5) is implemented")
    layer = cfg.get("vision_feature_layer", -2)
    if isinstance(layer, list):
        raise UnsupportedCheckpoint(f"vision_feature_layer={layer}: multi-layer features are not implemented")
    text = text_config_from_hf(cfg.get("text_config") or {})
    if "tie_word_embeddings" in cfg:
        text = dataclasses.replace(text, tie_word_embeddings=bool(cfg["tie_word_embeddings"]))
    image_token = cfg.get("image_token_id", cfg.get("image_token_index", 32000))
    model = ModelConfig(
        vision=vision_config_from_hf(cfg.get("vision_config") or {}), text=text, projector_type="mlp2x_gelu",
        vision_feature_layer=layer, vision_feature_select_strategy=cfg.get("vision_feature_select_strategy", "default"),
        image_token_id=image_token)
    return model.replace(**overrides) if overrides else model.validate()


def vision_config_to_hf(v: VisionConfig) -> dict[str, Any]:
    return {"model_type": "clip_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "image_size": v.image_size,
            "patch_size": v.patch_size, "layer_norm_eps": v.layer_norm_eps, "hidden_act": v.hidden_act,
            "num_channels": 3, "projection_dim": 768}


def text_config_to_hf(t: TextConfig) -> dict[str, Any]:
    return {"model_type": "llama", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads,
            "head_dim": t.resolved_head_dim, "rms_norm_eps": t.rms_norm_eps,
            "max_position_embeddings": t.max_position_embeddings, "tie_word_embeddings": t.tie_word_embeddings,
            "rope_theta": t.rope_theta, "rope_parameters": {"rope_theta": t.rope_theta, "rope_type": "default"},
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id}


def model_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A LlavaConfig dict. The image token must be a vocabulary entry (export adds it)."""
    if cfg.projector_type != "mlp2x_gelu":
        raise UnsupportedCheckpoint(f"transformers' LLaVA only has the mlp2x_gelu projector, "
                                    f"not {cfg.projector_type!r}")
    if not 0 <= cfg.image_token_id < cfg.text.vocab_size:
        raise ValueError(f"image_token_id {cfg.image_token_id} is not a vocabulary entry "
                         f"(vocab {cfg.text.vocab_size}); add the <image> token first (export-hf does)")
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "image_token_index": cfg.image_token_id, "image_token_id": cfg.image_token_id,
            "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
            "vision_feature_layer": cfg.vision_feature_layer,
            "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
            "image_seq_length": cfg.tokens_per_image, "tie_word_embeddings": cfg.text.tie_word_embeddings,
            "vision_config": vision_config_to_hf(cfg.vision), "text_config": text_config_to_hf(cfg.text)}
