"""Chunked lm_head + cross-entropy: the same loss and gradients as optax on full float32 logits,
whichever output is differentiated (the summed loss: gradient formed in the forward; per-token
losses: logits recomputed in the backward; both at once)."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.models.hf_oracle import nano_config
from vflan_jax.models.llava import LlavaForConditionalGeneration
from vflan_jax.models.losses import chunked_cross_entropy
from vflan_jax.parallel import init_inputs
from vflan_jax.train.step import token_losses


def reference_losses(hidden, lm_head, targets):
    """Today's path: full logits, optax integer-label cross-entropy, ignore index -100."""
    logits = (hidden @ lm_head).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(targets == -100, 0, targets))
    weights = (targets != -100).astype(jnp.float32)
    return ce * weights, weights, jnp.sum(ce * weights)


def random_problem(seed=0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.standard_normal((2, 37, 24)), jnp.float32)
    lm_head = jnp.asarray(rng.standard_normal((24, 300)) * 0.5, jnp.float32)
    targets = rng.integers(0, 300, size=(2, 37))
    targets[rng.random((2, 37)) < 0.3] = -100
    token_weight = jnp.asarray(rng.random((2, 37)), jnp.float32)  # every token its own cotangent
    return hidden, lm_head, jnp.asarray(targets), token_weight


# What each test differentiates: the summed loss, the per-token losses with their own cotangents,
# or both at once (the two backward strategies added together).
OBJECTIVES = {
    "total": lambda out, tw: 1.7 * out[2],
    "per_token": lambda out, tw: jnp.sum(out[0] * tw),
    "both": lambda out, tw: jnp.sum(out[0] * tw) + 0.6 * out[2],
}


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("chunk", [16, 74, 1000])  # padded last chunk, exact split, one chunk
def test_chunked_cross_entropy_equals_full_logits(chunk, objective):
    hidden, lm_head, targets, token_weight = random_problem()

    def value_and_grads(fn):
        def loss(h, w):
            return OBJECTIVES[objective](fn(h, w, targets), token_weight)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(hidden, lm_head)

    (lo, (dh, dw)) = value_and_grads(lambda h, w, t: chunked_cross_entropy(h, w, t, chunk))
    (lr, (dh_ref, dw_ref)) = value_and_grads(reference_losses)
    np.testing.assert_allclose(lo, lr, rtol=1e-6)
    np.testing.assert_allclose(dh, dh_ref, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(dw, dw_ref, atol=1e-6, rtol=1e-5)
    ours_tokens, w, total = chunked_cross_entropy(hidden, lm_head, targets, chunk)
    ref_tokens, _, ref_total = reference_losses(hidden, lm_head, targets)
    np.testing.assert_allclose(ours_tokens, ref_tokens, atol=1e-5)
    np.testing.assert_allclose(total, ref_total, rtol=1e-6)
    assert float(w.sum()) == float((targets != -100).sum())


def compiled_matmuls(fn, *args) -> int:
    """Matmuls XLA runs for fn (loop bodies included, dead code removed); here all are vocabulary-sized."""
    return len(re.findall(r" dot\(", jax.jit(fn).lower(*args).compile().as_text()))


def test_summed_loss_gradient_reuses_the_forward_logits():
    # The point of the summed output: its gradient reuses the forward's logits (logits, d_hidden,
    # d_lm_head), where per-token cotangents need the logits again; evaluation does only the logits.
    hidden, lm_head, targets, token_weight = random_problem(1)
    def ours(h, w):
        return chunked_cross_entropy(h, w, targets, 16)

    assert compiled_matmuls(lambda h, w: ours(h, w)[2], hidden, lm_head) == 1
    assert compiled_matmuls(jax.grad(lambda h, w: ours(h, w)[2], argnums=(0, 1)), hidden, lm_head) == 3
    per_token = jax.grad(lambda h, w: jnp.sum(ours(h, w)[0] * token_weight), argnums=(0, 1))
    assert compiled_matmuls(per_token, hidden, lm_head) == 4
    # A frozen lm_head (LoRA) needs no d_lm_head: the forward's matmul for it is dead code.
    assert compiled_matmuls(jax.grad(lambda h, w: ours(h, w)[2]), hidden, lm_head) == 2


def test_training_loss_and_gradients_unchanged_by_chunking():
    cfg = nano_config()
    params = nn.unbox(LlavaForConditionalGeneration(cfg).init(jax.random.key(0), *init_inputs(cfg))["params"])
    rng = np.random.default_rng(1)
    b, t, n = 2, 12, cfg.tokens_per_image
    ids = rng.integers(3, cfg.text.vocab_size - 1, size=(b, t)).astype(np.int32)
    ids[:, 1:1 + n] = cfg.image_token_id
    targets = np.roll(ids, -1, axis=1)
    targets[:, : 1 + n] = -100
    targets[:, -1] = -100
    batch = {"input_ids": ids, "targets": targets,
             "pixel_values": rng.standard_normal((b, 1, 3, 28, 28)).astype(np.float32),
             "image_mask": np.ones((b, 1), bool), "positions": np.tile(np.arange(t), (b, 1)).astype(np.int32),
             "segment_ids": np.array([[1] * 7 + [2] * 5, [1] * 10 + [0] * 2], np.int32)}

    def loss_and_grads(chunk):
        model = LlavaForConditionalGeneration(cfg.replace(loss_chunk_size=chunk))
        return jax.jit(jax.value_and_grad(lambda p: token_losses(model, p, batch)[2]))(params)

    (ours, g_ours), (ref, g_ref) = loss_and_grads(5), loss_and_grads(0)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    flat_ours, flat_ref = jax.tree.leaves_with_path(g_ours), jax.tree.leaves(g_ref)
    for (path, a), b_ in zip(flat_ours, flat_ref, strict=True):
        np.testing.assert_allclose(a, b_, atol=1e-6, rtol=1e-5, err_msg=jax.tree_util.keystr(path))
