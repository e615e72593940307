"""CLIP vision transformer, as LLaVA uses it (docs/REFERENCE.md §1.1).

conv patch embedding (no bias) + class and position embeddings -> pre_layrnorm -> pre-LN
encoder layers with quick_gelu. LLaVA reads an intermediate hidden state (layer -2), so the
layers after it are never computed; their parameters (and post_layernorm) still exist so that
an exported checkpoint is complete.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vflan_jax.models.config import VisionConfig
from vflan_jax.models.scan import scanned_stack

_init = nn.initializers.normal(stddev=0.02)


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


def _dense(features: int, axes: tuple[str, str], dtype, param_dtype, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=True, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(_init, axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))


def _layer_norm(eps: float, dtype, param_dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


class CLIPEncoderLayer(nn.Module):
    config: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_impl: str | None

    @nn.compact
    def __call__(self, h, _unused=None):
        c = self.config
        x = _layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype, "layer_norm1")(h)
        h = h + CLIPAttention(c, self.dtype, self.param_dtype, self.attention_impl, name="self_attn")(x)
        x = _layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype, "layer_norm2")(h)
        x = CLIPMLP(c, self.dtype, self.param_dtype, name="mlp")(x)
        return h + x, None


class CLIPAttention(nn.Module):
    config: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_impl: str | None

    @nn.compact
    def __call__(self, x):
        c = self.config
        b, t, d = x.shape
        shape = (b, t, c.num_heads, c.head_dim)
        def proj(name, axes):
            return _dense(d, axes, self.dtype, self.param_dtype, name)

        q = proj("q_proj", ("vision_embed", "vision_heads"))(x).reshape(shape)
        k = proj("k_proj", ("vision_embed", "vision_heads"))(x).reshape(shape)
        v = proj("v_proj", ("vision_embed", "vision_heads"))(x).reshape(shape)
        out = jax.nn.dot_product_attention(q, k, v, scale=c.head_dim ** -0.5, implementation=self.attention_impl)
        return proj("out_proj", ("vision_heads", "vision_embed"))(out.reshape(b, t, d))


class CLIPMLP(nn.Module):
    config: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        c = self.config
        act = quick_gelu if c.hidden_act == "quick_gelu" else (lambda y: jax.nn.gelu(y, approximate=False))
        x = _dense(c.intermediate_size, ("vision_embed", "vision_mlp"), self.dtype, self.param_dtype, "fc1")(x)
        x = nn.with_logical_constraint(act(x), ("act_batch", "act_length", "act_mlp"))
        return _dense(c.hidden_size, ("vision_mlp", "vision_embed"), self.dtype, self.param_dtype, "fc2")(x)


class CLIPEmbeddings(nn.Module):
    config: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, pixel_values):
        """pixel_values: [N, 3, H, W] (HF layout) -> [N, 1 + patches, D]."""
        c = self.config
        x = jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(self.dtype)  # NCHW -> NHWC
        patches = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size),
                          padding="VALID", use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                          kernel_init=nn.with_logical_partitioning(
                              _init, ("patch_h", "patch_w", "channels", "vision_embed")),
                          name="patch_embedding")(x)
        n = patches.shape[0]
        patches = patches.reshape(n, -1, c.hidden_size)  # row-major over the grid, as torch flatten(2)
        cls = self.param("class_embedding", nn.with_logical_partitioning(_init, ("vision_embed",)),
                         (c.hidden_size,), self.param_dtype)
        cls = jnp.broadcast_to(cls.astype(self.dtype), (n, 1, c.hidden_size))
        pos = self.param("position_embedding", nn.with_logical_partitioning(_init, ("positions", "vision_embed")),
                         (c.num_patches + 1, c.hidden_size), self.param_dtype)
        return jnp.concatenate([cls, patches], axis=1) + pos.astype(self.dtype)[None]


class CLIPVisionTower(nn.Module):
    """Returns the hidden state after `layers_used` encoder layers (HF hidden_states[layers_used])."""
    config: VisionConfig
    layers_used: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat_policy: str = "none"
    attention_impl: str | None = "xla"

    def _stack(self, length: int, name: str):
        stack = scanned_stack(CLIPEncoderLayer, length=length, remat_policy=self.remat_policy, num_broadcast_args=0)
        return stack(self.config, self.dtype, self.param_dtype, self.attention_impl, name=name)

    @nn.compact
    def __call__(self, pixel_values):
        c = self.config
        h = CLIPEmbeddings(c, self.dtype, self.param_dtype, name="embeddings")(pixel_values)
        h = _layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype, "pre_layrnorm")(h)  # sic, HF's name
        h = nn.with_logical_constraint(h, ("act_batch", "act_length", "act_embed"))
        if self.layers_used:
            h, _ = self._stack(self.layers_used, "layers")(h)
        unused = c.num_layers - self.layers_used
        if self.is_initializing():
            # Create (never compute afterwards) the weights LLaVA does not use, so exports are complete.
            tail = h
            if unused:
                tail, _ = self._stack(unused, "unused_layers")(tail)
            _layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype, "post_layernorm")(tail[:, 0])
        return h
