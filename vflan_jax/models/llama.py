"""LLaMA-2 / Vicuna decoder (recipe §1.3) with packed-sequence attention and a KV cache.

Attention is restricted by an explicit boolean mask built once per forward from segment ids
(examples packed in one row never see each other) and token order (causal). The same mask
path serves decoding: keys then come from a per-layer cache and the mask compares the cache
slot index with the query's write index.
"""
from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vflan_jax.models.config import TextConfig
from vflan_jax.models.scan import scanned_stack

_init = nn.initializers.normal(stddev=0.02)


class KVCache(NamedTuple):
    """Decoding state. k/v: [layers, B, S, kv_heads, head_dim]; segment_ids: [B, S] (0 = empty or pad);
    index: scalar int32, the slot the next token is written to (rows are left-padded to align)."""
    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    index: jax.Array

    @classmethod
    def zeros(cls, config: TextConfig, batch: int, max_len: int, dtype) -> "KVCache":
        shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.resolved_head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))


def _dense(features: int, axes: tuple[str, str], dtype, param_dtype, name: str | None = None) -> nn.Dense:
    return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(_init, axes))


class RMSNorm(nn.Module):
    """HF LlamaRMSNorm: normalise in float32, cast back, then scale in the compute dtype."""
    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


def rotary_embedding(x, positions, theta: float):
    """HF rotate-half RoPE. x: [B, T, heads, head_dim]; positions: [B, T]."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, head_dim/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def attention_mask(q_segment_ids, kv_segment_ids, q_index, kv_index):
    """[B, 1, T, S] bool: same example and not in the future. Padding (segment 0) attends to
    padding, so no row is fully masked (which would give NaN); its outputs carry no loss."""
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    causal = kv_index[:, None, :] <= q_index[:, :, None]
    return (same & causal)[:, None]


class LlamaAttention(nn.Module):
    config: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_impl: str | None

    @nn.compact
    def __call__(self, x, positions, mask, cache_index=None, layer_cache=None):
        c = self.config
        b, t, d = x.shape
        hd = c.resolved_head_dim
        q = _dense(c.num_heads * hd, ("embed", "heads"), self.dtype, self.param_dtype, "q_proj")(x)
        k = _dense(c.num_kv_heads * hd, ("embed", "kv_heads"), self.dtype, self.param_dtype, "k_proj")(x)
        v = _dense(c.num_kv_heads * hd, ("embed", "kv_heads"), self.dtype, self.param_dtype, "v_proj")(x)
        q = nn.with_logical_constraint(q.reshape(b, t, c.num_heads, hd), ("act_batch", "act_length", "act_heads", None))
        k = nn.with_logical_constraint(k.reshape(b, t, c.num_kv_heads, hd), ("act_batch", "act_length", "act_kv_heads", None))
        v = v.reshape(b, t, c.num_kv_heads, hd)
        q = rotary_embedding(q, positions, c.rope_theta)
        k = rotary_embedding(k, positions, c.rope_theta)
        new_cache = None
        if layer_cache is not None:
            cache_k, cache_v = layer_cache
            k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, cache_index, 0, 0))
            new_cache = (k, v)
            k, v = k.astype(self.dtype), v.astype(self.dtype)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=hd ** -0.5, implementation=self.attention_impl)
        out = nn.with_logical_constraint(out, ("act_batch", "act_length", "act_heads", None))
        out = _dense(d, ("heads", "embed"), self.dtype, self.param_dtype, "o_proj")(out.reshape(b, t, c.num_heads * hd))
        return out, new_cache


class LlamaMLP(nn.Module):
    config: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        c = self.config
        gate = _dense(c.intermediate_size, ("embed", "mlp"), self.dtype, self.param_dtype, "gate_proj")(x)
        up = _dense(c.intermediate_size, ("embed", "mlp"), self.dtype, self.param_dtype, "up_proj")(x)
        h = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("act_batch", "act_length", "act_mlp"))
        return _dense(c.hidden_size, ("mlp", "embed"), self.dtype, self.param_dtype, "down_proj")(h)


class LlamaDecoderLayer(nn.Module):
    config: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_impl: str | None

    @nn.compact
    def __call__(self, h, positions, mask, cache_index=None, layer_cache=None):
        c = self.config
        norm = lambda name: RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name=name)  # noqa: E731
        attn, new_cache = LlamaAttention(c, self.dtype, self.param_dtype, self.attention_impl, name="self_attn")(
            norm("input_layernorm")(h), positions, mask, cache_index, layer_cache)
        h = h + attn
        h = h + LlamaMLP(c, self.dtype, self.param_dtype, name="mlp")(norm("post_attention_layernorm")(h))
        return nn.with_logical_constraint(h, ("act_batch", "act_length", "act_embed")), new_cache


class LlamaModel(nn.Module):
    """Embedding table, decoder stack, final norm and lm_head. Call `embed` then `decode`
    so that the VLM can write image features between the two."""
    config: TextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat_policy: str = "none"
    attention_impl: str | None = "xla"

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                     embedding_init=nn.with_logical_partitioning(_init, ("vocab", "embed")))
        self.layers = scanned_stack(LlamaDecoderLayer, length=c.num_layers, remat_policy=self.remat_policy,
                                    num_broadcast_args=3, scan_cache=True)(
            c, self.dtype, self.param_dtype, self.attention_impl)
        self.norm = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = _dense(c.vocab_size, ("embed", "vocab"), self.dtype, self.param_dtype)

    def embed(self, input_ids):
        # Ids outside the table (LLaVA's -200 image placeholder) embed as row 0; the VLM
        # overwrites those positions with image features.
        safe = jnp.where((input_ids >= 0) & (input_ids < self.config.vocab_size), input_ids, 0)
        return self.embed_tokens(safe)

    def decode(self, h, positions, segment_ids, cache: KVCache | None = None):
        """h: [B, T, D] input embeddings -> (logits [B, T, vocab], updated cache or None)."""
        b, t, _ = h.shape
        q_index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if cache is None:
            mask = attention_mask(segment_ids, segment_ids, q_index, q_index)
            layer_cache, cache_index = None, None
        else:
            kv_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32),
                                                       (0, cache.index))
            kv_index = jnp.broadcast_to(jnp.arange(kv_segments.shape[1], dtype=jnp.int32), kv_segments.shape)
            mask = attention_mask(segment_ids, kv_segments, q_index + cache.index, kv_index)
            layer_cache, cache_index = (cache.k, cache.v), cache.index
        h = nn.with_logical_constraint(h, ("act_batch", "act_length", "act_embed"))
        h, new_layer_cache = self.layers(h, positions, mask, cache_index, layer_cache)
        h = self.norm(h)
        if self.config.tie_word_embeddings:
            logits = self.embed_tokens.attend(h)
        else:
            logits = self.lm_head(h)
        logits = nn.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))
        new_cache = None
        if cache is not None:
            new_cache = KVCache(new_layer_cache[0], new_layer_cache[1], kv_segments, cache.index + t)
        return logits, new_cache

    def __call__(self, input_ids, positions, segment_ids, cache: KVCache | None = None):
        return self.decode(self.embed(input_ids), positions, segment_ids, cache)
