"""Running the trainer as users do (a subprocess per run), small enough for CPU tests."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def train_args(workdir, suite, steps=6, **overrides):
    args = [sys.executable, "-m", "vflan_jax.train", "--config", str(REPO / "configs/demo.py"),
            "--workdir", str(workdir), f"--config.total_steps={steps}", "--config.log_every_steps=1",
            "--config.checkpoint_every_steps=100", "--config.eval_every_steps=0", "--config.eval_max_examples=4",
            f"--config.synthetic_suite={suite}", "--config.synthetic_instances_per_task=6",
            "--config.data.max_length=96", "--config.global_batch_size=4", "--config.data.prefetch=0"]
    return args + [f"--config.{k}={v}" for k, v in overrides.items()]


def env(devices: int = 1, **extra) -> dict:
    e = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    e.update(extra)
    return e


def run(args, devices=1, check=True, **extra):
    proc = subprocess.run(args, cwd=REPO, env=env(devices, **extra), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer exited {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc


def losses(workdir) -> dict[int, float]:
    out = {}
    with open(pathlib.Path(workdir) / "metrics.jsonl") as f:
        for line in f:
            record = json.loads(line)
            if "loss" in record:
                out[record["step"]] = record["loss"]
    return out
