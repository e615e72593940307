"""Which examples train: sources, held-out tasks, per-task caps, fixed budgets, random subsets.

Every choice ranks examples by a seeded hash of their CONTENT (id, image, turns) -- not of
their position -- so the selection for a seed does not change when a file is reordered or
split into several files, and a task's choice does not depend on other tasks.  Pick "the N
smallest ranks" = a seeded uniform sample without replacement.

Per source (recipe §2.4, §2.5, §4.5):
  max_per_task            cap, e.g. 10,000 (Vision-Flan: "<=10,000 randomly sampled per task")
  budget_tasks x budget_per_task   fixed budget (Table 3: 10 x 10,000, 187 x 500...): T tasks
                          drawn among those with >= N examples (None = all of them), N each
  subset                  K records of the whole source (stage 2: 1,000 LLaVA conversations)
Held-out tasks (config `heldout_tasks`) are removed from training first and returned apart.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Sequence

from vflan_jax.data import sources
from vflan_jax.data.skips import SkipCounter
from vflan_jax.data.sources import Example


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    name: str
    paths: tuple[str, ...]
    image_folder: str
    format: str = "auto"
    default_task: str | None = None
    weight: float | None = None
    max_per_task: int | None = None
    budget_tasks: int | None = None
    budget_per_task: int | None = None
    subset: int | None = None


@dataclasses.dataclass
class SourceSelection:
    spec: SourceSpec
    examples: list[Example]           # selected for training, in rank order (file order irrelevant)
    heldout: list[Example]            # examples of held-out tasks (for evaluation)
    available: dict[str, int]         # task -> usable examples read (before any choice)
    selected: dict[str, int]          # task -> examples selected for training


@dataclasses.dataclass
class Mixture:
    sources: list[SourceSelection]
    skipped: SkipCounter              # bad records met while reading the files

    @property
    def task_names(self) -> list[str]:
        """Sorted training task names; the position is the task id carried in batches."""
        return sorted({t for s in self.sources for t in s.selected})

    @property
    def heldout_examples(self) -> list[Example]:
        return [e for s in self.sources for e in s.heldout]

    def counts(self) -> dict[str, dict[str, dict[str, int]]]:
        """{source: {task: {"available": n, "selected": k}}} (held-out tasks: selected 0)."""
        return {s.spec.name: {t: {"available": n, "selected": s.selected.get(t, 0)}
                              for t, n in sorted(s.available.items())} for s in self.sources}

    def table(self) -> str:
        rows = [(s.spec.name, t, n, s.selected.get(t, 0)) for s in self.sources for t, n in sorted(s.available.items())]
        w = max([len(r[1]) for r in rows] + [4])
        lines = [f"{'source':<12} {'task':<{w}} {'available':>10} {'selected':>9}"]
        lines += [f"{src:<12} {task:<{w}} {n:>10} {k:>9}" for src, task, n, k in rows]
        total_n = sum(r[2] for r in rows)
        total_k = sum(r[3] for r in rows)
        lines.append(f"{'total':<12} {f'{len(self.task_names)} training tasks':<{w}} {total_n:>10} {total_k:>9}")
        if self.skipped.total:
            lines.append(self.skipped.report())
        return "\n".join(lines)


def rank(seed: int, *parts: str) -> int:
    """Seeded pseudo-random rank of a string key (stable across runs, platforms, orders)."""
    h = hashlib.blake2b(digest_size=8, key=str(seed).encode()[:64])
    for p in parts:
        h.update(p.encode("utf-8", "surrogatepass"))
        h.update(b"\x1f")
    return int.from_bytes(h.digest(), "little")


def example_rank(seed: int, ex: Example) -> tuple[int, str]:
    key = (ex.task_name, ex.id, ex.image or "", *(role + ":" + text for role, text in ex.turns))
    return rank(seed, *key), ex.id   # ties only between identical records


def seeded_choice(examples: Sequence[Example], k: int | None, seed: int) -> list[Example]:
    """The k examples of smallest seeded rank (all of them, ranked, when k is None)."""
    ranked = sorted(examples, key=lambda e: example_rank(seed, e))
    return ranked if k is None else ranked[:k]


def select_source(spec: SourceSpec, examples: Sequence[Example], heldout_tasks: Sequence[str],
                  seed: int) -> SourceSelection:
    """Apply held-out exclusion, then budget or per-task cap, then subset (module doc)."""
    by_task: dict[str, list[Example]] = {}
    for e in examples:
        by_task.setdefault(e.task_name, []).append(e)
    heldout_set = set(heldout_tasks)
    heldout = [e for t in sorted(by_task) if t in heldout_set for e in seeded_choice(by_task[t], None, seed)]
    train = {t: v for t, v in by_task.items() if t not in heldout_set}

    if spec.budget_per_task is not None:
        n = spec.budget_per_task
        eligible = sorted(t for t, v in train.items() if len(v) >= n)
        T = len(eligible) if spec.budget_tasks is None else spec.budget_tasks
        if T > len(eligible):
            raise ValueError(f"source {spec.name!r}: budget_tasks={T} but only {len(eligible)} training tasks "
                             f"have >= budget_per_task={n} examples")
        tasks = sorted(eligible, key=lambda t: (rank(seed, "task", t), t))[:T]
        chosen = {t: seeded_choice(train[t], n, seed) for t in sorted(tasks)}
    else:
        chosen = {t: seeded_choice(v, spec.max_per_task, seed) for t, v in sorted(train.items())}

    pool = [e for t in sorted(chosen) for e in chosen[t]]
    if spec.subset is not None:
        if spec.subset > len(pool):
            raise ValueError(f"source {spec.name!r}: subset={spec.subset} but only {len(pool)} examples are available")
        pool = seeded_choice(pool, spec.subset, seed)
    else:
        pool = seeded_choice(pool, None, seed)
    selected: dict[str, int] = {}
    for e in pool:
        selected[e.task_name] = selected.get(e.task_name, 0) + 1
    return SourceSelection(spec, pool, heldout, {t: len(v) for t, v in sorted(by_task.items())}, selected)


def build_mixture(specs: Sequence[SourceSpec], heldout_tasks: Sequence[str] = (), seed: int = 0,
                  strict: bool = False, log: bool = True) -> Mixture:
    """Read every source's files and select; bad records are counted (or raised when strict)."""
    skipped = SkipCounter()
    selections = []
    for spec in specs:
        examples: list[Example] = []
        for path in spec.paths:
            examples += sources.read_examples(path, spec.format, spec.default_task,
                                              on_bad="raise" if strict else skipped)
        # Each source gets its own stream of ranks, so adding a source changes no other choice.
        selections.append(select_source(spec, examples, heldout_tasks, rank(seed, "source", spec.name) % (1 << 62)))
    mixture = Mixture(selections, skipped)
    unknown = set(heldout_tasks) - {t for s in selections for t in s.available}
    if unknown:
        logging.warning("heldout_tasks not found in any source: %s", sorted(unknown))
    if log:
        logging.info("data mixture:\n%s", mixture.table())
    return mixture
