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
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from vflan_jax.data.packing import BatchLayout
from vflan_jax.data.pipeline import DecodeExample
from vflan_jax.data.skips import SkipCounter
from vflan_jax.data.sources import Example
from vflan_jax.models.config import IGNORE_INDEX
from vflan_jax.train_step import MODEL_INPUTS


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
            for e, right in zip(chunk, out["exact"][:n]):
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
