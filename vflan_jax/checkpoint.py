"""Checkpoints, both kinds, and the tokenizer that travels with them.

The params-only model checkpoint: what `convert import-hf` writes, `convert export-hf` reads,
the trainer writes at the end (workdir/model) and starts from (init_from), generate and eval load.

    C/params/             Orbax (PyTreeCheckpointer) checkpoint of the nested params tree
    C/model_config.json   ModelConfig.to_json()
    C/tokenizer/          HF tokenizer files, when known

Loading restores every array straight into its sharding from parallel.param_shardings, so a
model never materialises on one device or host. Paths may be local or anything Orbax/etils
handles (gs://...).

The train-state checkpoint (`TrainCheckpointer`): one Orbax step directory under
workdir/checkpoints/ holds the train state (params, optimizer state, step, RNG), every host's
data-iterator state and the run's bookkeeping. Orbax writes a step into a temporary directory and
renames it only once complete, so a save interrupted by a crash or kill is invisible to
`latest_step()` and resume uses the previous one.

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
import math
import os
import pathlib
import re
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from vflan_jax.cli import resolve_path
from vflan_jax.files import copy_tree
from vflan_jax.models.config import ModelConfig
from vflan_jax.parallel import DEFAULT_RULES, abstract_params, make_mesh, param_shardings, with_shardings

if TYPE_CHECKING:
    import grain

# Model checkpoint layout.
PARAMS = "params"
CONFIG = "model_config.json"
TOKENIZER = "tokenizer"
# Files of an Orbax step directory that are JSON (checked before a restore is attempted).
_JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding", "metadata")
BROKEN_DIR = "checkpoints_broken"
_PROBE_EVERY_S = 5.0   # how often a waiting save re-checks that its folder still takes writes


# ---------------------------------------------------------------------- model checkpoints (params only)
def is_model_checkpoint(path) -> bool:
    path = epath.Path(path)
    return (path / CONFIG).exists() and (path / PARAMS).exists()


def _host_bytes(x) -> int:
    shards = getattr(x, "addressable_shards", None)
    return sum(s.data.nbytes for s in shards) if shards is not None else x.nbytes


def save_model(path, params, model_config: ModelConfig, tokenizer=None, tokenizer_dir=None,
               overwrite: bool = False) -> None:
    """Write params (sharded jax.Arrays are written shard by shard) + config (+ tokenizer).

    tokenizer: a transformers tokenizer object (save_pretrained), or tokenizer_dir: a directory
    whose tokenizer files are copied."""
    path = epath.Path(resolve_path(path))  # Orbax refuses relative paths
    # Orbax copies arrays to host before writing; by default all at once (a second copy of the
    # model). Cap the bytes in flight at the largest array this host holds. No compression:
    # weights barely compress and zstd doubles the save time.
    largest = max(_host_bytes(x) for x in jax.tree.leaves(params))
    limit_gb = max(1, math.ceil(largest / 1e9))
    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=limit_gb, save_device_host_concurrent_gb=limit_gb,
                                          use_compression=False)
    ocp.Checkpointer(handler).save(path / PARAMS, args=ocp.args.PyTreeSave(params), force=overwrite)
    if jax.process_index() != 0:
        return
    (path / CONFIG).write_text(model_config.to_json())  # (inside PATH.partial when saved atomically)
    if tokenizer is not None:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            copy_tree(epath.Path(tmp), path / TOKENIZER)
    elif tokenizer_dir is not None:
        from vflan_jax.convert.import_plan import TOKENIZER_FILES
        (path / TOKENIZER).mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            src = epath.Path(tokenizer_dir) / name
            if src.exists():
                (path / TOKENIZER / name).write_bytes(src.read_bytes())


def save_model_atomically(path, params, model_config: ModelConfig, tokenizer=None, tokenizer_dir=None,
                          replace: bool = False) -> None:
    """save_model into PATH.partial, then renamed to PATH: nobody ever sees a half-written model
    at PATH, and a failure or a kill leaves PATH as it was (a later call rewrites the .partial).
    replace: an existing PATH is swapped for the new one; otherwise it is a FileExistsError."""
    path = epath.Path(resolve_path(path))
    partial = path.parent / (path.name + ".partial")
    if path.exists() and not replace:
        raise FileExistsError(f"{path} already exists")
    try:
        save_model(partial, params, model_config, tokenizer, tokenizer_dir, overwrite=True)
    except BaseException:
        if jax.process_index() == 0:
            partial.rmtree(missing_ok=True)
        raise
    if jax.process_index() != 0:
        return
    if path.exists():
        old = path.parent / (path.name + ".old")
        old.rmtree(missing_ok=True)
        path.rename(old)
        partial.rename(path)
        old.rmtree()
    else:
        partial.rename(path)


def load_model_config(path) -> ModelConfig:
    return ModelConfig.from_dict(json.loads((epath.Path(path) / CONFIG).read_text()))


def load_model(path, mesh=None, rules=DEFAULT_RULES, dtype: str | None = None) -> tuple[dict, ModelConfig]:
    """(params, model_config). mesh None: parallel.make_mesh() over all devices. dtype casts the
    stored parameters on restore (and is recorded as the config's param_dtype)."""
    path = epath.Path(resolve_path(path))  # Orbax refuses relative paths
    cfg = load_model_config(path)
    if dtype is not None:
        cfg = cfg.replace(param_dtype=str(jnp.dtype(dtype)))
    mesh = mesh if mesh is not None else make_mesh()
    boxed = abstract_params(cfg)
    shardings = param_shardings(boxed, mesh, rules)
    target = with_shardings(nn.unbox(boxed), shardings)
    # As in save_model: bytes in flight capped at the largest array, not the whole model.
    largest = max(x.size * x.dtype.itemsize for x in jax.tree.leaves(target))
    handler = ocp.PyTreeCheckpointHandler(restore_concurrent_gb=max(1, math.ceil(largest / 1e9)))
    check_stored_shapes(path, target)
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    return ocp.Checkpointer(handler).restore(path / PARAMS, args=args), cfg


def check_stored_shapes(path, target) -> None:
    """The model_config.json must describe the stored tensors (an edited one would otherwise fail
    inside Orbax naming no parameter): name each parameter that differs, with both shapes."""
    from vflan_jax.convert.errors import ConversionError
    stored = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path) / PARAMS)

    def flat(tree):
        return {"/".join(str(getattr(k, "key", k)) for k in keys): leaf
                for keys, leaf in jax.tree_util.tree_flatten_with_path(getattr(tree, "tree", tree))[0]}
    have, want = flat(stored), flat(target)
    problems = [f"{name}: config implies {list(want[name].shape)}, stored {list(have[name].shape)}"
                for name in sorted(want) if name in have and tuple(have[name].shape) != tuple(want[name].shape)]
    problems += [f"{name}: in the config's model, not stored" for name in sorted(set(want) - set(have))]
    problems += [f"{name}: stored, not in the config's model" for name in sorted(set(have) - set(want))]
    if problems:
        more = f"; and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise ConversionError(f"{epath.Path(path) / CONFIG} disagrees with the tensors in {epath.Path(path) / PARAMS}: "
                              + "; ".join(problems[:8]) + more)


