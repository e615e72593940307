"""Training checkpoints: one Orbax step directory holds the train state (params, optimizer state,
step, RNG), every host's data-iterator state and the run's config.

Orbax writes a step into a temporary directory and renames it only once complete, so a save
interrupted by a crash or kill is invisible to `latest_step()` and resume uses the previous one.

Two failure modes Orbax itself does not bound (checked in tests/train/test_faults*.py):
- a write that fails in Orbax's background thread (folder gone, unwritable) can leave the next
  `save` waiting forever for a signal that never comes. Every save first proves the folder
  writable (and re-proves it while it waits), and every call into Orbax runs under a time limit
  (`timeout_s`); each failure is a `CheckpointError` naming the directory.
- a step directory damaged after it was committed (a truncated tensor file, an empty
  `_METADATA`, a torn data-iterator JSON) fails deep inside Orbax/TensorStore. `restore_newest`
  checks the newest step, names the broken file, and falls back to the newest intact step
  (moving the broken one aside) or stops, as configured.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from typing import Any, Callable

import grain
import orbax.checkpoint as ocp
from etils import epath

# Files of an Orbax step directory that are JSON (checked before a restore is attempted).
_JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding", "metadata")
BROKEN_DIR = "checkpoints_broken"
_PROBE_EVERY_S = 5.0   # how often a waiting save re-checks that its folder still takes writes


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the directory or file."""


