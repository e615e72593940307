"""How a training process ends early: SIGTERM/SIGINT (save, then exit 75), a watchdog when saving
hangs, and an exit that does not wait for stuck threads."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import jax
import numpy as np

from vflan_jax import cli


class StopSignal:
    """SIGTERM/SIGINT finish the current step, then the loop saves and exits.

    A signal must always end the process, also when the step or the save never finishes: a
    second signal exits at once (status 75, the previous checkpoint stays the resume point),
    and `timeout_s` after the first one a watchdog exits with status 1."""

    def __init__(self, timeout_s: float | None = None):
        self.received = None
        self.timeout_s = timeout_s
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is not None:
            exit_now(f"second signal ({name}): exiting without saving; a rerun resumes from the newest "
                     "checkpoint", cli.EXIT_PREEMPTED)
        self.received = name
        logging.warning("%s received: finishing this step, then saving (send it again to exit at once)", name)
        if self.timeout_s:
            watchdog = threading.Timer(self.timeout_s, exit_now, args=(
                f"still running {self.timeout_s:g} s after {name} (config stop_timeout_s): exiting; a rerun "
                "resumes from the newest checkpoint", cli.EXIT_FAILURE))
            watchdog.daemon = True
            watchdog.start()

    def should_stop(self) -> bool:
        flag = self.received is not None
        if jax.process_count() > 1:  # every host must stop at the same step
            from jax.experimental import multihost_utils
            flag = bool(multihost_utils.process_allgather(np.array(flag)).any())
        return flag


def exit_now(message: str, status: int) -> None:
    """Log, flush and end the process even if Orbax/Grain threads are stuck (they would block the
    interpreter's normal exit, which joins them)."""
    logging.error("%s", message, extra=cli.FILE_ONLY)
    print(f"error: {message}", file=sys.stderr, flush=True)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    os._exit(status)
