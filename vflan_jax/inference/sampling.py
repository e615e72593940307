"""Next-token choice: greedy, or temperature / top-k / top-p sampling.

Every knob is a traced scalar, so one compiled decode loop serves all settings; greedy
(temperature <= 0) skips the sort entirely through lax.cond. Order as in transformers'
logits warpers: temperature, then top-k, then top-p on the renormalised survivors.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SamplingParams(NamedTuple):
    temperature: jax.Array  # float32 scalar; <= 0 means greedy
    top_p: jax.Array        # float32 scalar; >= 1 keeps everything
    top_k: jax.Array        # int32 scalar; <= 0 keeps everything

    @classmethod
    def create(cls, temperature: float, top_p: float, top_k: int) -> "SamplingParams":
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got temperature={temperature}, "
                             f"top_p={top_p}, top_k={top_k}")
        return cls(jnp.float32(temperature), jnp.float32(top_p), jnp.int32(top_k))


def _filtered_sample(logits, keys, p: SamplingParams):
    x = logits.astype(jnp.float32) / jnp.maximum(p.temperature, 1e-6)
    order = jnp.argsort(-x, axis=-1, stable=True)  # descending; ties keep the lowest id, like argmax
    sorted_x = jnp.take_along_axis(x, order, axis=-1)
    rank = jnp.arange(x.shape[-1])
    keep = (p.top_k <= 0) | (rank < p.top_k)
    sorted_x = jnp.where(keep, sorted_x, -jnp.inf)
    probs = jax.nn.softmax(sorted_x, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The most likely token always survives; top_p >= 1 must not drop the tail to cumsum rounding.
    keep = keep & ((mass_before < p.top_p) | (p.top_p >= 1.0) | (rank == 0))
    sorted_x = jnp.where(keep, sorted_x, -jnp.inf)
    choice = jax.vmap(jax.random.categorical)(keys, sorted_x)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def next_token(logits, keys, params: SamplingParams):
    """logits [B, V]; keys [B] PRNG keys (one stream per row) -> token ids [B] int32."""
    return jax.lax.cond(params.temperature > 0,
                        lambda: _filtered_sample(logits, keys, params),
                        lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32))
