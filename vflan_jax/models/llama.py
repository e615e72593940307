"""LLaMA-2 / Vicuna decoder (docs/REFERENCE.md §1.3) with packed-sequence attention and a KV cache.

Attention is restricted by one rule (models/attention.py: same segment id, so examples packed
in one row never see each other, and causal by slot). Training and the cache-free forward pass
the segment ids to models/attention.self_attention (kernel chosen by `attention_impl`); decoding
builds the same rule as a boolean mask over the per-layer cache, comparing the cache slot index
with the query's write index.
"""
from __future__ import annotations

import operator
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vflan_jax.models.attention import attention_mask, self_attention
from vflan_jax.models.config import TextConfig
from vflan_jax.models.lora import dense as lora_dense
from vflan_jax.models.scan import scanned_stack

_init = nn.initializers.normal(stddev=0.02)


class KVCache(NamedTuple):
    """Decoding state. k/v: one [B, kv_heads, S, head_dim] array per layer; segment_ids: [B, S]
    (0 = empty or pad); index: scalar int32, the slot the next token is written to (rows are
    left-padded to align).

    Layout and granularity are for decode speed on XLA (measured on CPU, see docs/PERFORMANCE.md):
    S next to head_dim makes each (row, head) a contiguous [S, hd] matrix, so attention is a
    plain batched matmul over the cache with no transpose; separate arrays per layer (not one
    stacked array) let every layer read and update its cache in place, where slicing a layer
    out of a stacked array copies it, each layer, each step."""
    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    index: jax.Array

    @classmethod
    def zeros(cls, config: TextConfig, batch: int, max_len: int, dtype) -> "KVCache":
        shape = (batch, config.num_kv_heads, max_len, config.resolved_head_dim)
        def zeros():
            return tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))

        # Distinct buffers for k and v: the decode loop donates (updates in place) both.
        return cls(zeros(), zeros(), jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))


def unstack_layers(lm_params, num_layers: int):
    """LlamaModel params with the stacked decoder layers split into a tuple of per-layer trees;
    only the KV-cache path accepts this form (training and init need the stacked one)."""
    layers = tuple(jax.tree.map(operator.itemgetter(i), lm_params["layers"]) for i in range(num_layers))
    return {**lm_params, "layers": layers}


def _dense(features: int, axes: tuple[str, str], dtype, param_dtype, name: str | None = None, lora=None) -> nn.Module:
    # A LoRA adapter (models/lora.py) where text.lora targets this projection, else a plain Dense.
    return lora_dense(features, axes, dtype, param_dtype, name, lora, _init)


def _project(module: nn.Module, features: int, axes: tuple[str, str], name: str, x):
    """The projection `name` of the calling module applied to x [..., D] with the leading axes merged:
    for a [B, T, D] input, XLA:CPU computes the weight gradient through a strided transposing copy of the
    output gradient, the largest single op of the CPU train step (docs/PERFORMANCE.md, "Training step");
    the 2-D matmul needs none. Same parameters and values."""
    layer = _dense(features, axes, module.dtype, module.param_dtype, name, module.config.lora)
    return layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], features)


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


def cached_attention(q, k, v, mask, scale: float):
    """q: [B, T, heads, hd]; k, v: a cache [B, kv_heads, S, hd]; mask: [B, 1, T, S] -> [B, T, heads, hd].

    GQA groups the query heads ([B, T, kv, G, hd]) rather than repeating the keys, so the cache
    is read where it lies, never copied or transposed. Same maths as the XLA implementation of
    jax.nn.dot_product_attention: float32 scores, scaled after the matmul, masked softmax."""
    b, t, h, hd = q.shape
    kv = k.shape[1]
    q = q.reshape(b, t, kv, h // kv, hd)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) * jnp.float32(scale)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bksd->btkgd", probs, v).reshape(b, t, h, hd)


class LlamaAttention(nn.Module):
    config: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_impl: str | None

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache_mask=None, cache_index=None, layer_cache=None):
        """Without a cache: causal self-attention within `segment_ids` [B, T]. With one:
        `cache_mask` [B, 1, T, S] over the cache, written at `cache_index`."""
        c = self.config
        b, t, d = x.shape
        hd = c.resolved_head_dim
        q = _project(self, c.num_heads * hd, ("embed", "heads"), "q_proj", x)
        k = _project(self, c.num_kv_heads * hd, ("embed", "kv_heads"), "k_proj", x)
        v = _project(self, c.num_kv_heads * hd, ("embed", "kv_heads"), "v_proj", x)
        q = nn.with_logical_constraint(q.reshape(b, t, c.num_heads, hd),
                                       ("act_batch", "act_length", "act_heads", None))
        k = nn.with_logical_constraint(k.reshape(b, t, c.num_kv_heads, hd),
                                       ("act_batch", "act_length", "act_kv_heads", None))
        v = v.reshape(b, t, c.num_kv_heads, hd)
        q = rotary_embedding(q, positions, c.rope_theta)
        k = rotary_embedding(k, positions, c.rope_theta)
        if layer_cache is None:
            new_cache = None
            out = self_attention(q, k, v, segment_ids, impl=self.attention_impl, scale=hd ** -0.5)
        else:
            cache_k, cache_v = layer_cache
            # Only the T new [B, kv, T, hd] entries are transposed; the cache is updated in place.
            cache_k = jax.lax.dynamic_update_slice(cache_k, k.transpose(0, 2, 1, 3).astype(cache_k.dtype),
                                                   (0, 0, cache_index, 0))
            cache_v = jax.lax.dynamic_update_slice(cache_v, v.transpose(0, 2, 1, 3).astype(cache_v.dtype),
                                                   (0, 0, cache_index, 0))
            new_cache = (cache_k, cache_v)
            out = cached_attention(q, cache_k.astype(self.dtype), cache_v.astype(self.dtype), cache_mask, hd ** -0.5)
        out = nn.with_logical_constraint(out, ("act_batch", "act_length", "act_heads", None))
        out = _project(self, d, ("heads", "embed"), "o_proj", out.reshape(b, t, c.num_heads * hd))
        return out, new_cache


