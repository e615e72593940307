"""Train LLaVA-1.5 / Vision-Flan: `python -m vflan_jax.train --config configs/NAME.py[:arg] --workdir W`.

Rerunning the same command resumes from the newest complete checkpoint in W (parameters,
optimizer state, step, RNG and every host's data-iterator position), so the loss sequence is
the one an uninterrupted run gives. `--config.init_from=PATH` starts from a model checkpoint
(ours, an HF LLaVA directory, or a finished workdir) with a fresh optimizer; it is ignored
once W holds a checkpoint.

W receives: metrics.jsonl, tensorboard/, checkpoints/, config.json, model_config.json and,
at the end, model/ (params-only checkpoint + tokenizer: init_from for the next stage),
loss_curve.png and summary.json.

Exit status: 0 finished; 75 (EX_TEMPFAIL) stopped by SIGTERM/SIGINT after saving a checkpoint
(rerun to resume); 1 error, including a non-finite loss with config.nonfinite='stop'.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vflan_jax import optim, parallel, train_config
from vflan_jax.checkpoint import TrainCheckpointer, write_json
from vflan_jax.data.pipeline import build_train_pipeline, device_part, skips_of
from vflan_jax.data.skips import SkipCounter
from vflan_jax.flops import train_step_flops
from vflan_jax.heldout_eval import ExampleEvaluator, make_eval_fn
from vflan_jax.metrics import MetricsWriter, ProgressLine, device_peak_tflops, plot_loss_curve
from vflan_jax.models.llava import LlavaForConditionalGeneration
from vflan_jax.train_step import TrainState, make_train_step

EXIT_PREEMPTED = 75

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the final model.")


class NonFiniteLoss(RuntimeError):
    pass


class StopSignal:
    """SIGTERM/SIGINT finish the current step, then the loop saves and exits."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        logging.warning("%s received: finishing this step, then saving", self.received)

    def should_stop(self) -> bool:
        flag = self.received is not None
        if jax.process_count() > 1:  # every host must stop at the same step
            from jax.experimental import multihost_utils
            flag = bool(multihost_utils.process_allgather(np.array(flag)).any())
        return flag


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


def main(argv):
    del argv
    cfg, workdir = _CONFIG.value, _WORKDIR.value
    if not workdir:
        raise app.UsageError("--workdir is required")
    logging.getLogger().setLevel(logging.INFO)
    if cfg.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", cfg.compilation_cache_dir.format(workdir=workdir))
    parallel.initialize_distributed()
    is_main = jax.process_index() == 0
    init_path = prepare_inputs(cfg, workdir)
    train_config.validate(cfg, jax.device_count(), jax.process_count())
    mesh = parallel.make_mesh((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
    rules = parallel.DEFAULT_RULES
    ckpt = TrainCheckpointer(workdir, max_to_keep=cfg.max_checkpoints_to_keep, async_save=cfg.async_checkpointing)
    resume_step = ckpt.latest_step()

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
    data_iter = iter(dataset)
    if is_main:
        logging.info("task mixture:\n%s", info.mixture.table())

    # --- optimizer and state ---------------------------------------------------------------
    boxed = parallel.abstract_params(model_cfg)
    shardings = parallel.param_shardings(boxed, mesh, rules)
    abstract_params = parallel.strip_boxes(boxed)
    mask = optim.trainable_mask(abstract_params, tuple(cfg.optim.trainable))
    abstract_trainable, _ = optim.split(abstract_params, mask)
    optimizer, schedules = optim.make_optimizer(cfg.optim, abstract_trainable, cfg.total_steps)
    if is_main:
        logging.info("parameters: %s", json.dumps(optim.describe(mask, abstract_params)))

    def create_state(params):
        trainable, _ = optim.split(params, mask)
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(trainable),
                          jax.random.key_data(jax.random.key(cfg.seed)))

    abstract_sharded = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                    abstract_params, shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        # Compiling (not running) the state constructor tells where optimizer moments live:
        # GSPMD gives each the sharding of its parameter.
        compiled_create = jax.jit(create_state).lower(abstract_sharded).compile()
        state_shardings = compiled_create.output_shardings
        if resume_step is not None:
            abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                          jax.eval_shape(create_state, abstract_params), state_shardings)
            state, meta = ckpt.restore(resume_step, abstract_state, data_iter)
            skipped = SkipCounter.from_dict(meta["skipped"])
            logging.info("resumed from step %d", resume_step)
        else:
            if init_params is None:
                init_params, _ = parallel.init_params(model_cfg, mesh, rules, seed=cfg.seed)
            state = compiled_create(init_params)
            del init_params
            skipped = SkipCounter()
        train_step = jax.jit(
            make_train_step(model, optimizer, lambda p: optim.split(p, mask), num_tasks=len(info.task_names),
                            grad_accum_steps=cfg.grad_accum_steps),
            in_shardings=(state_shardings, None), out_shardings=(state_shardings, None), donate_argnums=(0,))

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
    stop = StopSignal()
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
                ckpt.save(step, state, data_iter, {"skipped": skipped.as_dict(), "step": step})
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
        ckpt.save(step, state, data_iter, {"skipped": skipped.as_dict(), "step": step})
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


