"""Evaluation inside the trainer: loss and exact-match accuracy on held-out (unseen) tasks and on
a validation split, with the chance level each task implies.

Exact match is computed teacher-forced: an answer counts as right when the argmax at every
answer position (and at its closing </s>) is the reference token. Greedy decoding produces
exactly the reference answer in that case and not otherwise, so this equals greedy exact-match
accuracy at the cost of one forward pass.
"""
from __future__ import annotations

import collections
import dataclasses
import os
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from vflan_jax import parallel
from vflan_jax.constants import IGNORE_INDEX
from vflan_jax.data import decoding
from vflan_jax.data.packing import BatchLayout
from vflan_jax.data.pipeline import DecodeExample
from vflan_jax.data.skips import SkipCounter
from vflan_jax.data.sources import Example, read_examples
from vflan_jax.train.step import MODEL_INPUTS


@dataclasses.dataclass
class EvalResult:
    loss: float
    accuracy: float
    chance: float
    examples: int
    per_task: dict[str, dict[str, float]]
    skipped: dict

    def as_dict(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_loss": self.loss, f"{prefix}_accuracy": self.accuracy,
                f"{prefix}_chance": self.chance, f"{prefix}_examples": self.examples}


def chance_levels(examples: Sequence[Example]) -> dict[str, float]:
    """1 / (number of distinct answers) per task: uniform guessing among the task's answers."""
    answers = collections.defaultdict(set)
    for ex in examples:
        answers[ex.task_name].add(ex.turns[-1][1].strip())
    return {task: 1.0 / len(a) for task, a in answers.items()}


def make_eval_fn(model):
    def evaluate(params, batch):
        logits = model.apply({"params": params}, *(batch[k] for k in MODEL_INPUTS)).astype(jnp.float32)
        targets = batch["targets"]
        labelled = targets != IGNORE_INDEX
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(logp, jnp.where(labelled, targets, 0)[..., None], axis=-1)[..., 0]
        right = (jnp.argmax(logits, -1) == targets) | ~labelled
        return {"loss_sum": jnp.sum(nll * labelled, axis=1), "tokens": jnp.sum(labelled, axis=1),
                "exact": jnp.all(right, axis=1) & jnp.any(labelled, axis=1)}
    return jax.jit(evaluate)


class ExampleEvaluator:
    """Evaluates a fixed list of examples, one example per row, fixed shapes (one compile)."""

    def __init__(self, examples: Sequence[Example], decode_kwargs: dict, layout_kwargs: dict, batch_size: int,
                 answer_pool: Sequence[Example] | None = None):
        """answer_pool: the examples whose distinct answers define chance (default: `examples`);
        pass the whole split when evaluating a subset, so a small subset does not inflate chance."""
        tasks = sorted({ex.task_name for ex in examples})
        self.task_names = tasks
        self.decode = DecodeExample(task_ids={t: i for i, t in enumerate(tasks)}, **decode_kwargs)
        self.layout = BatchLayout(batch_size=batch_size, max_examples_per_row=1, **layout_kwargs)
        self.examples = list(examples)
        self.chance = chance_levels(answer_pool if answer_pool is not None else self.examples)
        self.batch_size = batch_size
        self._elements = None

    def _decoded(self):
        if self._elements is None:  # decode once; pixels and ids do not change between evaluations
            self._elements, self.skipped = [], SkipCounter()
            for i, ex in enumerate(self.examples):
                element = self.decode(i, ex)
                if "skip_reason" in element:
                    self.skipped.add(element["skip_reason"], task_name=element["task_name"])
                else:
                    self._elements.append(element)
        return self._elements

    def run(self, eval_fn, params, to_device) -> EvalResult:
        """to_device(batch) places this host's rows of a batch every host builds identically;
        results are gathered from all hosts."""
        elements = self._decoded()
        loss_sum = tokens = 0.0
        per_task = collections.defaultdict(lambda: {"right": 0, "n": 0})
        for start in range(0, len(elements), self.batch_size):
            chunk = elements[start:start + self.batch_size]
            rows = [[e] for e in chunk] + [[] for _ in range(self.batch_size - len(chunk))]
            batch = self.layout.assemble(rows, SkipCounter(), length=self.layout.max_length)
            out = eval_fn(params, to_device({k: v for k, v in batch.items() if not k.startswith("meta_")}))
            out = multihost_utils.process_allgather(out, tiled=True)
            n = len(chunk)
            loss_sum += float(out["loss_sum"][:n].sum())
            tokens += float(out["tokens"][:n].sum())
            for e, right in zip(chunk, out["exact"][:n], strict=True):
                per_task[e["task_name"]]["right"] += int(right)
                per_task[e["task_name"]]["n"] += 1
        total = sum(t["n"] for t in per_task.values())
        right = sum(t["right"] for t in per_task.values())
        chance = (sum(self.chance[task] * t["n"] for task, t in per_task.items()) / total) if total else float("nan")
        return EvalResult(
            loss=loss_sum / max(tokens, 1.0), accuracy=right / total if total else float("nan"), chance=chance,
            examples=total, skipped=self.skipped.as_dict(),
            per_task={task: {"accuracy": t["right"] / t["n"], "chance": self.chance[task], "n": t["n"]}
                      for task, t in sorted(per_task.items())})


class Evaluations:
    """A run's evaluators on one set of parameters: `run(params)` -> the `eval` part of a metrics
    record ({name}_loss/_accuracy/_chance/_examples and {name}_per_task for each split)."""

    def __init__(self, evaluators: dict[str, ExampleEvaluator], model, mesh, rules):
        self.evaluators, self.eval_fn, self.mesh, self.rules = evaluators, make_eval_fn(model), mesh, rules

    def __bool__(self) -> bool:
        return bool(self.evaluators)

    def __iter__(self):
        return iter(self.evaluators)

    def _to_device(self, batch: dict) -> dict:
        # Every host builds the whole eval batch identically; each contributes its share of the rows.
        n, i = jax.process_count(), jax.process_index()
        return parallel.global_batch({k: v[i * len(v) // n:(i + 1) * len(v) // n] for k, v in batch.items()},
                                     self.mesh, self.rules)

    def run(self, params) -> dict:
        out = {}
        for name, evaluator in self.evaluators.items():
            result = evaluator.run(self.eval_fn, params, self._to_device)
            out.update(result.as_dict(name))
            out[f"{name}_per_task"] = result.per_task
        return out


EVAL_BATCH_LIMIT = 32  # rows per eval batch at most (one example per row)


def build_evaluators(cfg, info, tokenizer, model_cfg) -> dict[str, ExampleEvaluator]:
    """'heldout': the mixture's held-out tasks; one more per config.eval_data entry (none when
    eval_max_examples is 0). Records are decoded with the training pipeline's settings
    (data/decoding.py), one example per row."""
    if not cfg.eval_max_examples:
        return {}
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
    shapes = dict(tokens_per_image=model_cfg.tokens_per_image, image_size=model_cfg.vision.image_size)
    decode_kwargs = dict(image_folders=folders, **decoding.decode_kwargs(cfg.data, tokenizer, **shapes))
    layout_kwargs = dict(max_images_per_row=1, **decoding.layout_kwargs(
        cfg.data, tokenizer, image_token_id=model_cfg.image_token_id, **shapes))
    batch = max(jax.device_count(), min(cfg.global_batch_size, EVAL_BATCH_LIMIT))
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
