"""The two compiled programs of generation: `prefill` (vision tower + prompt -> KV cache and
first token) and `decode` (a while_loop of single-token steps until a token budget or until
every row has finished).

Shapes: prefill compiles once per (batch bucket, prompt bucket, images per row, token buffer);
decode once per (batch bucket, cache length, token buffer). The token budget `limit` is a
traced scalar, so the host can run decode in short stretches (to check stop strings) or in
one go with no recompilation. Finished rows keep stepping (their writes are pad tokens) so the
batch stays rectangular; they never influence other rows because attention is per row.
"""
from __future__ import annotations

import collections
import functools
from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vflan_jax.inference.sampling import SamplingParams, next_token
from vflan_jax.models.config import ModelConfig
from vflan_jax.models.llama import KVCache, LlamaModel, RMSNorm, unstack_layers
from vflan_jax.models.llava import LlavaForConditionalGeneration


class DecodeState(NamedTuple):
    cache: KVCache
    tokens: jax.Array          # int32 [B, N]: generated ids; pad after a row finishes
    step: jax.Array            # int32 scalar: tokens generated so far (all rows in lockstep)
    finished: jax.Array        # bool [B]
    prompt_lengths: jax.Array  # int32 [B]: position of generated token t is prompt_length + t
    row_keys: jax.Array        # [B] PRNG keys, one stream per row (batch-composition independent)


def _last_position_only(next_fun, args, kwargs, context):
    """Flax method interceptor for prefill, which needs logits of the last column only: slice the
    hidden states entering the final norm, so [B, T, vocab] logits (1 GB at B=16, T=512, vocab
    32k) are never formed. Left padding puts every row's last prompt token in that column."""
    module = context.module
    if (context.method_name == "__call__" and isinstance(module, RMSNorm) and module.name == "norm"
            and isinstance(module.parent, LlamaModel)):
        return next_fun(args[0][:, -1:], *args[1:], **kwargs)
    return next_fun(*args, **kwargs)


def _row_keys_at(row_keys, step):
    return jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)


MAX_EOS_IDS = 4  # EOS ids travel as a fixed-size traced array (unused slots -1): no recompilation


def eos_array(eos_ids: Sequence[int]) -> np.ndarray:
    if len(eos_ids) > MAX_EOS_IDS:
        raise ValueError(f"at most {MAX_EOS_IDS} EOS ids are supported, got {list(eos_ids)}")
    return np.asarray(list(eos_ids) + [-1] * (MAX_EOS_IDS - len(eos_ids)), np.int32)


class CompiledDecoder:
    """The jitted programs for one model config, shared by every Generator of that config
    (`for_config`), so that several generators (one per benchmark, say) compile once.
    `trace_counts` counts how often each program was traced, i.e. compiled."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self.model = LlavaForConditionalGeneration(config)
        self.trace_counts: collections.Counter = collections.Counter()
        self.prefill = jax.jit(self._prefill, static_argnames=("num_new",))
        self.decode = jax.jit(self._decode, donate_argnums=(1,))

    @staticmethod
    @functools.lru_cache(maxsize=8)
    def for_config(config: ModelConfig) -> "CompiledDecoder":
        return CompiledDecoder(config)

    def prepare_params(self, params):
        """The parameter layout the compiled programs run fastest on. On CPU, the stacked decoder
        layers are split into per-layer arrays once, here: XLA:CPU copies a weight sliced out of
        the stack before each matmul, every step, and does not hoist the slice out of the decode
        loop (~10% of a `small` step at batch 1, plus ~57 ms per call when done per call). On
        accelerators the stacked layout is kept (no second copy of the weights)."""
        if jax.default_backend() != "cpu":
            return params
        lm = params["language_model"]
        if isinstance(lm["layers"], tuple):
            return params
        return {**params, "language_model": unstack_layers(lm, self.config.text.num_layers)}

    def _finish(self, tok, finished, eos_ids):
        tok = jnp.where(finished, self.config.text.pad_token_id, tok)
        return tok, finished | jnp.any(tok[:, None] == eos_ids[None, :], axis=1)

    def _prefill(self, params, input_ids, pixel_values, image_mask, positions, segment_ids, prompt_lengths,
                 finished, row_keys, sampling: SamplingParams, eos_ids, *, num_new: int):
        self.trace_counts["prefill"] += 1  # runs only while tracing, i.e. once per compilation
        b, t = input_ids.shape
        dtype = jnp.dtype(self.config.dtype)
        cache = KVCache.zeros(self.config.text, b, t + num_new, dtype)
        with nn.intercept_methods(_last_position_only):
            logits, cache = self.model.apply({"params": params}, input_ids, pixel_values, image_mask, positions,
                                             segment_ids, cache)
        tok = next_token(logits[:, -1], _row_keys_at(row_keys, 0), sampling)
        tok, finished = self._finish(tok, finished, eos_ids)
        tokens = jnp.full((b, num_new), self.config.text.pad_token_id, jnp.int32).at[:, 0].set(tok)
        return DecodeState(cache, tokens, jnp.int32(1), finished, prompt_lengths, row_keys)

    def _decode(self, params, state: DecodeState, limit, sampling: SamplingParams, eos_ids):
        self.trace_counts["decode"] += 1
        b = state.tokens.shape[0]
        limit = jnp.minimum(limit, state.tokens.shape[1])

        def keep_going(s: DecodeState):
            return (s.step < limit) & ~jnp.all(s.finished)

        def one_token(s: DecodeState):
            prev = jax.lax.dynamic_slice_in_dim(s.tokens, s.step - 1, 1, axis=1)
            positions = (s.prompt_lengths + s.step - 1)[:, None]
            logits, cache = self.model.apply({"params": params}, prev, None, None, positions,
                                             jnp.ones((b, 1), jnp.int32), s.cache)
            tok = next_token(logits[:, 0], _row_keys_at(s.row_keys, s.step), sampling)
            tok, finished = self._finish(tok, s.finished, eos_ids)
            tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, tok[:, None], s.step, axis=1)
            return s._replace(cache=cache, tokens=tokens, step=s.step + 1, finished=finished)

        return jax.lax.while_loop(keep_going, one_token, state)
