"""The non-finite loss check, one step late: reading a step's flag at once would make the host
wait for the device every step (the step itself has already refused the update)."""
from __future__ import annotations

import logging

import numpy as np


class NonFiniteLoss(RuntimeError):
    pass


class FiniteCheck:
    """policy 'stop': raise NonFiniteLoss naming the step and its records; 'skip': warn and go on."""

    def __init__(self, policy: str):
        self.policy = policy
        self.pending = None   # (step, finite flag on device, record ids) of the newest step

    def push(self, step: int, finite, record_ids: np.ndarray) -> None:
        """Checks the previous step, then holds this one."""
        self.flush()
        self.pending = (step, finite, record_ids)

    def flush(self) -> None:
        """Checks the step held, if any (before a log line, and after the last step)."""
        if self.pending is None:
            return
        step, finite, record_ids = self.pending
        self.pending = None
        if bool(finite):
            return
        message = (f"non-finite loss or gradient at step {step}; batch records: "
                   f"{sorted(set(str(r) for r in record_ids.ravel() if r))[:32]}")
        if self.policy == "stop":
            raise NonFiniteLoss(message + " (update not applied; set nonfinite='skip' to go on)")
        logging.warning("%s: update skipped", message)
