"""The two pieces issue 13 names, jitted alone at the `small` training shapes, old path vs new,
interleaved, best of --repeats: lm_head + cross-entropy ([B*T, 512] @ [512, 32000]) and one
layer's attention core ([4, 1024, 8 heads, 64]), forward and gradient.

    python benchmarks/profile_pieces.py
"""
from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from timing import interleaved_best

from vflan_jax.constants import IGNORE_INDEX
from vflan_jax.models.attention import self_attention
from vflan_jax.models.losses import chunked_cross_entropy


def full_logits_ce(h, w, targets):
    logits = (h @ w).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(targets == IGNORE_INDEX, 0, targets))
    return ce * (targets != IGNORE_INDEX)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq_len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    b, t, d, vocab, heads, hd = args.batch, args.seq_len, 512, 32000, 8, 64
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((d, vocab)) * 0.02, jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, (b, t)), jnp.int32)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, heads, hd)), jnp.float32) for _ in range(3))
    seg = jnp.ones((b, t), jnp.int32)

    losses = {"full logits + optax": full_logits_ce,
              "chunked (1024 tokens)": lambda h, w, tg: chunked_cross_entropy(h, w, tg, 1024)[2]}  # the summed loss
    attns = {impl: (lambda q, k, v, impl=impl: self_attention(q, k, v, seg, impl=impl, scale=hd ** -0.5))
             for impl in ("xla", "blockwise")}
    fns = {}
    for name, f in losses.items():
        fwd = jax.jit(lambda h, w, f=f: jnp.sum(f(h, w, targets)))
        grad = jax.jit(jax.grad(lambda h, w, f=f: jnp.sum(f(h, w, targets)), argnums=(0, 1)))
        fns[("lm_head + cross-entropy", name, "fwd")] = lambda fwd=fwd: jax.block_until_ready(fwd(h, w))
        fns[("lm_head + cross-entropy", name, "grad")] = lambda grad=grad: jax.block_until_ready(grad(h, w))
    for name, f in attns.items():
        fwd = jax.jit(f)
        grad = jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v)), argnums=(0, 1, 2)))
        fns[("attention core, one layer", name, "fwd")] = lambda fwd=fwd: jax.block_until_ready(fwd(q, k, v))
        fns[("attention core, one layer", name, "grad")] = lambda grad=grad: jax.block_until_ready(grad(q, k, v))
    load = os.getloadavg()
    best = interleaved_best(fns, args.repeats)
    print("load average (1, 5, 15 min) before: %.2f %.2f %.2f, after: %.2f %.2f %.2f" % (*load, *os.getloadavg()))
    print("| piece | path | forward s | gradient s |")
    print("|---|---|---|---|")
    for piece, path, part in fns:
        if part == "fwd":
            print(f"| {piece} | {path} | {best[(piece, path, 'fwd')]:.3f} | {best[(piece, path, 'grad')]:.3f} |")


if __name__ == "__main__":
    main()
