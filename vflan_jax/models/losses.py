"""lm_head + token cross-entropy in chunks over the tokens, with its own backward.

The plain path materialises [B, T, vocab] float32 logits, and its autodiff backward keeps them,
a softmax of the same size and (in optax) the gradient through a one-hot. Here each chunk of
`chunk_size` tokens computes its logits, log-sum-exp and target logit, and keeps only the
log-sum-exp (one float per token); the backward recomputes the chunk's logits and forms
d_logits = softmax - onehot(target) in place (the target column is decremented by a scatter,
never a one-hot), then the two matmuls of the lm_head gradient. Peak extra memory is one
[chunk_size, vocab] block. Same loss and gradients as
optax.softmax_cross_entropy_with_integer_labels on the full logits (tests/train/test_chunked_loss.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vflan_jax.models.config import IGNORE_INDEX


def _chunks(x, n_chunks: int):
    return x.reshape(n_chunks, x.shape[0] // n_chunks, *x.shape[1:])


def _chunk_logits(h, w):
    return jnp.dot(h, w, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _token_ce(h, w, targets, n_chunks):
    return _token_ce_fwd(h, w, targets, n_chunks)[0]


def _token_ce_fwd(h, w, targets, n_chunks):
    def one(_, xs):
        hc, tc = xs
        logits = _chunk_logits(hc, w)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
        return None, (lse - target_logit, lse)

    _, (ce, lse) = jax.lax.scan(one, None, (_chunks(h, n_chunks), _chunks(targets, n_chunks)))
    return ce.reshape(-1), (h, w, targets, lse)


def _token_ce_bwd(n_chunks, res, d_ce):
    with jax.named_scope("lm_head_cross_entropy"):  # names the ops in profiles
        return _token_ce_grads(n_chunks, res, d_ce)


def _token_ce_grads(n_chunks, res, d_ce):
    h, w, targets, lse = res

    def one(dw, xs):
        hc, tc, lse_c, g = xs
        probs = jnp.exp(_chunk_logits(hc, w) - lse_c[:, None])
        d_logits = probs * g[:, None]
        d_logits = d_logits.at[jnp.arange(tc.shape[0]), tc].add(-g)
        d_logits = d_logits.astype(h.dtype)
        dh = jnp.dot(d_logits, w.T, preferred_element_type=jnp.float32).astype(h.dtype)
        dw = dw + jnp.dot(hc.T, d_logits, preferred_element_type=jnp.float32)
        return dw, dh

    xs = (_chunks(h, n_chunks), _chunks(targets, n_chunks), lse, _chunks(d_ce, n_chunks))
    dw, dh = jax.lax.scan(one, jnp.zeros(w.shape, jnp.float32), xs)
    return dh.reshape(h.shape), dw.astype(w.dtype), None


_token_ce.defvjp(_token_ce_fwd, _token_ce_bwd)


def chunked_cross_entropy(hidden, lm_head, targets, chunk_size: int):
    """Per-token cross-entropy of logits = hidden @ lm_head, in float32, 0 where targets == -100.

    hidden: [B, T, D] final (normed) hidden states; lm_head: [D, vocab], cast to hidden's dtype
    (as nn.Dense does); targets: [B, T] int -> (losses [B, T] float32, weights [B, T] float32)."""
    b, t, d = hidden.shape
    n = b * t
    chunk = min(chunk_size, n)
    pad = (-n) % chunk
    weights = (targets != IGNORE_INDEX).astype(jnp.float32)
    flat_h = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0)))
    flat_t = jnp.pad(jnp.where(targets == IGNORE_INDEX, 0, targets).reshape(n).astype(jnp.int32), (0, pad))
    with jax.named_scope("lm_head_cross_entropy"):
        ce = _token_ce(flat_h, lm_head.astype(hidden.dtype), flat_t, (n + pad) // chunk)[:n].reshape(b, t)
    return ce * weights, weights
