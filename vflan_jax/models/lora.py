"""LoRA (Hu et al. 2021) on the decoder's projections, optionally over a quantized frozen base (QLoRA).

    y = x W + (alpha / rank) * (x A) B        A: [in, rank], B: [rank, out]

W is frozen (optim.trainable_mask never trains it), so the backward pass computes no gradient for
it, only through it. A is drawn as PEFT draws lora_A (kaiming-uniform, a=sqrt(5): U(+-1/sqrt(in))),
B starts at zero, so a fresh adapter leaves the model unchanged. A and B are float32 and shard like
their base layer: A over the base's input axis, B over its output axis.

Dropout (`dropout` > 0) acts as PEFT's lora_dropout: on the adapter's input only,
(alpha / rank) * (dropout(x) A) B, each projection with its own mask, kept values scaled by 1 / (1 - p).
It is drawn only when the caller passes a "dropout" RNG, which only the train step does (train/step.py);
evaluation, generation and export pass none and are deterministic.

The base may be stored quantized and dequantized on the fly inside the matmul's fusion:
  int8: symmetric per output channel, `kernel` int8 [in, out] + `kernel_scale` float32 [out];
  nf4:  QLoRA's 4-bit NormalFloat (Dettmers et al. 2023) in blocks of `block_size` inputs per
        output, two codes per byte: `kernel` uint8 [in/2, out] + `kernel_scale` float32 [in/block, out].

Why not Qwix: it intercepts dot_generals by module path, and the KV-cache decode applies the
decoder layer unbound (models/llama.py `_cached_layers`), where the paths differ, so adapters would
be silently dropped in generation; and the converter would have to follow its internal storage.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# The decoder's projections (models/llama.py names) and their parameter paths in the VLM.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
DEFAULT_TARGETS = (r"language_model/layers/(self_attn|mlp)/",)   # every attention and MLP projection
QUANTIZE = ("none", "int8", "nf4")
# QLoRA's NF4 code book (bitsandbytes' table: quantiles of N(0, 1) scaled to [-1, 1], exact zero).
NF4_TABLE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
_NF4_MIDPOINTS = (NF4_TABLE[1:] + NF4_TABLE[:-1]) / 2


def kernel_path(name: str) -> str:
    return f"language_model/layers/{PARENT[name]}/{name}/kernel"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """targets: the projection names that get adapters (resolved from the config's regexes)."""
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = PROJECTIONS
    quantize: str = "none"
    block_size: int = 64

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))   # JSON gives lists

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def resolve_targets(patterns: Sequence[str]) -> tuple[str, ...]:
    """Config regexes (searched in the kernels' parameter paths) -> projection names; a regex that
    names no decoder projection is an error, so a typo cannot silently train nothing."""
    names = []
    for pattern in patterns:
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"lora.target_modules: {pattern!r} is not a valid regex ({e})") from None
        hits = [n for n in PROJECTIONS if compiled.search(kernel_path(n))]
        if not hits:
            raise ValueError(f"lora.target_modules: {pattern!r} matches none of the decoder projections "
                             f"{[kernel_path(n) for n in PROJECTIONS]}")
        names += [n for n in hits if n not in names]
    return tuple(n for n in PROJECTIONS if n in names)


def default_lora_config():
    """The trainer config's `lora` block (rank 0: off). LLaVA-1.5's LoRA recipe: rank 128, alpha 256,
    dropout 0.05 (recipes.use_lora)."""
    import ml_collections
    c = ml_collections.ConfigDict()
    c.rank = 0
    c.alpha = 16.0
    c.dropout = 0.0                      # on the adapters' input, in training only (PEFT's lora_dropout)
    c.target_modules = DEFAULT_TARGETS   # regexes searched in the kernels' paths, e.g. "self_attn/(q|v)_proj"
    c.quantize = "none"                  # the frozen base: none | int8 | nf4 (QLoRA)
    c.block_size = 64                    # nf4 inputs per scale
    return c


def lora_config_from(c) -> LoraConfig | None:
    """The trainer config's `lora` block -> LoraConfig (None when rank is 0), every field checked."""
    if not c.rank:
        return None
    def bad(field, msg):
        raise ValueError(f"config lora.{field}: {msg}")
    if not isinstance(c.rank, int) or c.rank < 0:
        bad("rank", f"must be an int >= 0 (0 = off), got {c.rank!r}")
    if not c.alpha or c.alpha <= 0:
        bad("alpha", f"must be > 0, got {c.alpha!r}")
    if not isinstance(c.dropout, (int, float)) or not 0 <= c.dropout < 1:
        bad("dropout", f"must be a probability in [0, 1), got {c.dropout!r}")
    if c.quantize not in QUANTIZE:
        bad("quantize", f"{c.quantize!r} is not one of {QUANTIZE}")
    if c.block_size < 2 or c.block_size % 2:
        bad("block_size", f"must be an even int >= 2, got {c.block_size!r}")
    patterns = (c.target_modules,) if isinstance(c.target_modules, str) else tuple(c.target_modules)
    return LoraConfig(int(c.rank), float(c.alpha), float(c.dropout), resolve_targets(patterns), c.quantize,
                      int(c.block_size))


