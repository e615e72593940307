"""Train LLaVA-1.5 / Vision-Flan: `python -m vflan_jax.train --config configs/NAME.py[:arg] --workdir W`.

Rerunning the same command resumes from the newest complete checkpoint in W (parameters,
optimizer state, step, RNG and every host's data-iterator position), so the loss sequence is
the one an uninterrupted run gives. `--config.init_from=PATH` starts from a model checkpoint
(ours, an HF LLaVA directory, or a finished workdir) with a fresh optimizer; it is ignored
once W holds a checkpoint.

W receives: metrics.jsonl, tensorboard/, checkpoints/, config.json, model_config.json, train.log
(every log record, libraries' INFO included; the console shows vflan_jax's lines, all of them
with --verbosity=1) and, at the end, model/ (params-only checkpoint + tokenizer: init_from for
the next stage; written atomically), loss_curve.png and summary.json. Rerunning a finished run
says so and changes nothing. Paths may be relative to the working directory.

Exit status (vflan_jax/cli.py): 0 finished; 2 bad input found while setting up (a config field, a
missing file), one line; 75 (EX_TEMPFAIL) stopped by SIGTERM/SIGINT after saving a checkpoint
(rerun to resume; also on a second signal, which exits without saving); 2 also for data that
yields (almost) no usable record (data.max_skip_fraction); 1 other errors, including a non-finite
loss with config.nonfinite='stop', a checkpoint save that fails or stalls (checkpoint_timeout_s;
the message names the folder), a broken newest checkpoint with resume_fallback=False, and no exit
within stop_timeout_s of a signal.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vflan_jax import cli, parallel
from vflan_jax.train import config as train_config
from vflan_jax.checkpoint import CheckpointError, TrainCheckpointer, write_json
from vflan_jax.data.pipeline import build_train_pipeline, device_part, skips_of
from vflan_jax.data.skips import SkipCounter, TooManySkips
from vflan_jax.train.flops import train_step_flops
from vflan_jax.train.evaluate import build_evaluators, make_eval_fn
from vflan_jax.train.metrics import MetricsWriter, ProgressLine, device_peak_tflops, plot_loss_curve
from vflan_jax.models.llava import LlavaForConditionalGeneration
from vflan_jax.train.program import build_program, describe_parameters

EXIT_PREEMPTED = cli.EXIT_PREEMPTED
SUMMARY = "summary.json"
LOG_FILE = "train.log"  # every log record of the run, libraries' included (the console shows vflan_jax's)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the final model.")


class NonFiniteLoss(RuntimeError):
    pass


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
                     "checkpoint", EXIT_PREEMPTED)
        self.received = name
        logging.warning("%s received: finishing this step, then saving (send it again to exit at once)", name)
        if self.timeout_s:
            watchdog = threading.Timer(self.timeout_s, exit_now, args=(
                f"still running {self.timeout_s:g} s after {name} (config stop_timeout_s): exiting; a rerun "
                "resumes from the newest checkpoint", 1))
            watchdog.daemon = True
            watchdog.start()

    def should_stop(self) -> bool:
        flag = self.received is not None
        if jax.process_count() > 1:  # every host must stop at the same step
            from jax.experimental import multihost_utils
            flag = bool(multihost_utils.process_allgather(np.array(flag)).any())
        return flag


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


def prepare_inputs(cfg, workdir):
    """Offline task suite (when configured) and the tokenizer/init_from paths."""
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


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def load_tokenizer(cfg, init_path, init_tokenizer_dir):
    from transformers import AutoTokenizer
    path = cfg.tokenizer or init_tokenizer_dir
    if not path:
        raise ValueError(f"config tokenizer: not set and init_from={init_path} carries no tokenizer")
    if not os.path.isdir(path):
        raise ValueError(f"config tokenizer: {path} is not a directory with HF tokenizer files")
    return AutoTokenizer.from_pretrained(path), path


def exit_now(message: str, status: int) -> None:
    """Log, flush and end the process even if Orbax/Grain threads are stuck (they would block the
    interpreter's normal exit, which joins them)."""
    logging.error("%s", message, extra=cli.FILE_ONLY)
    print(f"error: {message}", file=sys.stderr, flush=True)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    os._exit(status)


_PHASE = {"training": False}  # before the first step, a ValueError/FileNotFoundError is the input's fault


def main(argv):
    """Exit status 2 with one line for bad input found while setting up (the traceback goes to train.log)."""
    try:
        train(argv)
    except CheckpointError as e:   # a failed or stalled save, an unusable checkpoint
        logging.error("checkpoint failure", exc_info=True, extra=cli.FILE_ONLY)
        exit_now(str(e), 1)
    except TooManySkips as e:      # the data is (mostly) unusable: bad input, not a transient error
        exit_now(str(e), cli.EXIT_BAD_INPUT)
    except (ValueError, FileNotFoundError) as e:
        if _PHASE["training"]:
            raise
        logging.error("bad input", exc_info=True, extra=cli.FILE_ONLY)
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(cli.EXIT_BAD_INPUT) from None


def train(argv):
    del argv
    cfg, workdir = _CONFIG.value, cli.resolve_path(_WORKDIR.value)
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
    rules = parallel.DEFAULT_RULES
    ckpt = TrainCheckpointer(workdir, max_to_keep=cfg.max_checkpoints_to_keep, async_save=cfg.async_checkpointing,
                             timeout_s=cfg.checkpoint_timeout_s)
    resume_step = ckpt.latest_step()
    done = finished_summary(workdir, cfg.total_steps, resume_step)
    if done is not None:
        if is_main:
            print(f"{workdir} holds a finished run ({done['steps']} steps, model in {done['model']}): nothing to do. "
                  "Use a new --workdir to train again, or raise --config.total_steps to continue.")
        ckpt.close()
        return

    # --- model and parameters -------------------------------------------------------------
    # On resume the workdir has everything: init_from is not read again.
    init_params, init_model_cfg, init_tokenizer_dir = None, None, None
    if resume_step is not None:
        from vflan_jax.models.config import ModelConfig
        with open(os.path.join(workdir, "model_config.json")) as f:
            init_model_cfg = ModelConfig.from_dict(json.load(f))
        init_tokenizer_dir = _read_json(os.path.join(workdir, "config.json")).get("tokenizer_used")
    elif init_path:
        from vflan_jax.model_checkpoint import load_any
        init_params, init_model_cfg, init_tokenizer_dir = load_any(init_path, mesh, rules)
    model_cfg = train_config.model_config(cfg, init_model_cfg)
    if init_model_cfg is not None:
        train_config.check_init_shapes(model_cfg, init_model_cfg, init_path or workdir)
    if init_params is not None:   # LoRA: fresh adapters beside init_from's (merged, quantized) base
        from vflan_jax.models.lora_params import for_model
        init_params = for_model(init_params, init_model_cfg, model_cfg, seed=cfg.seed)
    model = LlavaForConditionalGeneration(model_cfg)
    tokenizer, tokenizer_dir = load_tokenizer(cfg, init_path, init_tokenizer_dir)
    if len(tokenizer) > model_cfg.text.vocab_size:
        raise ValueError(f"config tokenizer: {tokenizer_dir} has {len(tokenizer)} tokens but the model's "
                         f"vocabulary is {model_cfg.text.vocab_size}")

    # --- data -------------------------------------------------------------------------------
    per_host_batch = cfg.global_batch_size // jax.process_count()
    dataset, info = build_train_pipeline(
        cfg.data, tokenizer, image_token_id=model_cfg.image_token_id, tokens_per_image=model_cfg.tokens_per_image,
        image_size=model_cfg.vision.image_size, per_host_batch_size=per_host_batch, seed=cfg.seed)
    data_iter = iter(dataset)  # (the pipeline has logged the task-mixture table)

    # --- optimizer and state ---------------------------------------------------------------
    # Shardings derived from the parameters' (moments in their parameter's shards), explicit on both
    # programs; the first train step's compile is the fit check (DoesNotFit names the fields to change).
    program = build_program(cfg, model_cfg, mesh, num_tasks=len(info.task_names), rules=rules)
    mask, schedules = program.mask, program.schedules
    if is_main:
        logging.info("parameters: %s", describe_parameters(program))
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
    train_step = program.train_step

    # --- evaluation on held-out tasks (and a validation split when the config names one) ----
    evaluators = build_evaluators(cfg, info, tokenizer, model_cfg)
    eval_fn = make_eval_fn(model)

    def to_device(batch):
        return parallel.global_batch(batch, mesh, rules)

    pad_values = {"input_ids": tokenizer.pad_token_id or 0, "targets": -100, "task_ids": -1}

    def eval_to_device(batch):  # every host builds the whole eval batch; each contributes its rows
        n, i = jax.process_count(), jax.process_index()
        return to_device({k: v[i * len(v) // n:(i + 1) * len(v) // n] for k, v in batch.items()})

    # --- bookkeeping ------------------------------------------------------------------------
    writer = MetricsWriter(workdir, enabled=is_main)
    start_step = int(state.step)
    writer.truncate_after(start_step)
    if is_main:
        write_json(os.path.join(workdir, "config.json"), {**cfg.to_dict(), "tokenizer_used": tokenizer_dir})
        with open(os.path.join(workdir, "model_config.json"), "w") as f:
            f.write(model_cfg.to_json())
    progress = ProgressLine(cfg.total_steps, start_step)
    peak = device_peak_tflops()
    stop = StopSignal(cfg.stop_timeout_s)
    llm_trainable = any(v for p, v in mask.items() if p[0] == "language_model")
    proj_trainable = any(v for p, v in mask.items() if p[0] == "multi_modal_projector")
    window = []  # (step, metrics on device, host stats) since the last log line
    pending = None  # the previous step's (step, finite flag, record ids): checked one step late
    t_last, step, status = time.perf_counter(), start_step, "finished"

    def check_finite(entry):
        step_no, finite, record_ids = entry
        if not bool(finite):
            message = (f"non-finite loss or gradient at step {step_no}; batch records: "
                       f"{sorted(set(str(r) for r in record_ids.ravel() if r))[:32]}")
            if cfg.nonfinite == "stop":
                raise NonFiniteLoss(message + " (update not applied; set nonfinite='skip' to go on)")
            logging.warning("%s: update skipped", message)

    _PHASE["training"] = True
    try:
        while step < cfg.total_steps:
            try:
                host_batch = next(data_iter)
            except StopIteration:
                logging.info("data exhausted after %d steps (data.num_epochs=%s)", step, cfg.data.num_epochs)
                break
            batch_skips = skips_of(host_batch)
            skipped.merge(batch_skips)
            local = common_length(device_part(host_batch), pad_values)
            state, metrics = train_step(state, to_device(local))
            step += 1
            if pending is not None:
                check_finite(pending)
            pending = (step, metrics["finite"], host_batch["meta_record_ids"])
            window.append((metrics, int((local["segment_ids"] > 0).sum()),
                           int((host_batch["meta_record_ids"] != "").sum())))
            if step % cfg.log_every_steps == 0 or step == cfg.total_steps:
                check_finite(pending)
                pending = None
                elapsed = time.perf_counter() - t_last
                values = summarize_window(window, elapsed, step, schedules, info.task_names, skipped,
                                          model_cfg, cfg, local, peak, llm_trainable, proj_trainable)
                window, t_last = [], time.perf_counter()
                if cfg.eval_every_steps and step % cfg.eval_every_steps == 0 and step < cfg.total_steps:
                    values["eval"] = run_evaluators(evaluators, eval_fn, state.params, eval_to_device)
                writer.write(step, values)
                if is_main:
                    print(progress.line(step, values), flush=True)
            if step % cfg.checkpoint_every_steps == 0 and step < cfg.total_steps:
                ckpt.save(step, state, data_iter, {"skipped": skipped.state(), "step": step})
            if stop.should_stop():
                status = "preempted"
                break
        if pending is not None:
            check_finite(pending)
    except NonFiniteLoss as e:
        ckpt.wait()
        logging.error("%s", e)
        raise SystemExit(1) from None
    if ckpt.latest_step() != step:
        ckpt.save(step, state, data_iter, {"skipped": skipped.state(), "step": step})
    ckpt.wait()
    if status == "preempted":
        logging.warning("stopped at step %d by %s; checkpoint saved; rerun the same command to resume",
                        step, stop.received)
        ckpt.close()
        writer.close()
        raise SystemExit(EXIT_PREEMPTED)

    finish(cfg, workdir, state, model_cfg, tokenizer_dir, evaluators, eval_fn, eval_to_device, writer, skipped, step,
           is_main)
    ckpt.close()


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


def summarize_window(window, elapsed, step, schedules, task_names, skipped, model_cfg, cfg, local, peak,
                     llm_trainable, proj_trainable):
    """One metrics.jsonl record for the steps since the last log line (token-weighted means)."""
    fetched = jax.device_get([m for m, _, _ in window])
    loss_sum = sum(float(m["loss_sum"]) for m in fetched)
    tokens = sum(float(m["tokens"]) for m in fetched)
    task_loss = np.sum([m["task_loss_sum"] for m in fetched], axis=0)
    task_tokens = np.sum([m["task_tokens"] for m in fetched], axis=0)
    n_steps = len(window)
    real_tokens = sum(t for _, t, _ in window) * jax.process_count()
    examples = sum(e for _, _, e in window) * jax.process_count()
    b, seq = cfg.global_batch_size, local["input_ids"].shape[1]
    flops = train_step_flops(model_cfg, batch=b, seq_len=seq, image_slots=local["image_mask"].shape[1],
                             llm_trainable=llm_trainable, projector_trainable=proj_trainable)
    step_time = elapsed / max(n_steps, 1)
    values = {
        "loss": loss_sum / max(tokens, 1.0),
        "learning_rate": float(schedules["default"](step - 1)),
        "grad_norm": float(fetched[-1]["grad_norm"]),
        "tokens_per_second": real_tokens / elapsed,
        "examples_per_second": examples / elapsed,
        "step_time_s": step_time,
        "mfu": flops / step_time / (jax.device_count() * peak * 1e12) if peak else None,
        "task_loss": {t: float(task_loss[i] / task_tokens[i]) for i, t in enumerate(task_names) if task_tokens[i]},
        "skipped": skipped.as_dict(),
    }
    if "projector" in schedules:
        values["projector_learning_rate"] = float(schedules["projector"](step - 1))
    return values


def run_evaluators(evaluators, eval_fn, params, to_device) -> dict:
    out = {}
    for name, evaluator in evaluators.items():
        result = evaluator.run(eval_fn, params, to_device)
        out.update(result.as_dict(name))
        out[f"{name}_per_task"] = result.per_task
    return out


def finished_summary(workdir: str, total_steps: int, latest_step: int | None) -> dict | None:
    """summary.json of a run that finished at this total_steps (it is written last), else None."""
    path = os.path.join(workdir, SUMMARY)
    if latest_step is None or not os.path.exists(path) or not os.path.isdir(train_config.workdir_model_path(workdir)):
        return None
    summary = _read_json(path)
    return summary if (summary.get("steps"), summary.get("total_steps")) == (latest_step, total_steps) else None


def finish(cfg, workdir, state, model_cfg, tokenizer_dir, evaluators, eval_fn, to_device, writer, skipped, step, is_main):
    """Final evaluation, params-only model checkpoint for the next stage, plot and summary."""
    from vflan_jax.model_checkpoint import save_model_atomically
    final_eval = run_evaluators(evaluators, eval_fn, state.params, to_device) if evaluators else {}
    if final_eval:
        record = {"eval": final_eval}
        writer.write(step, record)
    # Atomic: a kill leaves no half-written model/, and the rerun (it resumes at the final step) lands here again.
    save_model_atomically(train_config.workdir_model_path(workdir), state.params, model_cfg,
                          tokenizer_dir=tokenizer_dir, replace=True)
    writer.close()
    if not is_main:
        return
    from vflan_jax.train.metrics import read_metrics
    records = [r for r in read_metrics(writer.path) if "loss" in r]
    summary = {"steps": step, "total_steps": cfg.total_steps, "first_loss": records[0]["loss"] if records else None,
               "final_loss": records[-1]["loss"] if records else None, "skipped": skipped.as_dict(),
               "eval": {k: v for k, v in final_eval.items() if not k.endswith("per_task")},
               "model": train_config.workdir_model_path(workdir)}
    write_json(os.path.join(workdir, SUMMARY), summary)
    plot_loss_curve(writer.path, os.path.join(workdir, "loss_curve.png"))
    print(f"\ntrained {step} steps: loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}" if records else "")
    for name in evaluators:
        print(f"{name} tasks: exact-match accuracy {final_eval[f'{name}_accuracy']:.3f} "
              f"(chance {final_eval[f'{name}_chance']:.3f}) over {final_eval[f'{name}_examples']} examples")
        for task, r in final_eval[f"{name}_per_task"].items():
            print(f"  {task:40s} {r['accuracy']:.3f} (chance {r['chance']:.3f}, n={r['n']})")
    if skipped.total or skipped.truncated_by_task:
        print(skipped.report())
    print(f"model for the next stage: {summary['model']}\nloss curve: {os.path.join(workdir, 'loss_curve.png')}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
