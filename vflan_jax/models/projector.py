"""The vision-language projector: `linear` or `mlp{N}x_gelu` (LLaVA's builder, docs/REFERENCE.md §1.2)."""
from __future__ import annotations

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp


def parse_projector_type(name: str) -> int:
    """Number of Linear layers: 'linear' -> 1, 'mlp2x_gelu' -> 2."""
    if name == "linear":
        return 1
    match = re.fullmatch(r"mlp(\d+)x_gelu", name)
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"projector_type={name!r}: use 'linear' or 'mlp<N>x_gelu' (e.g. 'mlp2x_gelu')")
    return int(match.group(1))


def _torch_linear_bias_init(key, shape, dtype, fan_in: int):
    # PyTorch nn.Linear default, which the LLaVA pretraining stage starts from (docs/REFERENCE.md §4.1).
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class Projector(nn.Module):
    """Linear -> (GELU -> Linear) x (N-1), exact erf GELU as torch nn.GELU()."""
    projector_type: str
    out_features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        depth = parse_projector_type(self.projector_type)
        kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")  # torch kaiming_uniform(a=sqrt(5))
        for i in range(depth):
            if i:
                x = jax.nn.gelu(x, approximate=False)
            fan_in = x.shape[-1]
            axes = ("projector_in", "mlp") if i == 0 else ("mlp", "embed")
            if depth == 1:
                axes = ("projector_in", "embed")
            x = nn.Dense(self.out_features, dtype=self.dtype, param_dtype=self.param_dtype, name=f"linear_{i + 1}",
                         kernel_init=nn.with_logical_partitioning(kernel_init, axes),
                         bias_init=nn.with_logical_partitioning(
                             lambda k, s, d, f=fan_in: _torch_linear_bias_init(k, s, d, f), axes[1:]))(x)
        return x
