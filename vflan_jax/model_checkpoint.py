"""The params-only model checkpoint: what `convert import-hf` writes, `convert export-hf` reads,
and the trainer / generate / eval start from.

    C/params/             Orbax (StandardCheckpointer) checkpoint of the nested params tree
    C/model_config.json   ModelConfig.to_json()
    C/tokenizer/          HF tokenizer files, when known

Loading restores every array straight into its sharding from parallel.param_shardings, so a
model never materialises on one device or host. Paths may be local or anything Orbax/etils
handles (gs://...).
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from vflan_jax.cli import resolve_path
from vflan_jax.models.config import ModelConfig
from vflan_jax.parallel import DEFAULT_RULES, abstract_params, make_mesh, param_shardings

PARAMS = "params"
CONFIG = "model_config.json"
TOKENIZER = "tokenizer"


def is_model_checkpoint(path) -> bool:
    path = epath.Path(path)
    return (path / CONFIG).exists() and (path / PARAMS).exists()


def _copy_tree(src: epath.Path, dst: epath.Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file():
            (dst / item.name).write_bytes(item.read_bytes())


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
    (path / CONFIG).write_text(model_config.to_json())
    if tokenizer is not None:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            _copy_tree(epath.Path(tmp), path / TOKENIZER)
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
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings)
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
        raise ConversionError(f"{epath.Path(path) / CONFIG} disagrees with the tensors in {epath.Path(path) / PARAMS}: "
                              + "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else ""))


def tokenizer_dir(path) -> epath.Path | None:
    d = epath.Path(path) / TOKENIZER
    return d if d.exists() else None


def load_tokenizer(path):
    """The checkpoint's transformers tokenizer, or None when it has none."""
    from transformers import AutoTokenizer
    d = tokenizer_dir(path)
    if d is None:
        return None
    if isinstance(d, pathlib.Path) or os.path.isdir(str(d)):
        return AutoTokenizer.from_pretrained(str(d))
    with tempfile.TemporaryDirectory() as tmp:  # remote (gs://): transformers reads local files only
        _copy_tree(d, epath.Path(tmp))
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

