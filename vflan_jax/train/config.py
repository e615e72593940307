"""The trainer's ConfigDict: shared defaults, validation with messages naming the field, and the
model config it implies.

Every config in configs/ starts from `base_config()` and changes what its recipe says.
"""
from __future__ import annotations

import dataclasses
import math
import os

import ml_collections
from ml_collections import config_dict

from vflan_jax import parallel
from vflan_jax.data.pipeline import default_data_config, validate_data_config
from vflan_jax.models.config import ModelConfig, get_preset
from vflan_jax.models.lora import default_lora_config, lora_config_from
from vflan_jax.train.optim import default_optim_config

NONFINITE = ("stop", "skip")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1000
    c.log_every_steps = 10
    c.checkpoint_every_steps = 500
    c.max_checkpoints_to_keep = 2
    c.async_checkpointing = True
    c.checkpoint_timeout_s = 1800.0  # a save (or waiting for one) taking longer fails the run, naming the folder
    c.resume_fallback = True        # a broken newest checkpoint: resume from the newest intact one (False: stop)
    c.stop_timeout_s = 600.0        # after SIGTERM/SIGINT, exit (status 1) if saving has not ended by then
    c.global_batch_size = 128
    c.grad_accum_steps = 1
    c.nonfinite = "stop"            # "stop": end the run naming the step and records; "skip": drop the update
    c.init_from = config_dict.placeholder(str)   # our checkpoint, an HF LLaVA dir, or a finished workdir
    c.tokenizer = config_dict.placeholder(str)   # HF tokenizer dir; None = the one next to init_from
    c.synthetic_suite = config_dict.placeholder(str)  # build the offline task suite here ("{workdir}" allowed);
    c.synthetic_instances_per_task = 64               # data paths may then say "{synthetic}"
    # Persistent XLA compilation cache ("{workdir}" allowed): a resumed or repeated run loads its
    # compiled step instead of compiling it again. None = JAX's default (JAX_COMPILATION_CACHE_DIR).
    c.compilation_cache_dir = config_dict.placeholder(str)
    c.eval_every_steps = 0          # held-out/val evaluation cadence (0 = only at the end)
    c.eval_max_examples = 256
    c.eval_data = ml_collections.ConfigDict()   # name -> source_config(...): extra eval-only splits (e.g. val)
    # Steps (1-based, as metrics.jsonl counts them) to trace into workdir/profile for TensorBoard
    # (train/profile.py); consecutive steps form one trace. --config.profile_steps="(5, 6)".
    c.profile_steps = ()

    c.model = ml_collections.ConfigDict()
    c.model.preset = "tiny"         # models/config.py PRESETS; "checkpoint" = the shapes of init_from
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat_policy = "full"
    c.model.attention_impl = "auto"    # models/attention.py: TPU splash, GPU cudnn, CPU blockwise
    c.model.loss_chunk_size = 1024     # lm_head + cross-entropy per 1024 tokens (models/losses.py); 0 = full logits
    c.model.overrides = ml_collections.ConfigDict()   # ModelConfig fields, e.g. {"text": {"num_layers": 4}}

    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    # Logical axis name -> mesh axes, merged onto parallel.DEFAULT_RULES (one entry per logical
    # name, so that the command line can set any: --config.sharding_overrides.embed=data,fsdp).
    # Unset (None) keeps the default; "none" replicates; "data,fsdp" shards over both. Checked at
    # set-up: names, mesh axes, and two rules claiming one mesh axis in a parameter (exit 2).
    c.sharding_overrides = ml_collections.ConfigDict(
        {name: config_dict.placeholder(str) for name, _ in parallel.DEFAULT_RULES})
    c.optim = default_optim_config()
    c.lora = default_lora_config()   # models/lora.py; rank > 0 trains adapters instead of the LLM
    c.data = default_data_config()
    return c


def model_config(c: ml_collections.ConfigDict, checkpoint_config: ModelConfig | None = None) -> ModelConfig:
    """The architecture from the preset (or the init_from checkpoint) plus the run's computation settings."""
    compute = dict(dtype=c.model.dtype, param_dtype=c.model.param_dtype, remat_policy=c.model.remat_policy,
                   attention_impl=c.model.attention_impl, loss_chunk_size=c.model.loss_chunk_size)
    compute["text.lora"] = lora_config_from(c.lora)   # "config lora.<field>: ..." on a bad value
    overrides = _flat(c.model.overrides.to_dict()) if c.model.overrides else {}  # -> {"text.num_layers": 4}
    try:
        if c.model.preset == "checkpoint":
            if checkpoint_config is None:
                raise ValueError("model.preset='checkpoint' needs init_from")
            return checkpoint_config.replace(**overrides, **compute)
        return get_preset(c.model.preset, **overrides, **compute)
    except (ValueError, TypeError) as e:
        raise ValueError(f"config model: {e}") from None


