"""Training checkpoints: one Orbax step directory holds the train state (params, optimizer state,
step, RNG), every host's data-iterator state and the run's config.

Orbax writes a step into a temporary directory and renames it only once complete, so a save
interrupted by a crash or kill is invisible to `latest_step()` and resume uses the previous one.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import grain
import orbax.checkpoint as ocp


class TrainCheckpointer:
    def __init__(self, workdir: str, *, max_to_keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=grain.checkpoint.CheckpointSave(data_iterator),
            meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, abstract_state: Any, data_iterator: grain.DatasetIterator) -> tuple[Any, dict]:
        """Restores the state into the shardings of `abstract_state` and the iterator in place."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data_iter=grain.checkpoint.CheckpointRestore(data_iterator),
            meta=ocp.args.JsonRestore()))
        logging.info("restored step %d from %s", step, self.directory)
        return restored["state"], dict(restored["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()



def write_json(path: str, value: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)