class TrainCheckpointer:
    def __init__(self, workdir: str, *, max_to_keep: int = 2, async_save: bool = True, timeout_s: float = 1800):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.timeout_s = timeout_s
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator, meta: dict) -> None:
        self._check_writable()
        self._bounded(f"saving step {step}", lambda: self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=grain.checkpoint.CheckpointSave(data_iterator),
            meta=ocp.args.JsonSave(meta)), force=True), probe=True)

    def restore(self, step: int, abstract_state: Any, data_iterator: grain.DatasetIterator) -> tuple[Any, dict]:
        """Restores the state into the shardings of `abstract_state` and the iterator in place."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data_iter=grain.checkpoint.CheckpointRestore(data_iterator),
            meta=ocp.args.JsonRestore()))
        logging.info("restored step %d from %s", step, self.directory)
        return restored["state"], dict(restored["meta"])

    def restore_newest(self, abstract_state: Any, data_iterator: grain.DatasetIterator, *,
                       fallback: bool = True) -> tuple[int, Any, dict]:
        """(step, state, meta) of the newest step that reads back whole.

        A broken step is named (file and why); with `fallback` it is moved to
        <workdir>/checkpoints_broken/ and the next older step is tried, else CheckpointError."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            problem = self.check_step(step)
            if problem is None:
                try:
                    state, meta = self.restore(step, abstract_state, data_iterator)
                    return step, state, meta
                except Exception as e:  # noqa: BLE001 - Orbax/TensorStore/JSON errors alike
                    problem = describe_restore_error(e, self.step_dir(step))
            older = steps[i + 1] if i + 1 < len(steps) else None
            if not fallback:
                raise CheckpointError(f"checkpoint step {step} is broken: {problem} (config resume_fallback=True "
                                      f"resumes from the newest intact step{f', {older}' if older is not None else ''})")
            if older is None:
                raise CheckpointError(f"checkpoint step {step} is broken: {problem}; no older checkpoint in "
                                      f"{self.directory} to fall back to (move it away to start afresh)")
            moved = self._move_aside(step)
            logging.error("CHECKPOINT STEP %d IS BROKEN: %s; moved to %s; resuming from step %d instead",
                          step, problem, moved, older)
        raise CheckpointError(f"no checkpoint in {self.directory}")

    def step_dir(self, step: int) -> epath.Path:
        return epath.Path(self.directory) / str(step)

    def check_step(self, step: int) -> str | None:
        """Why the step directory cannot be restored (the file and what is wrong), or None."""
        root = self.step_dir(step)
        for path in sorted([*root.glob("*"), *root.glob("*/*")]):   # the JSON files sit at these depths
            if not path.is_file() or not (path.name in _JSON_FILES or path.name.endswith(".json")):
                continue
            text = path.read_text()
            if not text.strip():
                return f"{path} is empty"
            try:
                json.loads(text)
            except ValueError as e:
                return f"{path} is not valid JSON ({e}; truncated?)"
        for part in ("state", "data_iter", "meta"):
            if not (root / part).is_dir():
                return f"{root / part} is missing"
        return None

    def wait(self) -> None:
        self._bounded("finishing the checkpoint writes", self.manager.wait_until_finished, probe=True)

    def close(self) -> None:
        self._bounded("closing the checkpoint manager", self.manager.close)

    # -- fault bounds -----------------------------------------------------------------------
    def _check_writable(self, context: str = "") -> None:
        """A probe file proves the folder exists and takes writes (permissions alone say nothing to root)."""
        probe = epath.Path(self.directory) / f".write_probe.{os.getpid()}"
        try:
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise CheckpointError(f"checkpoint directory {self.directory} cannot be written{context}: "
                                  f"{type(e).__name__}: {e.strerror or e}") from None

    def _bounded(self, what: str, fn: Callable[[], Any], probe: bool = False) -> Any:
        """fn() in a helper thread, waited for at most timeout_s; its error re-raised as CheckpointError.

        The main thread polls the join so signal handlers keep running meanwhile; with `probe`
        it also re-checks the folder every few seconds, so a folder that stops taking writes
        while Orbax waits on it (a save in flight) fails the run then, not after timeout_s."""
        outcome: dict[str, Any] = {}

        def target():
            try:
                outcome["value"] = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the caller below
                outcome["error"] = e

        thread = threading.Thread(target=target, name="checkpoint-call", daemon=True)
        thread.start()
        deadline = time.monotonic() + self.timeout_s
        next_probe = time.monotonic() + _PROBE_EVERY_S
        while thread.is_alive() and time.monotonic() < deadline:
            thread.join(min(1.0, max(0.0, deadline - time.monotonic())))
            if probe and thread.is_alive() and time.monotonic() >= next_probe:
                self._check_writable(f" while {what}")
                next_probe = time.monotonic() + _PROBE_EVERY_S
        if thread.is_alive():
            raise CheckpointError(f"checkpoint {what} in {self.directory} did not finish within "
                                  f"{self.timeout_s:g} s (config checkpoint_timeout_s); a write failed or the "
                                  f"storage stalled")
        if "error" in outcome:
            e = outcome["error"]
            raise CheckpointError(f"checkpoint {what} in {self.directory} failed: {type(e).__name__}: {e}") from e
        return outcome.get("value")

    def _move_aside(self, step: int) -> epath.Path:
        import jax
        target = epath.Path(self.directory).parent / BROKEN_DIR / f"{step}.{time.strftime('%Y%m%dT%H%M%S')}"
        if jax.process_index() == 0:   # one mover; every host has judged the same files
            target.parent.mkdir(parents=True, exist_ok=True)
            self.step_dir(step).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"broken checkpoint {step} moved aside")
        self.manager.reload()
        return target


def describe_restore_error(error: Exception, step_dir: epath.Path) -> str:
    """One line for a failed restore: TensorStore errors carry a spec dump whose kvstore path
    names the parameter; the data lives under state/ocdbt.process_*/d/."""
    text = str(error)
    if "TensorStore" in text:
        names = re.findall(r"'path': '([^/'][^']*?)/?'", text)
        what = f"parameter {names[0]!r}" if names else "a tensor"
        return (f"the data of {what} under {step_dir / 'state'} cannot be read (a truncated or corrupt tensor "
                f"file); {text.split(' See full TensorStore')[0]}")
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"restoring {step_dir} failed: {type(error).__name__}: {first[:300]}"


def write_json(path: str, value: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)
