"""Training attention kernels against the XLA path (forward and gradients) on packed rows with
several segments and padding, GQA, random inputs; the shared mask against per-example attention."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vflan_jax.models.attention import (
    blockwise_attention,
    cudnn_unsupported_reason,
    resolve_implementation,
    self_attention,
    splash_attention,
)

SCALE = 0.3


def packed_inputs(b, t, heads, kv_heads, hd, seed=0):
    """Rows of 3-4 examples of random lengths followed by random padding (segment 0)."""
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, hd)), jnp.float32) for h in (heads, kv_heads, kv_heads))
    seg = np.zeros((b, t), np.int32)
    for r in range(b):
        end = t - int(rng.integers(1, t // 8))
        cuts = np.sort(rng.choice(np.arange(2, end - 2), size=int(rng.integers(2, 4)), replace=False))
        seg[r, :end] = np.searchsorted(cuts, np.arange(end), side="right") + 1
    return q, k, v, jnp.asarray(seg)


def value_and_grads(attend, q, k, v):
    """A random linear read-out of the output, so every output element gets its own cotangent."""
    w = jnp.asarray(np.random.default_rng(99).standard_normal((q.shape)), jnp.float32)
    return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v) * w), argnums=(0, 1, 2)))(q, k, v)


def assert_same(ours, ref, atol=2e-5):
    (lo, go), (lr, gr) = ours, ref
    np.testing.assert_allclose(lo, lr, rtol=1e-5)
    for name, a, b in zip("qkv", go, gr, strict=True):
        np.testing.assert_allclose(a, b, atol=atol, rtol=1e-4, err_msg=f"d{name}")


def xla(q, k, v, seg):
    return self_attention(q, k, v, seg, impl="xla", scale=SCALE)


def test_shared_mask_equals_attending_each_example_alone():
    q, k, v, seg = packed_inputs(2, 64, 4, 2, 8, seed=1)
    out = np.asarray(xla(q, k, v, seg))
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    k, v = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)  # GQA: query heads 2i, 2i+1 share kv head i
    for r in range(2):
        for s in np.unique(np.asarray(seg[r])):
            idx = np.nonzero(np.asarray(seg[r]) == s)[0]
            scores = np.einsum("thd,shd->hts", q[r, idx], k[r, idx]) * SCALE
            scores = np.where(np.tril(np.ones((idx.size, idx.size), bool)), scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            alone = np.einsum("hts,shd->thd", probs / probs.sum(-1, keepdims=True), v[r, idx])
            np.testing.assert_allclose(out[r, idx], alone, atol=1e-5)


@pytest.mark.parametrize("block", [32, 128])  # several query blocks, and a single block
def test_blockwise_matches_xla(block):
    q, k, v, seg = packed_inputs(2, 128, 4, 2, 16, seed=2)
    ours = value_and_grads(lambda q, k, v: blockwise_attention(q, k, v, seg, SCALE, block=block), q, k, v)
    assert_same(ours, value_and_grads(lambda q, k, v: xla(q, k, v, seg), q, k, v))


def test_blockwise_is_what_auto_runs_on_cpu():
    assert resolve_implementation("auto", "cpu") == "blockwise"
    assert resolve_implementation("auto", "tpu") == "splash"
    assert resolve_implementation(None, "gpu") == "cudnn"
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        resolve_implementation("flash")


def test_splash_kernel_in_interpret_mode_matches_xla():
    # The TPU Pallas kernel, run by Pallas' interpreter on CPU; its blocks need multiples of 128.
    q, k, v, seg = packed_inputs(1, 256, 2, 1, 64, seed=3)
    ours = value_and_grads(lambda q, k, v: splash_attention(q, k, v, seg, SCALE, block=128, interpret=True), q, k, v)
    assert_same(ours, value_and_grads(lambda q, k, v: xla(q, k, v, seg), q, k, v))


@pytest.mark.parametrize("impl,length,reason", [
    ("cudnn", 32, "the backend is 'cpu'"),                     # cuDNN off a GPU
    ("splash", 40, "length 40 is not a multiple of 128"),      # blocks cannot tile the row
])
def test_kernel_fallbacks_run_xla_and_say_why(caplog, impl, length, reason):
    q, k, v, seg = packed_inputs(1, length, 4, 2, 8, seed=4)
    with caplog.at_level(logging.WARNING, logger="vflan_jax.models.attention"):
        out = self_attention(q, k, v, seg, impl=impl, scale=SCALE)
    assert f"attention_impl='{impl}' falls back to XLA attention: {reason}" in caplog.text
    np.testing.assert_array_equal(out, xla(q, k, v, seg))


def test_cudnn_needs_half_precision():
    q = jnp.zeros((1, 8, 4, 64), jnp.float32)
    assert "bfloat16" in cudnn_unsupported_reason(q, platform="gpu")
    assert cudnn_unsupported_reason(q.astype(jnp.bfloat16), platform="gpu") is None


def test_splash_kernel_runs_per_shard_under_a_mesh():
    # GSPMD cannot split a Pallas kernel: under a (data 1, fsdp 2, tensor 2) mesh it runs per shard
    # (rows over fsdp, heads over tensor) and must still equal the XLA path.
    import flax.linen as nn

    from vflan_jax.parallel import DEFAULT_RULES, make_mesh
    q, k, v, seg = packed_inputs(2, 128, 4, 2, 64, seed=5)
    ref = value_and_grads(lambda q, k, v: xla(q, k, v, seg), q, k, v)
    with jax.set_mesh(make_mesh((1, 2, 2), jax.devices()[:4])), nn.logical_axis_rules(DEFAULT_RULES):
        ours = value_and_grads(lambda q, k, v: splash_attention(q, k, v, seg, SCALE, interpret=True), q, k, v)
    assert_same(ours, ref)

