"""Train LLaVA-1.5 / Vision-Flan: `python -m vflan_jax.train --config configs/NAME.py[:arg] --workdir W`.

Rerunning the same command resumes from the newest complete checkpoint in W (parameters,
optimizer state, step, RNG and every host's data-iterator position), so the loss sequence is
the one an uninterrupted run gives. `--config.init_from=PATH` starts from a model checkpoint
(ours, an HF LLaVA directory, or a finished workdir) with a fresh optimizer; it is ignored
once W holds a checkpoint.

W receives: metrics.jsonl, tensorboard/, checkpoints/, config.json, model_config.json, train.log
(every log record, libraries' INFO included, and the full parameter table; the console shows
vflan_jax's lines, all of them with --verbosity=1), profile/ when config.profile_steps names
steps, and, at the end, model/ (params-only checkpoint + tokenizer: init_from for the next stage;
written atomically), loss_curve.png and summary.json. Rerunning a finished run says so and
changes nothing. Paths may be relative to the working directory.

Exit status (vflan_jax/cli.py): 0 finished; 2 bad input found while setting up (a config field, a
missing file), one line; 75 (EX_TEMPFAIL) stopped by SIGTERM/SIGINT after saving a checkpoint
(rerun to resume; also on a second signal, which exits without saving); 2 also for data that
yields (almost) no usable record (data.max_skip_fraction); 1 other errors, including a non-finite
loss with config.nonfinite='stop', a step that does not fit in device memory, a checkpoint save
that fails or stalls (checkpoint_timeout_s; the message names the folder), a broken newest
checkpoint with resume_fallback=False, and no exit within stop_timeout_s of a signal.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from typing import Iterator

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vflan_jax import cli, parallel
from vflan_jax.checkpoint import CheckpointError, TrainCheckpointer
from vflan_jax.constants import IGNORE_INDEX
from vflan_jax.data.pipeline import build_train_pipeline, device_part, skips_of
from vflan_jax.data.skips import SkipCounter, TooManySkips
from vflan_jax.files import write_json, write_text_atomically
from vflan_jax.models.config import ModelConfig
from vflan_jax.models.llava import LlavaForConditionalGeneration
from vflan_jax.train import config as train_config, parameter_table
from vflan_jax.train.cadence import due
from vflan_jax.train.evaluate import Evaluations, build_evaluators
from vflan_jax.train.finish import RunContext, finish, finished_summary
from vflan_jax.train.finite import FiniteCheck, NonFiniteLoss
from vflan_jax.train.flops import train_step_flops
from vflan_jax.train.inputs import load_tokenizer, prepare_inputs
from vflan_jax.train.metrics import MetricsWriter, ProgressLine, device_peak_tflops
from vflan_jax.train.profile import StepProfiler, profile_dir
from vflan_jax.train.program import DoesNotFit, TrainProgram, build_program
from vflan_jax.train.step import TrainState
from vflan_jax.train.stopping import StopSignal, exit_now
from vflan_jax.train.window import StepWindow

LOG_FILE = "train.log"  # every log record of the run, libraries' included (the console shows vflan_jax's)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the final model.")


@dataclasses.dataclass
class Setup:
    """Everything the loop starts from."""
    run: RunContext
    program: TrainProgram
    state: TrainState
    ckpt: TrainCheckpointer
    data_iter: Iterator
    task_names: list[str]
    pad_values: dict[str, int]   # what common_length pads each array with


def main(argv):
    """The exit statuses of the module docstring; the traceback behind a one-line error goes to train.log."""
    del argv
    try:
        try:
            setup = set_up(_CONFIG.value, cli.resolve_path(_WORKDIR.value))
        except (ValueError, FileNotFoundError) as e:   # found before the first step: the input's fault
            logging.error("bad input", exc_info=True, extra=cli.FILE_ONLY)
            print(f"error: {e}", file=sys.stderr)
            return cli.EXIT_BAD_INPUT
        return train(setup) if setup is not None else cli.EXIT_OK
    except CheckpointError as e:   # a failed or stalled save, an unusable checkpoint
        logging.error("checkpoint failure", exc_info=True, extra=cli.FILE_ONLY)
        exit_now(str(e), cli.EXIT_FAILURE)
    except TooManySkips as e:      # the data is (mostly) unusable: bad input, not a transient error
        exit_now(str(e), cli.EXIT_BAD_INPUT)
    except (NonFiniteLoss, DoesNotFit) as e:
        logging.error("%s", e)
        return cli.EXIT_FAILURE


def set_up(cfg, workdir: str | None) -> Setup | None:
    """Logging, inputs, model, data, state, evaluators and the workdir's files; None when the
    workdir already holds this finished run. Raises ValueError/FileNotFoundError on bad input."""
    if not workdir:
        raise app.UsageError("--workdir is required")
    cli.route_logging(verbose=flags.FLAGS.verbosity >= 1, keep_for_file=not cli.is_url(workdir))
    if cfg.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir",
                          cli.resolve_path(cfg.compilation_cache_dir.format(workdir=workdir)))
    parallel.initialize_distributed()
    is_main = jax.process_index() == 0
    if not cli.is_url(workdir):  # library INFO (Orbax, JAX) lands here, not on the console
        cli.log_to_file(os.path.join(workdir, LOG_FILE if is_main else f"train.{jax.process_index()}.log"))
    init_path = prepare_inputs(cfg, workdir)
    train_config.validate(cfg, jax.device_count(), jax.process_count())
    mesh = parallel.make_mesh((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
    rules = train_config.sharding_rules(cfg)   # DEFAULT_RULES + config.sharding_overrides
    ckpt = TrainCheckpointer(workdir, max_to_keep=cfg.max_checkpoints_to_keep, async_save=cfg.async_checkpointing,
                             timeout_s=cfg.checkpoint_timeout_s)
    resume_step = ckpt.latest_step()
    done = finished_summary(workdir, cfg.total_steps, resume_step)
    if done is not None:
        if is_main:
            print(f"{workdir} holds a finished run ({done['steps']} steps, model in {done['model']}): nothing to do. "
                  "Use a new --workdir to train again, or raise --config.total_steps to continue.")
        ckpt.close()
        return None

    # --- model and parameters -------------------------------------------------------------
    # On resume the workdir has everything: init_from is not read again.
    init_params, init_model_cfg, init_tokenizer_dir = None, None, None
    if resume_step is not None:
        init_model_cfg = ModelConfig.from_dict(_read_json(os.path.join(workdir, "model_config.json")))
        init_tokenizer_dir = _read_json(os.path.join(workdir, "config.json")).get("tokenizer_used")
    elif init_path:
        from vflan_jax.checkpoint import load_any
        init_params, init_model_cfg, init_tokenizer_dir = load_any(init_path, mesh, rules)
    model_cfg = train_config.model_config(cfg, init_model_cfg)
    if init_model_cfg is not None:
        train_config.check_init_shapes(model_cfg, init_model_cfg, init_path or workdir)
    if init_params is not None:   # LoRA: fresh adapters beside init_from's (merged, quantized) base
        from vflan_jax.models.lora_params import for_model
        init_params = for_model(init_params, init_model_cfg, model_cfg, seed=cfg.seed)
    tokenizer, tokenizer_dir = load_tokenizer(cfg, init_path, init_tokenizer_dir)
    if len(tokenizer) > model_cfg.text.vocab_size:
        raise ValueError(f"config tokenizer: {tokenizer_dir} has {len(tokenizer)} tokens but the model's "
                         f"vocabulary is {model_cfg.text.vocab_size}")

    # --- data -------------------------------------------------------------------------------
    dataset, info = build_train_pipeline(
        cfg.data, tokenizer, image_token_id=model_cfg.image_token_id, tokens_per_image=model_cfg.tokens_per_image,
        image_size=model_cfg.vision.image_size, per_host_batch_size=cfg.global_batch_size // jax.process_count(),
        seed=cfg.seed)
    data_iter = iter(dataset)  # (the pipeline has logged the task-mixture table)

    # --- optimizer and state ---------------------------------------------------------------
    # Shardings derived from the parameters' (moments in their parameter's shards), explicit on both
    # programs; the first train step's compile is the fit check (DoesNotFit names the fields to change).
    program = build_program(cfg, model_cfg, mesh, num_tasks=len(info.task_names), rules=rules)
    if is_main:
        parameter_table.log_tables(program.abstract_params, program.param_shardings, program.mask)
    if resume_step is not None:
        # The newest step that reads back whole; a broken one is named and moved aside (or stops the run).
        resume_step, state, meta = ckpt.restore_newest(program.abstract_state, data_iter,
                                                       fallback=cfg.resume_fallback)
        skipped = SkipCounter.from_dict(meta["skipped"])
        logging.info("resumed from step %d", resume_step)
    else:
        if init_params is None:
            init_params, _ = parallel.init_params(model_cfg, mesh, rules, seed=cfg.seed)
        state = program.create_state(init_params)
        del init_params
        skipped = SkipCounter().merge(info.skipped)   # records rejected while reading the files

    # --- evaluation on held-out tasks (and a validation split when the config names one) ----
    evaluations = Evaluations(build_evaluators(cfg, info, tokenizer, model_cfg),
                              LlavaForConditionalGeneration(model_cfg), mesh, rules)

    # --- the workdir's files ----------------------------------------------------------------
    writer = MetricsWriter(workdir, enabled=is_main)
    writer.truncate_after(int(state.step))
    if is_main:
        write_json(os.path.join(workdir, "config.json"), {**cfg.to_dict(), "tokenizer_used": tokenizer_dir})
        write_text_atomically(os.path.join(workdir, "model_config.json"), model_cfg.to_json())
    run = RunContext(workdir=workdir, cfg=cfg, model_cfg=model_cfg, tokenizer_dir=tokenizer_dir, writer=writer,
                     evaluations=evaluations, skipped=skipped, is_main=is_main)
    pad_values = {"input_ids": tokenizer.pad_token_id or 0, "targets": IGNORE_INDEX, "task_ids": -1}
    return Setup(run=run, program=program, state=state, ckpt=ckpt, data_iter=data_iter,
                 task_names=list(info.task_names), pad_values=pad_values)


def train(setup: Setup) -> int:
    """The loop (step, log, evaluate, checkpoint, stop on a signal), then the end of the run.
    Returns the exit status: 0 finished, 75 stopped by a signal after saving."""
    run, program, ckpt, state, data_iter = setup.run, setup.program, setup.ckpt, setup.state, setup.data_iter
    cfg, step = run.cfg, int(setup.state.step)
    window = StepWindow(setup.task_names, program.schedules, run.skipped, step_flops(cfg, run.model_cfg, program.mask),
                        peak_flops_per_s())
    finite = FiniteCheck(cfg.nonfinite)
    profiler = StepProfiler(cfg.profile_steps, profile_dir(run.workdir))
    progress = ProgressLine(cfg.total_steps, step)
    stop = StopSignal(cfg.stop_timeout_s)
    preempted = False

    def save():
        ckpt.save(step, state, data_iter, {"skipped": run.skipped.state(), "step": step})

    try:
        while step < cfg.total_steps:
            profiler.begin(step + 1)
            try:
                host_batch = next(data_iter)
            except StopIteration:
                logging.info("data exhausted after %d steps (data.num_epochs=%s)", step, cfg.data.num_epochs)
                break
            run.skipped.merge(skips_of(host_batch))
            local = common_length(device_part(host_batch), setup.pad_values)
            state, metrics = program.train_step(state, parallel.global_batch(local, program.mesh, program.rules))
            step += 1
            profiler.end(step, metrics)
            finite.push(step, metrics["finite"], host_batch["meta_record_ids"])
            window.add(metrics, local, host_batch["meta_record_ids"])
            if due(step, cfg.log_every_steps, cfg.total_steps, last=True):
                finite.flush()
                values = window.summary(step)
                if due(step, cfg.eval_every_steps, cfg.total_steps):
                    values["eval"] = run.evaluations.run(state.params)
                run.writer.write(step, values)
                if run.is_main:
                    print(progress.line(step, values), flush=True)
            if due(step, cfg.checkpoint_every_steps, cfg.total_steps):
                save()
            if stop.should_stop():
                preempted = True
                break
        finite.flush()
    except NonFiniteLoss:
        ckpt.wait()   # the last good checkpoint stays whole
        raise
    profiler.close(step)
    if ckpt.latest_step() != step:
        save()
    ckpt.wait()
    if preempted:
        logging.warning("stopped at step %d by %s; checkpoint saved; rerun the same command to resume",
                        step, stop.received)
        ckpt.close()
        run.writer.close()
        return cli.EXIT_PREEMPTED
    finish(run, state.params, step)
    ckpt.close()
    return cli.EXIT_OK


def step_flops(cfg, model_cfg: ModelConfig, mask: dict):
    """FLOPs of one global step as a function of (seq_len, image_slots), for MFU."""
    return lambda seq_len, image_slots: train_step_flops(
        model_cfg, batch=cfg.global_batch_size, seq_len=seq_len, image_slots=image_slots,
        llm_trainable=any(v for p, v in mask.items() if p[0] == "language_model"),
        projector_trainable=any(v for p, v in mask.items() if p[0] == "multi_modal_projector"))


def peak_flops_per_s() -> float | None:
    """All devices' dense bf16 peak; None on a device of unknown peak (mfu is then null)."""
    peak = device_peak_tflops()
    return jax.device_count() * peak * 1e12 if peak else None


def common_length(local: dict, pad_values: dict) -> dict:
    """Hosts must pass equal shapes to the global batch; pad-to-longest batches may differ in
    length per host, so every host pads to the longest (one tiny all-gather per step)."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils
    length = local["input_ids"].shape[1]
    longest = int(multihost_utils.process_allgather(np.array([length])).max())
    if longest == length:
        return local
    return {k: np.pad(v, [(0, 0), (0, longest - length)], constant_values=pad_values.get(k, 0))
            if v.ndim == 2 and v.shape[1] == length and k != "image_mask" else v for k, v in local.items()}


def _read_json(path):
    with open(path) as f:
        return json.load(f)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=cli.parse_absl_flags)