def tokenizer_dir(path) -> epath.Path | None:
    d = epath.Path(path) / TOKENIZER
    return d if d.exists() else None


def load_tokenizer(directory):
    """The transformers tokenizer in a folder of HF tokenizer files (None -> None). A remote folder
    (gs://) is copied to a temporary one first: transformers reads local files only."""
    if directory is None:
        return None
    from transformers import AutoTokenizer
    if os.path.isdir(str(directory)):
        return AutoTokenizer.from_pretrained(str(directory))
    with tempfile.TemporaryDirectory() as tmp:
        copy_tree(epath.Path(directory), epath.Path(tmp))
        return AutoTokenizer.from_pretrained(tmp)


def load_any(path, mesh=None, rules=DEFAULT_RULES, dtype: str | None = None):
    """(params, model_config, tokenizer_dir or None) from a vflan_jax model checkpoint, or from a
    transformers LlavaForConditionalGeneration directory imported on the fly (nothing written)."""
    if is_model_checkpoint(path):
        params, cfg = load_model(path, mesh, rules, dtype)
        return params, cfg, tokenizer_dir(path)
    from vflan_jax.convert.errors import ConversionError
    from vflan_jax.convert.hf_import import import_llava_hf
    if not (epath.Path(path) / "config.json").exists():
        raise ConversionError(f"{path}: neither a vflan_jax model checkpoint ({CONFIG} + {PARAMS}/) nor a "
                              "transformers LLaVA directory (config.json + *.safetensors)")
    return import_llava_hf(pathlib.Path(path), mesh, rules, param_dtype=dtype or "float32", progress=False)


# ---------------------------------------------------------------------- train-state checkpoints
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

    def save(self, step: int, state: Any, data_iterator: "grain.DatasetIterator", meta: dict) -> None:
        import grain
        self._check_writable()
        self._bounded(f"saving step {step}", lambda: self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=grain.checkpoint.CheckpointSave(data_iterator),
            meta=ocp.args.JsonSave(meta)), force=True), probe=True)

    def restore(self, step: int, abstract_state: Any, data_iterator: "grain.DatasetIterator") -> tuple[Any, dict]:
        """Restores the state into the shardings of `abstract_state` and the iterator in place."""
        import grain
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data_iter=grain.checkpoint.CheckpointRestore(data_iterator),
            meta=ocp.args.JsonRestore()))
        logging.info("restored step %d from %s", step, self.directory)
        return restored["state"], dict(restored["meta"])

    def restore_newest(self, abstract_state: Any, data_iterator: "grain.DatasetIterator", *,
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
                fallback_to = f", {older}" if older is not None else ""
                raise CheckpointError(f"checkpoint step {step} is broken: {problem} (config resume_fallback=True "
                                      f"resumes from the newest intact step{fallback_to})")
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