# --- quantized storage ----------------------------------------------------------------------------------

def quantize(w, method: str, block_size: int = 64) -> tuple[jax.Array, jax.Array]:
    """Float kernel [..., in, out] -> (codes, scale) as stored (see the module docstring)."""
    w = jnp.asarray(w, jnp.float32)
    if method == "int8":
        scale = jnp.max(jnp.abs(w), axis=-2) / 127.0
        scale = jnp.where(scale == 0, 1.0, scale)
        return jnp.clip(jnp.round(w / scale[..., None, :]), -127, 127).astype(jnp.int8), scale
    if method == "nf4":
        *lead, n_in, n_out = w.shape
        if n_in % block_size:
            raise ValueError(f"lora.block_size={block_size} does not divide the input size {n_in}")
        blocks = w.reshape(*lead, n_in // block_size, block_size, n_out)
        scale = jnp.max(jnp.abs(blocks), axis=-2)
        scale = jnp.where(scale == 0, 1.0, scale)
        normed = blocks / scale[..., None, :]
        # Nearest code: count the midpoints below (no [..., 16] temporary the size of 16 kernels).
        codes = jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS), normed).astype(jnp.uint8)
        codes = codes.reshape(*lead, n_in // 2, 2, n_out)
        return codes[..., 0, :] | (codes[..., 1, :] << 4), scale
    raise ValueError(f"quantize {method!r}: use one of {QUANTIZE[1:]}")


def dequantize(codes, scale, method: str, block_size: int = 64, dtype=jnp.float32) -> jax.Array:
    if method == "int8":
        return (codes.astype(jnp.float32) * scale[..., None, :]).astype(dtype)
    *lead, half, n_out = codes.shape
    pairs = jnp.stack([codes & 0xF, codes >> 4], axis=-2).reshape(*lead, 2 * half, n_out)
    values = jnp.asarray(NF4_TABLE)[pairs.astype(jnp.int32)]
    blocks = values.reshape(*lead, 2 * half // block_size, block_size, n_out) * scale[..., None, :]
    return blocks.reshape(*lead, 2 * half, n_out).astype(dtype)


# --- the layer --------------------------------------------------------------------------------------------

def lora_a_init(key, shape, dtype=jnp.float32):
    bound = 1.0 / np.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class LoraDense(nn.Module):
    """A bias-free nn.Dense (same parameter name `kernel`, same maths) plus a LoRA adapter."""
    features: int
    axes: tuple[str, str]
    lora: LoraConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(stddev=0.02)

    @nn.compact
    def __call__(self, x):
        n_in, cfg = x.shape[-1], self.lora
        base = self._base_kernel(n_in)
        a = self.param("lora_a", nn.with_logical_partitioning(lora_a_init, (self.axes[0], None)),
                       (n_in, cfg.rank), jnp.float32)
        b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros, (None, self.axes[1])),
                       (cfg.rank, self.features), jnp.float32)
        x = x.astype(self.dtype)
        y = jnp.dot(x, base)
        delta = jnp.dot(jnp.dot(self._adapter_input(x), a.astype(self.dtype)), b.astype(self.dtype))
        return y + (cfg.scale * delta).astype(y.dtype)

    def _adapter_input(self, x):
        """x with dropout applied in training (a "dropout" RNG given), else x itself."""
        rate = self.lora.dropout
        if rate == 0 or not self.has_rng("dropout"):
            return x
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rate, x.shape)
        self.sow("intermediates", "dropout_keep", keep)   # a no-op unless the caller collects it (tests)
        return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))

    def _base_kernel(self, n_in: int):
        cfg, shape = self.lora, (n_in, self.features)
        if cfg.quantize == "none":
            kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes), shape,
                                self.param_dtype)
            return kernel.astype(self.dtype)
        drawn = {}

        def stored(key):  # one float draw, quantized once, feeds both parameters
            if "q" not in drawn:
                drawn["q"] = quantize(self.kernel_init(key, shape, jnp.float32), cfg.quantize, cfg.block_size)
            return drawn["q"]
        scale_axes = (self.axes[1],) if cfg.quantize == "int8" else self.axes
        codes = self.param("kernel", nn.with_logical_partitioning(lambda k: stored(k)[0], self.axes))
        scale = self.param("kernel_scale", nn.with_logical_partitioning(lambda k: stored(k)[1], scale_axes))
        return dequantize(codes, scale, cfg.quantize, cfg.block_size, self.dtype)


def dense(features: int, axes: tuple[str, str], dtype, param_dtype, name: str | None, lora: LoraConfig | None,
          kernel_init) -> nn.Module:
    """models/llama.py's projection factory: a LoraDense where the config targets `name`, else nn.Dense."""
    if lora is None or name not in lora.targets:
        return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=param_dtype, name=name,
                        kernel_init=nn.with_logical_partitioning(kernel_init, axes))
    return LoraDense(features, axes, lora, dtype, param_dtype, kernel_init, name=name)
