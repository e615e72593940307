"""Optimizer, freezing and the train step, checked directly (no CLI)."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from tests.models.hf_oracle import nano_config
from vflan_jax.models.llava import LlavaForConditionalGeneration
from vflan_jax.parallel import init_inputs
from vflan_jax.train import optim
from vflan_jax.train.step import TrainState, make_train_step


def hf_cosine_with_warmup(step, total, warmup_ratio, peak):
    """transformers get_cosine_schedule_with_warmup (docs/REFERENCE.md §4.3), written out independently."""
    warm = math.ceil(warmup_ratio * total)
    if step < warm:
        return peak * step / max(1, warm)
    progress = (step - warm) / max(1, total - warm)
    return peak * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("total,ratio", [(13003, 0.03), (128, 0.03), (50, 0.0), (7, 0.5)])
def test_schedule_matches_hf_trainer(total, ratio):
    schedule = optim.learning_rate_schedule(2e-5, total, ratio)
    for step in sorted({0, 1, 2, math.ceil(ratio * total), total // 2, total - 1, total}):
        expected = hf_cosine_with_warmup(step, total, ratio, 2e-5)
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-12)


def _setup(trainable=("projector", "llm"), accum=1, lr=1e-2, projector_lr=None):
    cfg = nano_config()
    model = LlavaForConditionalGeneration(cfg)
    params = nn.unbox(model.init(jax.random.key(0), *init_inputs(cfg))["params"])
    oc = optim.default_optim_config()
    oc.learning_rate, oc.warmup_ratio, oc.trainable = lr, 0.0, trainable
    oc.projector_learning_rate = projector_lr
    mask = optim.trainable_mask(params, trainable)
    trainable_params, _ = optim.split(params, mask)
    tx, _ = optim.make_optimizer(oc, trainable_params, total_steps=10)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(trainable_params), jnp.zeros((2,), jnp.uint32))
    step = jax.jit(make_train_step(model, tx, lambda p: optim.split(p, mask), num_tasks=2, grad_accum_steps=accum))
    return cfg, state, step, mask


def _batch(cfg, b=4, t=12, seed=0):
    rng = np.random.default_rng(seed)
    n = cfg.tokens_per_image
    ids = rng.integers(3, cfg.text.vocab_size - 1, size=(b, t)).astype(np.int32)
    ids[:, 1:1 + n] = cfg.image_token_id
    targets = np.roll(ids, -1, axis=1)
    targets[:, : 1 + n] = -100
    targets[:, -1] = -100
    targets[0, 6:] = -100  # rows with different numbers of labelled tokens
    return {"input_ids": ids, "targets": targets,
            "pixel_values": rng.standard_normal((b, 1, 3, 28, 28)).astype(np.float32),
            "image_mask": np.ones((b, 1), bool), "positions": np.tile(np.arange(t), (b, 1)).astype(np.int32),
            "segment_ids": np.ones((b, t), np.int32), "task_ids": np.tile([[0], [1]], (b // 2, t)).astype(np.int32)}


def test_frozen_parameters_do_not_change_and_have_no_optimizer_state():
    cfg, state, step, mask = _setup(trainable=("projector",))
    before = jax.tree.map(np.asarray, state.params)
    for i in range(3):
        state, metrics = step(state, _batch(cfg, seed=i))
    after = traverse_util.flatten_dict(jax.tree.map(np.asarray, state.params))
    before = traverse_util.flatten_dict(before)
    for path, frozen in ((p, not m) for p, m in mask.items()):
        same = np.array_equal(after[path], before[path])
        assert same == frozen, f"{'/'.join(path)} changed={not same} but frozen={frozen}"
    # Optimizer state exists for the projector only: count its leaves' elements.
    n_state = sum(x.size for x in jax.tree.leaves(state.opt_state) if hasattr(x, "size") and x.ndim)
    n_projector = sum(v.size for p, v in after.items() if p[0] == "multi_modal_projector")
    assert n_state == 2 * n_projector  # Adam's mu and nu, nothing for the tower and the LLM


@pytest.mark.slow   # in-process, but a minute or more of compiling on 2 cores
def test_gradient_accumulation_equals_the_full_batch():
    cfg, state_a, step_a, _ = _setup(accum=1)
    _, state_b, step_b, _ = _setup(accum=2)
    batch = _batch(cfg, b=4)
    new_a, m_a = step_a(state_a, batch)
    new_b, m_b = step_b(state_b, batch)
    # Token-mean over the whole batch, not a mean of micro-batch means (rows hold different token counts).
    assert float(m_a["loss"]) == pytest.approx(float(m_b["loss"]), rel=1e-5)
    assert float(m_a["grad_norm"]) == pytest.approx(float(m_b["grad_norm"]), rel=1e-4)
    # Adam normalises the step, so a near-zero gradient's last bits show up at the lr scale (1e-2).
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), new_a.params, new_b.params)


def test_loss_is_the_global_token_mean():
    cfg, state, step, _ = _setup()
    batch = _batch(cfg)
    _, metrics = step(state, batch)
    model = LlavaForConditionalGeneration(cfg)
    logits = model.apply({"params": state.params}, batch["input_ids"], batch["pixel_values"], batch["image_mask"],
                         batch["positions"], batch["segment_ids"])
    w = batch["targets"] != -100
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, np.where(w, batch["targets"], 0))
    assert float(metrics["loss"]) == pytest.approx(float((ce * w).sum() / w.sum()), rel=1e-5)
    per_task = [(ce * w * (batch["task_ids"] == k)).sum() for k in (0, 1)]
    np.testing.assert_allclose(metrics["task_loss_sum"], per_task, rtol=1e-5)


def test_nonfinite_step_is_not_applied():
    cfg, state, step, _ = _setup()
    poisoned = jax.tree.map(lambda x: x, state.params)
    bias = poisoned["multi_modal_projector"]["linear_1"]["bias"]
    poisoned["multi_modal_projector"]["linear_1"]["bias"] = bias.at[0].set(jnp.nan)
    state = state._replace(params=poisoned)
    new, metrics = step(state, _batch(cfg))
    assert not bool(metrics["finite"])
    np.testing.assert_array_equal(new.params["language_model"]["norm"]["scale"],
                                  state.params["language_model"]["norm"]["scale"])
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(new.opt_state) if hasattr(x, "dtype") and x.ndim)


def test_separate_projector_learning_rate():
    cfg, state, step, _ = _setup(lr=1e-9, projector_lr=1e-2)
    new, _ = step(state, _batch(cfg))
    def change(*path):
        old, updated = state.params, new.params
        for key in path:
            old, updated = old[key], updated[key]
        return np.abs(updated - old).max()

    d_proj = change("multi_modal_projector", "linear_2", "kernel")
    d_llm = change("language_model", "lm_head", "kernel")
    assert d_proj > 1e-3 and d_llm < 1e-7


def test_trainable_typo_is_an_error():
    cfg = nano_config()
    params = nn.unbox(LlavaForConditionalGeneration(cfg).init(jax.random.key(0), *init_inputs(cfg))["params"])
    with pytest.raises(ValueError, match="optim.trainable: 'projecter' matches no parameter"):
        optim.trainable_mask(params, ("projecter",))


def test_chance_level_is_uniform_over_a_tasks_answers():
    from vflan_jax.data.sources import Example
    from vflan_jax.train.evaluate import chance_levels
    def ex(task, answer):
        return Example("i", task, None, (("human", "q"), ("gpt", answer)), "f", 0)

    pool = [ex("a", "red"), ex("a", "blue"), ex("a", "red "), ex("a", "green"), ex("b", "yes"), ex("b", "no")]
    assert chance_levels(pool) == {"a": 1 / 3, "b": 1 / 2}
