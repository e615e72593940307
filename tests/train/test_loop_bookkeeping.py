"""The training loop's bookkeeping objects: the cadence test, the step window's metrics record
(token-weighted means against a hand computation on random inputs) and the late finite check."""
import random

import numpy as np
import pytest

from vflan_jax.data.skips import SkipCounter
from vflan_jax.train import window as window_module
from vflan_jax.train.cadence import due
from vflan_jax.train.finite import FiniteCheck, NonFiniteLoss
from vflan_jax.train.window import StepWindow


def test_due_gives_the_three_cadences_of_the_loop():
    rng = random.Random(0)
    for _ in range(200):
        total, every = rng.randint(1, 40), rng.randint(0, 12)
        for step in range(1, total + 1):
            # The loop's three tests as they were written before `due` (log, eval, checkpoint).
            log = bool(every) and step % every == 0 or step == total
            evaluate = bool(every) and step % every == 0 and step < total
            assert due(step, every, total, last=True) == log, (step, every, total)
            assert due(step, every, total) == evaluate, (step, every, total)


def _random_steps(rng, n_steps, n_tasks, rows=4, length=12, slots=3):
    steps = []
    for _ in range(n_steps):
        task_tokens = rng.integers(0, 20, n_tasks).astype(np.float32)
        task_tokens[rng.integers(n_tasks)] = 0   # a task absent from the step
        metrics = {"loss_sum": np.float32(rng.uniform(1, 50)), "tokens": np.float32(rng.integers(1, 40)),
                   "task_loss_sum": rng.uniform(0, 30, n_tasks).astype(np.float32) * (task_tokens > 0),
                   "task_tokens": task_tokens, "grad_norm": np.float32(rng.uniform(0.1, 5))}
        batch = {"segment_ids": rng.integers(0, 3, (rows, length)), "input_ids": np.zeros((rows, length)),
                 "image_mask": np.zeros((rows, slots), bool)}
        record_ids = np.where(rng.random(rows) < 0.7, [f"r{i}" for i in range(rows)], "")
        steps.append((metrics, batch, record_ids))
        length += 4   # pad-to-longest batches change length; FLOPs use the last step's
    return steps


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("with_projector_lr", [False, True])
def test_window_summary_is_the_token_weighted_record(monkeypatch, with_projector_lr):
    rng = np.random.default_rng(1 + with_projector_lr)
    clock = _Clock()
    monkeypatch.setattr(window_module.time, "perf_counter", clock)
    tasks = ["a", "b", "c", "d"]
    schedules = {"default": lambda s: 1e-3 * (s + 1)}
    if with_projector_lr:
        schedules["projector"] = lambda s: 2e-3 * (s + 1)
    skipped = SkipCounter()
    def flops(seq_len, slots):
        return 1e9 * seq_len + 1e6 * slots

    window = StepWindow(tasks, schedules, skipped, flops, peak_flops_per_s=4e12)
    steps = _random_steps(rng, 5, len(tasks))
    for metrics, batch, record_ids in steps:
        window.add(metrics, batch, record_ids)
    skipped.add("missing_image", task_name="a")   # the counter is read at summary time
    clock.now += 2.5
    got = window.summary(step=7)

    loss_sum = tokens = 0.0
    task_sum, task_tok = [0.0] * len(tasks), [0.0] * len(tasks)
    real, examples = 0, 0
    for metrics, batch, record_ids in steps:
        loss_sum += float(metrics["loss_sum"])
        tokens += float(metrics["tokens"])
        for i in range(len(tasks)):
            task_sum[i] += float(metrics["task_loss_sum"][i])
            task_tok[i] += float(metrics["task_tokens"][i])
        real += sum(1 for v in batch["segment_ids"].ravel() if v > 0)
        examples += sum(1 for r in record_ids if r)
    step_time = 2.5 / len(steps)
    last = steps[-1][1]
    assert got["loss"] == pytest.approx(loss_sum / tokens, rel=1e-6)
    assert got["task_loss"] == pytest.approx({t: task_sum[i] / task_tok[i] for i, t in enumerate(tasks) if task_tok[i]},
                                             rel=1e-6)
    assert got["learning_rate"] == pytest.approx(1e-3 * 7)   # the schedule at the step just taken (6, 0-based)
    assert got["grad_norm"] == pytest.approx(float(steps[-1][0]["grad_norm"]))
    assert got["tokens_per_second"] == pytest.approx(real / 2.5)
    assert got["examples_per_second"] == pytest.approx(examples / 2.5)
    assert got["step_time_s"] == pytest.approx(step_time)
    assert got["mfu"] == pytest.approx(flops(last["input_ids"].shape[1], 3) / step_time / 4e12)
    assert got["skipped"]["total"] == 1
    assert ("projector_learning_rate" in got) == with_projector_lr
    if with_projector_lr:
        assert got["projector_learning_rate"] == pytest.approx(2e-3 * 7)

    # The next window holds only the steps after the summary, timed from it.
    metrics, batch, record_ids = _random_steps(rng, 1, len(tasks))[0]
    window.add(metrics, batch, record_ids)
    clock.now += 0.5
    again = window.summary(step=8)
    assert again["loss"] == pytest.approx(float(metrics["loss_sum"]) / float(metrics["tokens"]), rel=1e-6)
    assert again["step_time_s"] == pytest.approx(0.5)


def test_window_mfu_is_null_on_a_device_of_unknown_peak():
    window = StepWindow(["a"], {"default": lambda s: 0.1}, SkipCounter(), lambda *_: 1.0, peak_flops_per_s=None)
    metrics, batch, record_ids = _random_steps(np.random.default_rng(3), 1, 1)[0]
    window.add(metrics, batch, record_ids)
    assert window.summary(step=1)["mfu"] is None


def test_the_finite_check_reads_each_step_one_step_late():
    check = FiniteCheck("stop")
    check.push(1, np.bool_(True), np.array(["r1"]))
    check.push(2, np.bool_(False), np.array(["r2", "", "r3"]))   # held, not yet read
    with pytest.raises(NonFiniteLoss, match=r"at step 2; batch records: \['r2', 'r3'\].*update not applied"):
        check.push(3, np.bool_(True), np.array(["r4"]))
    check = FiniteCheck("skip")
    check.push(5, np.bool_(False), np.array(["r5"]))
    check.flush()   # warns and goes on
    assert check.pending is None
