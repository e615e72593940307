"""lm_head + token cross-entropy in chunks over the tokens, with its own backward.

The plain path materialises [B, T, vocab] float32 logits, and its autodiff backward keeps them,
a softmax of the same size and (in optax) the gradient through a one-hot. Here each chunk of
`chunk_size` tokens computes its logits and log-sum-exp; peak extra memory is one [chunk_size, vocab]
block. Same loss and gradients as optax.softmax_cross_entropy_with_integer_labels on the full
logits (tests/train/test_chunked_loss.py).

Two outputs, two backward strategies, chosen when tracing (symbolic zeros tell which output is
differentiated; the undifferentiated forward, evaluation, computes the losses alone):
- `total`, the weighted sum of the token losses, is what training differentiates. Its gradient is
  one scalar cotangent times a fixed tensor, so the forward forms each chunk's
  d_logits = (softmax - onehot(target)) * weight while the chunk's logits are in hand and does the
  two lm_head-gradient matmuls there: 3 vocab-sized matmuls in all. The backward only scales the
  kept d_hidden [N, D] and d_lm_head [D, vocab] by the cotangent.
- `losses`, per token: a per-token cotangent g does not factor out of d_lm_head = sum_t h_t (p_t -
  e_t) g_t, so this backward keeps one log-sum-exp per token and recomputes each chunk's logits
  (4 vocab-sized matmuls).
The target column is decremented by a scatter, never through a one-hot.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from vflan_jax.constants import IGNORE_INDEX


def _chunks(x, n_chunks: int):
    return x.reshape(n_chunks, x.shape[0] // n_chunks, *x.shape[1:])


def _chunk_logits(h, w):
    return jnp.dot(h, w, preferred_element_type=jnp.float32)


def _chunk_forward(hc, tc, w):
    """-> (softmax [n, vocab] f32, log-sum-exp [n], cross-entropy [n]); one exp pass over the logits."""
    logits = _chunk_logits(hc, w)
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - m)
    s = jnp.sum(e, axis=-1, keepdims=True)
    lse = (m + jnp.log(s))[:, 0]
    return e / s, lse, lse - jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]


def _d_logits(probs, tc, g, dtype):
    """(softmax - onehot(target)) * g per token, in the matmul dtype."""
    d = (probs * g[:, None]).at[jnp.arange(tc.shape[0]), tc].add(-g)
    return d.astype(dtype)


def _lm_head_grads(hc, w, d_logits):
    """-> (d_hidden [n, D] in hidden's dtype, d_lm_head [D, vocab] f32) of one chunk."""
    dh = jnp.dot(d_logits, w.T, preferred_element_type=jnp.float32).astype(hc.dtype)
    return dh, jnp.dot(hc.T, d_logits, preferred_element_type=jnp.float32)


def _losses(h, w, targets, n_chunks):
    def one(_, xs):
        _, lse, ce = _chunk_forward(*xs, w)
        return None, (ce, lse)

    _, (ce, lse) = jax.lax.scan(one, None, (_chunks(h, n_chunks), _chunks(targets, n_chunks)))
    return ce.reshape(-1), lse


def _losses_and_total_grads(h, w, targets, weights, n_chunks):
    """The losses and d(sum weights * losses)/d(h, w), each chunk's gradient formed with its logits."""
    def one(dw, xs):
        hc, tc, wc = xs
        probs, lse, ce = _chunk_forward(hc, tc, w)
        dh, dw_c = _lm_head_grads(hc, w, _d_logits(probs, tc, wc, h.dtype))
        return dw + dw_c, (ce, lse, dh)

    xs = (_chunks(h, n_chunks), _chunks(targets, n_chunks), _chunks(weights, n_chunks))
    dw, (ce, lse, dh) = jax.lax.scan(one, jnp.zeros(w.shape, jnp.float32), xs)
    return ce.reshape(-1), lse, dh.reshape(h.shape), dw


def _token_grads(h, w, targets, lse, g, n_chunks):
    """d(sum g * losses)/d(h, w) for any per-token cotangent g: recomputes each chunk's logits."""
    def one(dw, xs):
        hc, tc, lse_c, gc = xs
        probs = jnp.exp(_chunk_logits(hc, w) - lse_c[:, None])
        dh, dw_c = _lm_head_grads(hc, w, _d_logits(probs, tc, gc, h.dtype))
        return dw + dw_c, dh

    xs = (_chunks(h, n_chunks), _chunks(targets, n_chunks), lse, _chunks(g, n_chunks))
    dw, dh = jax.lax.scan(one, jnp.zeros(w.shape, jnp.float32), xs)
    return dh.reshape(h.shape), dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ce(h, w, targets, weights, n_chunks):
    ce, _ = _losses(h, w, targets, n_chunks)
    return ce, jnp.sum(ce * weights)


def _ce_fwd(h, w, targets, weights, n_chunks):
    h, w, targets, weights = h.value, w.value, targets.value, weights.value
    ce, lse, dh, dw = _losses_and_total_grads(h, w, targets, weights, n_chunks)
    # Residuals the backward leaves unused (the per-token path's, or a frozen lm_head's gradient) are
    # dead code XLA removes (tests/train/test_chunked_loss.py counts the matmuls that remain).
    return (ce, jnp.sum(ce * weights)), (h, w, targets, weights, lse, dh, dw)


def _ce_bwd(n_chunks, res, cts):
    with jax.named_scope("lm_head_cross_entropy"):  # names the ops in profiles
        h, w, targets, weights, lse, dh_total, dw_total = res
        d_ce, d_total = cts
        if isinstance(d_ce, SymbolicZero):
            if isinstance(d_total, SymbolicZero):
                return None, None, None, None
            return (dh_total * d_total).astype(h.dtype), (dw_total * d_total).astype(w.dtype), None, None
        g = d_ce if isinstance(d_total, SymbolicZero) else d_ce + d_total * weights
        dh, dw = _token_grads(h, w, targets, lse, g, n_chunks)
        return dh, dw.astype(w.dtype), None, None


_ce.defvjp(_ce_fwd, _ce_bwd, symbolic_zeros=True)


def chunked_cross_entropy(hidden, lm_head, targets, chunk_size: int):
    """Per-token cross-entropy of logits = hidden @ lm_head, in float32, 0 where targets == -100.

    hidden: [B, T, D] final (normed) hidden states; lm_head: [D, vocab], cast to hidden's dtype
    (as nn.Dense does); targets: [B, T] int -> (losses [B, T] float32, weights [B, T] float32,
    total = losses.sum()). Differentiate `total` (3 vocab-sized matmuls) rather than `losses`
    (4: per-token cotangents need the logits recomputed)."""
    b, t, d = hidden.shape
    n = b * t
    chunk = min(chunk_size, n)
    pad = (-n) % chunk
    weights = (targets != IGNORE_INDEX).astype(jnp.float32)
    flat_h = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0)))
    flat_t = jnp.pad(jnp.where(targets == IGNORE_INDEX, 0, targets).reshape(n).astype(jnp.int32), (0, pad))
    flat_w = jnp.pad(weights.reshape(n), (0, pad))
    with jax.named_scope("lm_head_cross_entropy"):
        ce, total = _ce(flat_h, lm_head.astype(hidden.dtype), flat_t, flat_w, (n + pad) // chunk)
    return ce[:n].reshape(b, t) * weights, weights, total
