"""Training self-attention over packed rows: one mask definition, four kernels.

A query may see a key when both belong to the same packed example (equal segment ids) and the
key is not later in the row (causal by slot index). `allowed` is that rule; every kernel uses
it: "xla" materialises it as a boolean [B, 1, T, T] mask for jax.nn.dot_product_attention,
"cudnn" hands the same mask to cuDNN's fused kernel, "blockwise" evaluates it per block, and
"splash" expresses it as the kernel's CausalMask + SegmentIds (the same two conditions).
Padding is segment 0 and attends to padding, so no row is fully masked.

Decoding with a KV cache does not come here (llama.cached_attention reads the cache in place).
"""
from __future__ import annotations

import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn", "blockwise")
_MASKED = jnp.finfo(jnp.float32).min


def allowed(q_segment_ids, kv_segment_ids, q_index, kv_index):
    """Broadcasting rule: True where the query may attend to the key."""
    return (q_segment_ids == kv_segment_ids) & (kv_index <= q_index)


def attention_mask(q_segment_ids, kv_segment_ids, q_index, kv_index):
    """[B, 1, T, S] bool from [B, T] / [B, S] segment ids and slot indices."""
    return allowed(q_segment_ids[:, :, None], kv_segment_ids[:, None, :],
                   q_index[:, :, None], kv_index[:, None, :])[:, None]


def resolve_implementation(impl: str | None, platform: str | None = None) -> str:
    """'auto' (or None) -> the kernel for the platform: TPU splash, GPU cuDNN, CPU blockwise.
    Pass `platform` when compiling for a target other than the default backend (AOT)."""
    if impl not in (None, "auto"):
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"attention_impl={impl!r}: use one of {IMPLEMENTATIONS}")
        return impl
    platform = platform or jax.default_backend()
    return {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn", "rocm": "cudnn"}.get(platform, "blockwise")


def self_attention(q, k, v, segment_ids, *, impl: str, scale: float):
    """Causal, segment-restricted self-attention of a packed row.

    q: [B, T, heads, hd]; k, v: [B, T, kv_heads, hd] (GQA when kv_heads < heads);
    segment_ids: [B, T] int (0 = padding) -> [B, T, heads, hd]."""
    impl = resolve_implementation(impl)
    with jax.named_scope("attention_core"):  # names the ops in profiles (benchmarks/profile_train_step.py)
        return _self_attention(q, k, v, segment_ids, impl, scale)


def _self_attention(q, k, v, segment_ids, impl, scale):
    if impl == "blockwise":
        return blockwise_attention(q, k, v, segment_ids, scale)
    if impl == "splash":
        if q.shape[1] % 128 == 0:
            return splash_attention(q, k, v, segment_ids, scale)
        log.warning("attention_impl='splash' falls back to XLA attention: length %d is not a multiple of 128",
                    q.shape[1])
    index = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), segment_ids.shape)
    mask = attention_mask(segment_ids, segment_ids, index, index)
    if impl == "cudnn":
        reason = cudnn_unsupported_reason(q)
        if reason is None:
            return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
        log.warning("attention_impl='cudnn' falls back to XLA attention: %s", reason)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")


def cudnn_unsupported_reason(q, platform: str | None = None) -> str | None:
    """Why cuDNN's fused attention cannot take this call, or None when it can."""
    platform = platform or jax.default_backend()
    if platform != "gpu":
        return f"the backend is {platform!r}, not a GPU"
    if q.dtype not in (jnp.float16, jnp.bfloat16):
        return f"cuDNN flash attention needs float16/bfloat16 inputs, got {q.dtype} (set model.dtype=bfloat16)"
    if q.shape[-1] % 8 or q.shape[-1] > 128:
        return f"head_dim {q.shape[-1]} is not a multiple of 8 up to 128"
    return None


# --- blockwise (flash-style) attention in plain JAX, for CPU -------------------------------

def _block_size(t: int, block: int) -> int:
    return block if t % block == 0 and t > block else t


def _grouped(q, k, v):
    """[B, T, H, hd] -> [B, KV, G, T, hd]; keys/values -> [B, KV, T, hd] (GQA without repeats)."""
    b, t, h, hd = q.shape
    kv = k.shape[2]
    return (q.reshape(b, t, kv, h // kv, hd).transpose(0, 2, 3, 1, 4),
            k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))


def _block_scores(qi, kj, seg, lo, hi, scale):
    """Masked float32 scores of query rows [lo, hi) against key slots [0, hi): [B, KV, G, bq, hi]."""
    s = jnp.einsum("bkgqd,bksd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * jnp.float32(scale)
    q_index = jnp.arange(lo, hi, dtype=jnp.int32)
    ok = allowed(seg[:, lo:hi, None], seg[:, None, :hi], q_index[:, None], jnp.arange(hi, dtype=jnp.int32)[None, :])
    return jnp.where(ok[:, None, None], s, _MASKED)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blockwise(q, k, v, seg, scale, block):
    return _blockwise_fwd(q, k, v, seg, scale, block)[0]


def _blockwise_fwd(q, k, v, seg, scale, block):
    """Each query block against its causal prefix of key blocks only: blocks above the diagonal
    (more than half of the work for long rows) are never computed. Keeps the output and the
    log-sum-exp per query; the probabilities are recomputed in the backward."""
    t = q.shape[3]
    outs, lses = [], []
    for lo in range(0, t, block):
        hi = lo + block
        s = _block_scores(q[:, :, :, lo:hi], k[:, :, :hi], seg, lo, hi, scale)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - m)
        denom = jnp.sum(p, axis=-1, keepdims=True)
        outs.append(jnp.einsum("bkgqs,bksd->bkgqd", (p / denom).astype(v.dtype), v[:, :, :hi]))
        lses.append((m + jnp.log(denom))[..., 0])
    out = jnp.concatenate(outs, axis=3)
    return out, (q, k, v, seg, out, jnp.concatenate(lses, axis=3))


