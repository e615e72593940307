"""Where training numbers go: metrics.jsonl, TensorBoard (tensorboardX, no TensorFlow), a console
progress line with rate and ETA, and at the end a loss-curve PNG and a summary.

Only process 0 writes; other hosts get a writer that does nothing.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from typing import Any, Mapping

import jax

# Dense bf16 peak per device (TFLOP/s) for MFU; unknown devices report mfu = null rather than a guess.
PEAK_TFLOPS = {
    "H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0, "TPU v6": 918.0,
}


def device_peak_tflops(device: jax.Device | None = None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind
    for name, peak in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return peak
    return None


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsWriter:
    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self._tb is not None:
            for key, value in _flatten(values).items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(re.sub(r"[^\w./-]", "_", key), value, step)  # TB tag charset

    def truncate_after(self, step: int) -> None:
        """On resume, forget lines logged after the checkpoint, so the file reads as one run."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(self.path, "w") as f:
            f.writelines(keep)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "/"))
        else:
            out[name] = value
    return out


class ProgressLine:
    """'step 120/1000 loss 2.31 | 3.1 step/s 12k tok/s | ETA 4m44s' every log step."""

    def __init__(self, total_steps: int, start_step: int):
        self.total, self.start_step, self.start = total_steps, start_step, time.perf_counter()

    def line(self, step: int, values: Mapping[str, Any]) -> str:
        elapsed = time.perf_counter() - self.start
        done = step - self.start_step
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        parts = [f"step {step}/{self.total}", f"loss {values['loss']:.4f}", f"lr {values['learning_rate']:.2e}"]
        if values.get("tokens_per_second"):
            parts.append(f"{values['tokens_per_second']:,.0f} tok/s")
        if values.get("mfu") is not None:
            parts.append(f"MFU {100 * values['mfu']:.1f}%")
        parts.append(f"{rate:.2f} step/s")
        parts.append(f"ETA {format_duration(eta) if math.isfinite(eta) else '?'}")
        return " | ".join(parts)


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def loss_curve_series(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """What loss_curve.png draws, as {label: (steps, values)}: the training loss and learning
    rate, and every evaluation loss, including the final evaluation (a record with `eval` and no
    `loss`, written after the last step)."""
    train = [r for r in records if "loss" in r]
    series = {"train loss (token mean)": ([r["step"] for r in train], [r["loss"] for r in train]),
              "learning rate": ([r["step"] for r in train], [r["learning_rate"] for r in train])}
    for r in records:
        for key, value in sorted(r.get("eval", {}).items()):
            if key.endswith("loss") and isinstance(value, (int, float)):
                steps, values = series.setdefault(f"eval {key}", ([], []))
                steps.append(r["step"])
                values.append(value)
    return series


def plot_loss_curve(metrics_path: str, out_png: str, title: str = "training loss") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = loss_curve_series(read_metrics(metrics_path))
    if not any(values for _, values in series.values()):
        logging.warning("no loss records in %s; no plot written", metrics_path)
        return
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for label, (steps, values) in series.items():
        if label == "learning rate":
            ax_lr.plot(steps, values, color="tab:orange")
        elif label.startswith("eval"):
            ax_loss.plot(steps, values, "o-", label=label)
        else:
            ax_loss.plot(steps, values, label=label)
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(title)
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
