"""What a run reads before it builds anything: the config's paths made absolute, the offline task
suite (when configured) and the tokenizer."""
from __future__ import annotations

import os

import jax

from vflan_jax import cli
from vflan_jax.checkpoint import load_tokenizer as load_tokenizer_dir
from vflan_jax.train import config as train_config


def resolve_config_paths(cfg) -> None:
    """Every path the config names, made absolute once here (URLs kept): the data workers, Orbax
    and the saved config.json then never depend on the directory the command ran in."""
    with cfg.unlocked():
        for source in list(cfg.data.sources.values()) + list(cfg.eval_data.values()):
            source.paths = tuple(cli.resolve_path(p) for p in source.paths)
            source.image_folder = cli.resolve_path(source.image_folder)
            if source.get("prepared"):
                source.prepared = cli.resolve_path(source.prepared)
            if source.get("tfds_data_dir"):
                source.tfds_data_dir = cli.resolve_path(source.tfds_data_dir)
        cfg.tokenizer = cli.resolve_path(cfg.tokenizer)
        cfg.init_from = cli.resolve_path(cfg.init_from)


def prepare_inputs(cfg, workdir: str) -> str | None:
    """Writes the offline task suite (when configured), resolves the config's paths; returns the
    init_from model path (a finished workdir's model/ when init_from names the workdir)."""
    if cfg.synthetic_suite:
        from vflan_jax.data.synthetic import build_tokenizer, suite_texts, write_task_suite
        root = cfg.synthetic_suite.format(workdir=workdir)
        if jax.process_index() == 0:  # one writer; the other hosts wait, then read the same files
            suite = write_task_suite(root, instances_per_task=cfg.synthetic_instances_per_task)
            build_tokenizer(suite.tokenizer_dir, suite_texts(suite))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("synthetic suite written")
        suite = write_task_suite(root, instances_per_task=cfg.synthetic_instances_per_task)
        train_config.substitute_paths(cfg, {"synthetic": suite.root})
    resolve_config_paths(cfg)
    init = cfg.init_from
    if init and os.path.isdir(train_config.workdir_model_path(init)):
        init = train_config.workdir_model_path(init)
    return init


def load_tokenizer(cfg, init_path, init_tokenizer_dir):
    """(tokenizer, its folder): config.tokenizer, else the one init_from (or the resumed run) carries."""
    path = cfg.tokenizer or init_tokenizer_dir
    if not path:
        raise ValueError(f"config tokenizer: not set and init_from={init_path} carries no tokenizer")
    if not os.path.isdir(path):
        raise ValueError(f"config tokenizer: {path} is not a directory with HF tokenizer files")
    return load_tokenizer_dir(path), path