def build_evaluators(cfg, info, tokenizer, model_cfg) -> dict[str, ExampleEvaluator]:
    """'heldout': the mixture's held-out tasks; one more per config.eval_data entry
    (none when eval_max_examples is 0)."""
    if not cfg.eval_max_examples:
        return {}
    from vflan_jax.data.sources import read_examples
    splits = {"heldout": list(info.mixture.heldout_examples)}
    folders = {}
    for sel in info.mixture.sources:
        for p in sel.spec.paths:
            folders[os.fspath(p)] = sel.spec.image_folder
    for name, source in cfg.eval_data.items():
        splits[name] = []
        for p in source.paths:
            splits[name] += read_examples(p, format=source.format, default_task=source.default_task)
            folders[os.fspath(p)] = source.image_folder
    decode_kwargs = dict(tokenizer=tokenizer, template=cfg.data.template, image_folders=folders,
                         max_length=cfg.data.max_length, tokens_per_image=model_cfg.tokens_per_image,
                         image_size=model_cfg.vision.image_size, image_aspect=cfg.data.image_aspect)
    layout_kwargs = dict(max_length=cfg.data.max_length, max_images_per_row=1, tokens_per_image=model_cfg.tokens_per_image,
                         image_shape=(3, model_cfg.vision.image_size, model_cfg.vision.image_size),
                         image_token_id=model_cfg.image_token_id, pad_id=tokenizer.pad_token_id or 0)
    batch = max(jax.device_count(), min(cfg.global_batch_size, 32))
    batch -= batch % jax.device_count()
    evaluators = {}
    for name, examples in splits.items():
        by_task = {}
        for ex in examples:
            by_task.setdefault(ex.task_name, []).append(ex)
        if not by_task:
            continue
        per_task = max(1, cfg.eval_max_examples // len(by_task))  # every task equally represented
        chosen = [ex for task in sorted(by_task) for ex in by_task[task][:per_task]]
        evaluators[name] = ExampleEvaluator(chosen, decode_kwargs, layout_kwargs, batch, answer_pool=examples)
    return evaluators


def run_evaluators(evaluators, eval_fn, params, to_device) -> dict:
    out = {}
    for name, evaluator in evaluators.items():
        result = evaluator.run(eval_fn, params, to_device)
        out.update(result.as_dict(name))
        out[f"{name}_per_task"] = result.per_task
    return out


def finish(cfg, workdir, state, model_cfg, tokenizer_dir, evaluators, eval_fn, to_device, writer, skipped, step, is_main):
    """Final evaluation, params-only model checkpoint for the next stage, plot and summary."""
    from vflan_jax.model_checkpoint import save_model
    final_eval = run_evaluators(evaluators, eval_fn, state.params, to_device) if evaluators else {}
    if final_eval:
        record = {"eval": final_eval}
        writer.write(step, record)
    save_model(train_config.workdir_model_path(workdir), state.params, model_cfg, tokenizer_dir=tokenizer_dir)
    writer.close()
    if not is_main:
        return
    from vflan_jax.metrics import read_metrics
    records = [r for r in read_metrics(writer.path) if "loss" in r]
    summary = {"steps": step, "first_loss": records[0]["loss"] if records else None,
               "final_loss": records[-1]["loss"] if records else None, "skipped": skipped.as_dict(),
               "eval": {k: v for k, v in final_eval.items() if not k.endswith("per_task")},
               "model": train_config.workdir_model_path(workdir)}
    write_json(os.path.join(workdir, "summary.json"), summary)
    plot_loss_curve(writer.path, os.path.join(workdir, "loss_curve.png"))
    print(f"\ntrained {step} steps: loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}" if records else "")
    for name in evaluators:
        print(f"{name} tasks: exact-match accuracy {final_eval[f'{name}_accuracy']:.3f} "
              f"(chance {final_eval[f'{name}_chance']:.3f}) over {final_eval[f'{name}_examples']} examples")
        for task, r in final_eval[f"{name}_per_task"].items():
            print(f"  {task:40s} {r['accuracy']:.3f} (chance {r['chance']:.3f}, n={r['n']})")
    if skipped.total:
        print("skipped records:\n" + skipped.report())
    print(f"model for the next stage: {summary['model']}\nloss curve: {os.path.join(workdir, 'loss_curve.png')}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
