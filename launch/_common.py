"""Shared pieces of the launchers: the trainer command line, printing or running commands, and
the resume loop built on the trainer's exit status (0 finished, 75 stopped after saving a
checkpoint, anything else an error; see vflan_jax/train/__main__.py)."""
from __future__ import annotations

import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
EXIT_PREEMPTED = 75  # vflan_jax.cli.EXIT_PREEMPTED (kept here so launchers import nothing heavy)

# XLA flags that matter for training on NVIDIA GPUs (launch/README.md explains each). Every
# name is checked against the pinned jaxlib by tests/launch (an unknown flag aborts XLA).
GPU_XLA_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",   # overlap collectives with compute
)


def train_args(config: str, workdir: str, overrides=(), python: str = "python") -> list[str]:
    """`python -m vflan_jax.train --config C --workdir W [--config.x=y ...]`."""
    if not config or not workdir:
        raise SystemExit("--config and --workdir are required")
    extra = list(overrides)
    if extra and extra[0] == "--":
        extra = extra[1:]
    for arg in extra:
        if not arg.startswith("--config."):
            raise SystemExit(f"extra trainer argument {arg!r}: only --config.FIELD=VALUE overrides are passed on")
    return [python, "-m", "vflan_jax.train", "--config", config, "--workdir", workdir, *extra]


def join(args) -> str:
    return shlex.join([str(a) for a in args])


def xla_flags(extra: str = "", base=GPU_XLA_FLAGS) -> str:
    """The launcher's flags, then the caller's (XLA takes the last value of a repeated flag)."""
    return " ".join([*base, *extra.split()]).strip()


def emit(lines, dry_run: bool) -> None:
    """Dry run: print each command, one per line, exactly as it would be run."""
    if dry_run:
        for line in lines:
            print(line)


def run_shell(command: str, *, check: bool = True, env=None) -> int:
    print(f"+ {command}", file=sys.stderr, flush=True)
    rc = subprocess.call(command, shell=True, env=env, executable="/bin/bash")
    if check and rc != 0:
        raise SystemExit(f"command failed with status {rc}: {command}")
    return rc


def resume_loop(run_once, max_restarts: int, should_retry=lambda rc: rc == EXIT_PREEMPTED,
                before_retry=lambda rc, attempt: None, sleep_s: float = 0.0) -> int:
    """Runs run_once() until it returns 0, a status should_retry() rejects, or max_restarts
    re-runs are spent. The trainer resumes from its newest checkpoint on every re-run."""
    attempt = 0
    while True:
        rc = run_once()
        if rc == 0 or not should_retry(rc) or attempt >= max_restarts:
            return rc
        attempt += 1
        print(f"[launch] status {rc}: re-running the same command to resume (restart {attempt}/{max_restarts})",
              file=sys.stderr, flush=True)
        before_retry(rc, attempt)
        if sleep_s:
            time.sleep(sleep_s)


class ForwardSignals:
    """SIGTERM/SIGINT to the launcher go to the trainer (which saves and exits 75); the launcher
    then stops instead of re-running: it was asked to stop, not preempted underneath."""

    def __init__(self):
        self.child = None
        self.received = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def run(self, args, env=None, cwd=REPO) -> int:
        print(f"+ {join(args)}", file=sys.stderr, flush=True)
        self.child = subprocess.Popen(args, env=env, cwd=cwd)
        while True:
            try:
                return self.child.wait()
            except KeyboardInterrupt:  # pragma: no cover - the handler above forwards it
                continue


def env_assignments(env: dict) -> str:
    return " ".join(f"{k}={shlex.quote(str(v))}" for k, v in env.items())


def existing_env(base: dict | None = None) -> dict:
    return dict(os.environ if base is None else base)
