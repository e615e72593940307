"""The end of a run: final evaluation, the params-only model for the next stage, loss curve,
summary.json and the closing console lines; and whether a workdir already holds a finished run."""
from __future__ import annotations

import dataclasses
import json
import os

import ml_collections

from vflan_jax.data.skips import SkipCounter
from vflan_jax.files import write_json
from vflan_jax.models.config import ModelConfig
from vflan_jax.train.config import workdir_model_path
from vflan_jax.train.evaluate import Evaluations
from vflan_jax.train.metrics import MetricsWriter, plot_loss_curve, read_metrics

SUMMARY = "summary.json"   # written last: its presence marks a finished run
LOSS_CURVE = "loss_curve.png"


@dataclasses.dataclass
class RunContext:
    """What the end of a run needs besides the parameters and the step it ended at."""
    workdir: str
    cfg: ml_collections.ConfigDict
    model_cfg: ModelConfig
    tokenizer_dir: str
    writer: MetricsWriter
    evaluations: Evaluations
    skipped: SkipCounter        # the run's counter, updated by the loop
    is_main: bool


def finish(run: RunContext, params, step: int) -> None:
    """Every host evaluates and saves (the arrays are sharded over all of them); process 0 writes the rest."""
    from vflan_jax.checkpoint import save_model_atomically
    final_eval = run.evaluations.run(params) if run.evaluations else {}
    if final_eval:
        run.writer.write(step, {"eval": final_eval})
    # Atomic: a kill leaves no half-written model/, and the rerun (it resumes at the final step) lands here again.
    save_model_atomically(workdir_model_path(run.workdir), params, run.model_cfg, tokenizer_dir=run.tokenizer_dir,
                          replace=True)
    run.writer.close()
    if not run.is_main:
        return
    records = [r for r in read_metrics(run.writer.path) if "loss" in r]
    summary = {"steps": step, "total_steps": run.cfg.total_steps,
               "first_loss": records[0]["loss"] if records else None,
               "final_loss": records[-1]["loss"] if records else None, "skipped": run.skipped.as_dict(),
               "eval": {k: v for k, v in final_eval.items() if not k.endswith("per_task")},
               "model": workdir_model_path(run.workdir)}
    write_json(os.path.join(run.workdir, SUMMARY), summary)
    plot_loss_curve(run.writer.path, os.path.join(run.workdir, LOSS_CURVE))
    print(f"\ntrained {step} steps: loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}" if records else "")
    for name in run.evaluations:
        print(f"{name} tasks: exact-match accuracy {final_eval[f'{name}_accuracy']:.3f} "
              f"(chance {final_eval[f'{name}_chance']:.3f}) over {final_eval[f'{name}_examples']} examples")
        for task, r in final_eval[f"{name}_per_task"].items():
            print(f"  {task:40s} {r['accuracy']:.3f} (chance {r['chance']:.3f}, n={r['n']})")
    if run.skipped.total or run.skipped.truncated_by_task:
        print(run.skipped.report())
    print(f"model for the next stage: {summary['model']}\nloss curve: {os.path.join(run.workdir, LOSS_CURVE)}")


def finished_summary(workdir: str, total_steps: int, latest_step: int | None) -> dict | None:
    """summary.json of a run that finished at this total_steps (it is written last), else None."""
    path = os.path.join(workdir, SUMMARY)
    if latest_step is None or not os.path.exists(path) or not os.path.isdir(workdir_model_path(workdir)):
        return None
    with open(path) as f:
        summary = json.load(f)
    return summary if (summary.get("steps"), summary.get("total_steps")) == (latest_step, total_steps) else None
