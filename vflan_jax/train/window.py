"""The steps since the last log line, summarised into one metrics.jsonl record."""
from __future__ import annotations

import time
from typing import Callable, Mapping, Sequence

import jax
import numpy as np

from vflan_jax.data.skips import SkipCounter


class StepWindow:
    """Collects each step's metrics (left on device until the summary) and its batch's counts;
    `summary(step)` gives the record and starts a new window.

    Losses are token-weighted over the window (sum of loss sums / sum of labelled tokens), so
    a step with few labelled tokens counts for little, as within a step. Token and example
    counts are this host's, scaled by the host count (every host loads an equal share)."""

    def __init__(self, task_names: Sequence[str], schedules: Mapping[str, Callable], skipped: SkipCounter,
                 step_flops: Callable[[int, int], float], peak_flops_per_s: float | None):
        """step_flops(seq_len, image_slots): FLOPs of one global step; peak_flops_per_s: all devices'
        (None on an unknown device: mfu is then null)."""
        self.task_names, self.schedules, self.skipped = list(task_names), schedules, skipped
        self.step_flops, self.peak_flops_per_s = step_flops, peak_flops_per_s
        self._reset()

    def _reset(self) -> None:
        self.metrics, self.real_tokens, self.examples, self.shape = [], 0, 0, None
        self.start = time.perf_counter()

    def add(self, metrics: Mapping, batch: Mapping[str, np.ndarray], record_ids: np.ndarray) -> None:
        """metrics: the step's output; batch: this host's part as the step got it; record_ids: its
        examples' ids (the host batch's `meta_record_ids`, "" for an empty slot)."""
        self.metrics.append(metrics)
        self.real_tokens += int((batch["segment_ids"] > 0).sum())
        self.examples += int((record_ids != "").sum())
        self.shape = (batch["input_ids"].shape[1], batch["image_mask"].shape[1])  # the last step's, for FLOPs

    def summary(self, step: int) -> dict:
        elapsed = time.perf_counter() - self.start
        fetched = jax.device_get(self.metrics)
        loss_sum = sum(float(m["loss_sum"]) for m in fetched)
        tokens = sum(float(m["tokens"]) for m in fetched)
        task_loss = np.sum([m["task_loss_sum"] for m in fetched], axis=0)
        task_tokens = np.sum([m["task_tokens"] for m in fetched], axis=0)
        hosts = jax.process_count()
        step_time = elapsed / max(len(fetched), 1)
        values = {
            "loss": loss_sum / max(tokens, 1.0),
            "learning_rate": float(self.schedules["default"](step - 1)),
            "grad_norm": float(fetched[-1]["grad_norm"]),
            "tokens_per_second": self.real_tokens * hosts / elapsed,
            "examples_per_second": self.examples * hosts / elapsed,
            "step_time_s": step_time,
            "mfu": (self.step_flops(*self.shape) / step_time / self.peak_flops_per_s
                    if self.peak_flops_per_s else None),
            "task_loss": {t: float(task_loss[i] / task_tokens[i])
                          for i, t in enumerate(self.task_names) if task_tokens[i]},
            "skipped": self.skipped.as_dict(),
        }
        if "projector" in self.schedules:
            values["projector_learning_rate"] = float(self.schedules["projector"](step - 1))
        self._reset()
        return values
