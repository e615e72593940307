"""FLOPs per training step, for MFU.

Counted (multiply-add = 2 FLOPs), per row of length T holding I image slots:
- vision tower: forward only (frozen, under stop_gradient), over all slots computed, including
  unused ones since they are computed too: 2 * P_tower_used * (patches + 1) per image, plus
  attention 4 * layers * (patches + 1)^2 * width.
- projector: forward + backward (6x) when trainable, forward (2x) otherwise, per image token.
- decoder (+ lm_head): 6 * P per token when trainable; 4 * P when frozen (the backward still
  propagates activation gradients to the projector, but computes no weight gradients).
  Embedding lookups are free.
- decoder attention: causal, so half of the T x T score and value products:
  fwd 2 * 2 * T^2 / 2 * d_attn per layer per row, and the backward twice the forward.
  Rows are attended densely even when packed (the mask removes work from no kernel here).
"""
from __future__ import annotations

from vflan_jax.models.config import ModelConfig
from vflan_jax.models.projector import parse_projector_type


def _tower_params_per_layer(cfg: ModelConfig) -> int:
    d, f = cfg.vision.hidden_size, cfg.vision.intermediate_size
    return 4 * d * d + 2 * d * f


def _decoder_matmul_params(cfg: ModelConfig) -> int:
    t = cfg.text
    hd = t.resolved_head_dim
    attn = t.hidden_size * hd * (t.num_heads * 2 + t.num_kv_heads * 2)
    mlp = 3 * t.hidden_size * t.intermediate_size
    return t.num_layers * (attn + mlp) + t.hidden_size * t.vocab_size  # + lm_head


def train_step_flops(cfg: ModelConfig, *, batch: int, seq_len: int, image_slots: int,
                     llm_trainable: bool = True, projector_trainable: bool = True) -> float:
    v, t = cfg.vision, cfg.text
    images = batch * image_slots
    vt = v.num_patches + 1
    tower = images * (2 * _tower_params_per_layer(cfg) * vt + 4 * vt * vt * v.hidden_size) * cfg.vision_layers_used
    n_proj_layers = parse_projector_type(cfg.projector_type)
    proj_params = v.hidden_size * t.hidden_size + (n_proj_layers - 1) * t.hidden_size * t.hidden_size
    projector = (6 if projector_trainable else 2) * proj_params * images * cfg.tokens_per_image
    decoder = (6 if llm_trainable else 4) * _decoder_matmul_params(cfg) * batch * seq_len
    d_attn = t.num_heads * t.resolved_head_dim
    attention_fwd = 2 * seq_len * seq_len * d_attn * t.num_layers * batch  # causal half of 4*T^2*d
    return float(tower + projector + decoder + 3 * attention_fwd)