def _blockwise_bwd(scale, block, res, d_out):
    with jax.named_scope("attention_core"):
        return _blockwise_grads(scale, block, res, d_out)


def _blockwise_grads(scale, block, res, d_out):
    q, k, v, seg, out, lse = res
    t = q.shape[3]
    nblocks = t // block
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, KV, G, T]
    dq_blocks = []
    dk_blocks = [jnp.zeros(k[:, :, :block].shape, jnp.float32) for _ in range(nblocks)]
    dv_blocks = [jnp.zeros(v[:, :, :block].shape, jnp.float32) for _ in range(nblocks)]
    for i, lo in enumerate(range(0, t, block)):
        hi = lo + block
        qi, do_i = q[:, :, :, lo:hi], d_out[:, :, :, lo:hi]
        p = jnp.exp(_block_scores(qi, k[:, :, :hi], seg, lo, hi, scale) - lse[:, :, :, lo:hi, None])
        dp = jnp.einsum("bkgqd,bksd->bkgqs", do_i, v[:, :, :hi], preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, :, :, lo:hi, None]) * jnp.float32(scale)
        dq_blocks.append(jnp.einsum("bkgqs,bksd->bkgqd", ds.astype(k.dtype), k[:, :, :hi],
                                    preferred_element_type=jnp.float32))
        dk = jnp.einsum("bkgqs,bkgqd->bksd", ds.astype(q.dtype), qi, preferred_element_type=jnp.float32)
        dv = jnp.einsum("bkgqs,bkgqd->bksd", p.astype(do_i.dtype), do_i, preferred_element_type=jnp.float32)
        for j in range(i + 1):
            dk_blocks[j] = dk_blocks[j] + dk[:, :, j * block:(j + 1) * block]
            dv_blocks[j] = dv_blocks[j] + dv[:, :, j * block:(j + 1) * block]
    dq = jnp.concatenate(dq_blocks, axis=3).astype(q.dtype)
    dk = jnp.concatenate(dk_blocks, axis=2).astype(k.dtype)
    dv = jnp.concatenate(dv_blocks, axis=2).astype(v.dtype)
    return dq, dk, dv, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(q, k, v, segment_ids, scale: float, block: int = 128):
    """Flash-style attention with its own backward: same maths as the XLA path (float32 scores and
    softmax, probabilities cast to the value dtype), never a [B, H, T, T] tensor beyond one
    query block's rows, and no work above the causal diagonal."""
    b, t, h, hd = q.shape
    qg, kg, vg = _grouped(q, k, v)
    out = _blockwise(qg, kg, vg, segment_ids.astype(jnp.int32), float(scale), _block_size(t, block))
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd)


# --- TPU: Pallas splash attention -----------------------------------------------------------

def splash_attention(q, k, v, segment_ids, scale: float, *, block: int = 512, interpret: bool = False):
    """Pallas splash attention (TPU; `interpret=True` runs the kernel's Python semantics on any
    backend, for tests). Causal + segment ids + GQA (kv heads shared by groups of query heads).
    The kernel does not scale, so q is scaled first; block sizes must be multiples of 128.

    A Pallas kernel is opaque to GSPMD, so under a mesh (jax.set_mesh) it runs per shard through
    shard_map: rows split like the activations' "act_batch" axis, heads like "act_heads"."""
    t = q.shape[1]
    block = min(block, t)
    if t % block or block % 128:
        raise ValueError(f"splash attention needs the sequence length ({t}) to be a multiple of 128")
    local = functools.partial(_splash_local, scale=scale, block=block, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v, segment_ids.astype(jnp.int32))
    batch, heads = nn.logical_to_mesh_axes(("act_batch", "act_heads"))
    spec = P(batch, None, heads, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(batch, None)), out_specs=spec,
                         check_vma=False)(q, k, v, segment_ids.astype(jnp.int32))


def _splash_local(q, k, v, seg, *, scale, block, interpret):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    t, h = q.shape[1], q.shape[2]
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = sa.MultiHeadMask([sa.CausalMask((t, t)) for _ in range(h)])
    kernel = sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)

    def one_row(qr, kr, vr, sr):
        return kernel(qr, kr, vr, segment_ids=sa.SegmentIds(q=sr, kv=sr))

    qh = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)
    out = jax.vmap(one_row)(qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), seg)
    return out.transpose(0, 2, 1, 3)