def check_init_shapes(configured: ModelConfig, loaded: ModelConfig, source: str) -> None:
    """init_from must have the configured architecture; name every field that differs."""
    def arch(m):
        return {k: v for k, v in dataclasses.asdict(m).items()
                if k not in ("dtype", "param_dtype", "remat_policy", "attention_impl", "loss_chunk_size")}

    a, b = ({k: v for k, v in _flat(arch(m)).items() if not k.startswith("text.lora")}  # adapters: added on load
            for m in (configured, loaded))
    diff = [f"model.{k}: config {a[k]!r} vs checkpoint {b.get(k)!r}" for k in sorted(a) if a[k] != b.get(k)]
    if diff:
        raise ValueError(f"config init_from={source}: the checkpoint's model differs from the configured one: "
                         + "; ".join(diff) + " (use model.preset='checkpoint' to take the checkpoint's shapes)")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def sharding_rules(c: ml_collections.ConfigDict) -> tuple:
    """parallel.DEFAULT_RULES with the config's sharding_overrides (unset entries keep the default)."""
    overrides = {name: axes for name, axes in c.sharding_overrides.items() if axes is not None}
    try:
        return parallel.rules_with(overrides)
    except parallel.ShardingRuleError as e:
        raise ValueError(f"config sharding_overrides.{e}") from None


def validate(c: ml_collections.ConfigDict, num_devices: int, process_count: int) -> None:
    """Impossible settings fail before any work, naming the field."""
    def bad(field, msg):
        raise ValueError(f"config {field}: {msg}")

    for field in ("total_steps", "log_every_steps", "checkpoint_every_steps", "global_batch_size", "grad_accum_steps"):
        if not isinstance(c[field], int) or c[field] < 1:
            bad(field, f"must be an int >= 1, got {c[field]!r}")
    for field, value in _flat(c.to_dict()).items():   # nan/inf would only show up later as a "bad batch"
        for v in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                bad(field, f"must be finite, got {value}")
    for field in ("checkpoint_timeout_s", "stop_timeout_s"):
        if not isinstance(c[field], (int, float)) or c[field] <= 0:
            bad(field, f"must be > 0 seconds, got {c[field]!r}")
    if c.nonfinite not in NONFINITE:
        bad("nonfinite", f"{c.nonfinite!r} is not one of {NONFINITE}")
    try:
        data, fsdp, tensor = parallel.resolve_mesh_shape((c.mesh.data, c.mesh.fsdp, c.mesh.tensor), num_devices)
    except ValueError as e:
        bad("mesh", str(e))
    rules = sharding_rules(c)   # "config sharding_overrides.<name>: ..." on an unknown name or mesh axis
    if rules != parallel.DEFAULT_RULES and c.model.preset != "checkpoint":   # the defaults never clash
        try:   # abstract shapes only: a clash is named before any data is read
            parallel.check_rules(parallel.abstract_params(model_config(c)), rules)
        except parallel.ShardingRuleError as e:
            bad("sharding_overrides", str(e))
    batch_shards = data * fsdp
    if c.global_batch_size % batch_shards:
        bad("global_batch_size", f"{c.global_batch_size} is not divisible by mesh data x fsdp = {batch_shards}")
    if c.global_batch_size % process_count:
        bad("global_batch_size", f"{c.global_batch_size} is not divisible by the {process_count} hosts")
    if c.global_batch_size % (c.grad_accum_steps * batch_shards):
        bad("grad_accum_steps", f"global_batch_size {c.global_batch_size} is not divisible by grad_accum_steps "
            f"{c.grad_accum_steps} x data x fsdp {batch_shards}")
    if not 0 <= c.optim.warmup_ratio < 1:
        bad("optim.warmup_ratio", f"must be in [0, 1), got {c.optim.warmup_ratio}")
    if c.optim.learning_rate <= 0:
        bad("optim.learning_rate", f"must be > 0, got {c.optim.learning_rate}")
    if c.model.preset == "checkpoint" and not c.init_from:
        bad("model.preset", "'checkpoint' takes the shapes of init_from, which is not set")
    if not c.init_from and not c.tokenizer and not c.synthetic_suite:
        bad("tokenizer", "no tokenizer: set tokenizer=DIR (or init_from a checkpoint that carries one)")
    steps = c.profile_steps
    if not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= c.total_steps for s in steps):
        bad("profile_steps", f"must be step numbers in [1, total_steps={c.total_steps}], got {tuple(steps)!r}")
    validate_data_config(c.data)   # its messages say "data config: <field>: ..."


def substitute_paths(c: ml_collections.ConfigDict, values: dict[str, str]) -> None:
    """Fill '{synthetic}'-style placeholders in data source paths and the tokenizer path."""
    def fill(s):
        return s.format(**values) if isinstance(s, str) and "{" in s else s
    with c.unlocked():
        for source in list(c.data.sources.values()) + list(c.eval_data.values()):
            source.paths = tuple(fill(p) for p in source.paths)
            source.image_folder = fill(source.image_folder)
        c.tokenizer = fill(c.tokenizer)


def workdir_model_path(workdir: str) -> str:
    """Where a finished run leaves its params-only model checkpoint (init_from accepts the workdir)."""
    return os.path.join(workdir, "model")
