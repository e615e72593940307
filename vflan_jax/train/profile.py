"""On-demand profile of chosen training steps (config profile_steps), for TensorBoard's profile tab.

Each run of consecutive steps is one trace (clu.profiler, i.e. jax.profiler: device and host
activity, the input pipeline included) under workdir/profile/plugins/profile/<time>/;
`tensorboard --logdir W` shows it beside the training scalars. Step 1 includes the compile.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import jax
from clu import profiler

PROFILE_DIR = "profile"


def profile_dir(workdir: str) -> str:
    """workdir/profile; with several processes each traces into its own folder (hosts may share a name)."""
    root = os.path.join(workdir, PROFILE_DIR)
    return root if jax.process_count() == 1 else os.path.join(root, f"process_{jax.process_index()}")


class StepProfiler:
    """begin(step) before a step (its batch included), end(step, outputs) after it."""

    def __init__(self, steps: Sequence[int], logdir: str):
        self.steps, self.logdir = frozenset(steps), logdir
        self.first = None   # the first step of the trace being recorded

    def begin(self, step: int) -> None:
        if step in self.steps and self.first is None:
            profiler.start(self.logdir)
            self.first = step

    def end(self, step: int, outputs) -> None:
        if self.first is not None and step + 1 not in self.steps:
            jax.block_until_ready(outputs)   # the step's device work belongs in its trace
            self.close(step)

    def close(self, last_step: int) -> None:
        """Ends a trace still recording (the loop stopped inside the chosen steps)."""
        if self.first is None:
            return
        profiler.stop()
        steps = f"{self.first}-{last_step}" if last_step >= self.first else f"{self.first} (data ran out before it)"
        logging.info("profile of steps %s written to %s (tensorboard --logdir %s)", steps, self.logdir, self.logdir)
        self.first = None