class LlamaMLP(nn.Module):
    config: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        c = self.config
        gate = _project(self, c.intermediate_size, ("embed", "mlp"), "gate_proj", x)
        up = _project(self, c.intermediate_size, ("embed", "mlp"), "up_proj", x)
        h = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("act_batch", "act_length", "act_mlp"))
        return _project(self, c.hidden_size, ("mlp", "embed"), "down_proj", h)


class LlamaDecoderLayer(nn.Module):
    config: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_impl: str | None

    @nn.compact
    def __call__(self, h, positions, segment_ids, cache_mask=None, cache_index=None, layer_cache=None):
        c = self.config
        def norm(name):
            return RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name=name)

        attn, new_cache = LlamaAttention(c, self.dtype, self.param_dtype, self.attention_impl, name="self_attn")(
            norm("input_layernorm")(h), positions, segment_ids, cache_mask, cache_index, layer_cache)
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
                                    num_broadcast_args=2)(c, self.dtype, self.param_dtype, self.attention_impl)
        self.norm = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = _dense(c.vocab_size, ("embed", "vocab"), self.dtype, self.param_dtype)

    def embed(self, input_ids):
        # Ids outside the table (LLaVA's -200 image placeholder) embed as row 0; the VLM
        # overwrites those positions with image features.
        safe = jnp.where((input_ids >= 0) & (input_ids < self.config.vocab_size), input_ids, 0)
        return self.embed_tokens(safe)

    def decode(self, h, positions, segment_ids, cache: KVCache | None = None, return_hidden: bool = False):
        """h: [B, T, D] input embeddings -> (logits [B, T, vocab], updated cache or None).
        return_hidden: ((final normed hidden states [B, T, D], lm_head matrix [D, vocab]), None)
        instead, for a loss that applies the lm_head itself (models/losses.py)."""
        b, t, _ = h.shape
        q_index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        h = nn.with_logical_constraint(h, ("act_batch", "act_length", "act_embed"))
        new_cache = None
        if cache is None:
            h, _ = self.layers(h, positions, segment_ids)
        else:
            kv_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32),
                                                       (0, cache.index))
            kv_index = jnp.broadcast_to(jnp.arange(kv_segments.shape[1], dtype=jnp.int32), kv_segments.shape)
            mask = attention_mask(segment_ids, kv_segments, q_index + cache.index, kv_index)
            h, k, v = self._cached_layers(h, positions, mask, cache)
            new_cache = KVCache(k, v, kv_segments, cache.index + t)
        h = self.norm(h)
        if return_hidden:
            return (h, self.output_embedding()), new_cache
        if self.config.tie_word_embeddings:
            logits = self.embed_tokens.attend(h)
        else:
            logits = self.lm_head(h)
        logits = nn.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))
        return logits, new_cache

    def output_embedding(self):
        """The lm_head as a [D, vocab] matrix (the embedding table transposed when tied)."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.embedding.T
        return self.lm_head.variables["params"]["kernel"]

    def _cached_layers(self, h, positions, mask, cache: KVCache):
        """The decoder stack with a cache, unrolled over layers (a Python loop) on the scanned
        parameters: inside a scan, each layer's cache would be a dynamic slice of a stacked
        array, which XLA copies (~3x the cost of the attention itself at S=2048).
        The parameters may come pre-split (`unstack_layers`), so that a decode loop slices them
        once, not every step (XLA does not hoist the slices out of the loop)."""
        layers = self.variables["params"]["layers"]
        layer = LlamaDecoderLayer(self.config, self.dtype, self.param_dtype, self.attention_impl, parent=None)
        ks, vs = [], []
        for i in range(self.config.num_layers):
            params = layers[i] if isinstance(layers, tuple) else jax.tree.map(operator.itemgetter(i), layers)
            h, (k, v) = layer.apply({"params": params}, h, positions, None, mask, cache.index, (cache.k[i], cache.v[i]))
            ks.append(k)
            vs.append(v)
        return h, tuple(ks), tuple(vs)

    def __call__(self, input_ids, positions, segment_ids, cache: KVCache | None = None):
        return self.decode(self.embed(input_ids), positions, segment_ids, cache)
