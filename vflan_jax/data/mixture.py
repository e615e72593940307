"""Which examples train: sources, held-out tasks, per-task caps, fixed budgets, random subsets.

Every choice ranks records by a seeded hash of their CONTENT digest (task, id, image, turns;
sources.content_digest) -- not of their position -- so the selection for a seed does not
change when a file is reordered or split into several files, is the same for annotation files
and for their prepared shards, and a task's choice does not depend on other tasks.  Pick "the
N smallest ranks" = a seeded uniform sample without replacement.  All of it runs on the index
arrays (record_index.py); no record body is parsed.

Per source (docs/REFERENCE.md §2.4, §2.5, §4.5):
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

import numpy as np

from vflan_jax.data import json_source, prepared_source
from vflan_jax.data.record_index import RecordIndex
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
    prepared: str | None = None       # a prepared folder or bucket (prepare.py) instead of `paths`
    tfds: str | None = None           # a TFDS classification dataset (cifar10, ...) instead of `paths`
    tfds_split: str = "train"
    tfds_data_dir: str | None = None


class Selected:
    """The chosen records of a source, in order: a Grain random-access source (small to pickle)."""

    def __init__(self, records, indices: np.ndarray):
        self.records, self.indices = records, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Example:
        return self.records[int(self.indices[i])]


@dataclasses.dataclass
class SourceSelection:
    spec: SourceSpec                  # for prepared data: paths/image_folder of the original files
    records: object                   # index -> Example (json_source.JsonRecords | prepared_source.PreparedRecords
                                      #   | data.tfds_source.TFDSInstructions)
    train_indices: np.ndarray         # selected for training, in rank order (file order irrelevant)
    heldout_indices: np.ndarray       # records of held-out tasks (for evaluation)
    available: dict[str, int]         # task -> usable records (before any choice)
    selected: dict[str, int]          # task -> records selected for training

    @property
    def train(self) -> Selected:
        return Selected(self.records, self.train_indices)

    @property
    def examples(self) -> list[Example]:
        """The selected Examples, parsed now (for inspection and tests; training streams `train`)."""
        return list(self.train)

    @property
    def heldout(self) -> list[Example]:
        return list(Selected(self.records, self.heldout_indices))


@dataclasses.dataclass
class Mixture:
    sources: list[SourceSelection]
    skipped: SkipCounter              # bad records met while reading the files (or preparing them)

    @property
    def task_names(self) -> list[str]:
        """Sorted training task names; the position is the task id carried in batches."""
        return sorted({t for s in self.sources for t in s.selected})

    @property
    def heldout_examples(self) -> list[Example]:
        """Parsed when asked for (held-out tasks are a small part of the data)."""
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


def seeded_ranks(digests: np.ndarray, seed: int) -> np.ndarray:
    """Seeded pseudo-random uint64 rank per content digest (splitmix64 finaliser, vectorised)."""
    x = np.asarray(digests, np.uint64) ^ np.uint64(rank(seed, "records"))
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def select_source(spec: SourceSpec, index: RecordIndex, heldout_tasks: Sequence[str],
                  seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, int], dict[str, int]]:
    """(train indices, held-out indices, available, selected): held-out exclusion, then budget or
    per-task cap, then subset (module doc).  Ties (identical records) keep file order."""
    ranks = seeded_ranks(index.digests, seed)
    ranked = np.argsort(ranks, kind="stable")
    grouped = ranked[np.argsort(index.task_ids[ranked], kind="stable")]   # by task, rank order inside
    sizes = np.bincount(index.task_ids, minlength=len(index.task_names))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    tid = {t: i for i, t in enumerate(index.task_names) if sizes[i]}

    def of_task(t: str, k: int | None = None) -> np.ndarray:
        a, b = starts[tid[t]], starts[tid[t] + 1]
        return grouped[a:b if k is None else min(b, a + k)]

    heldout_set = set(heldout_tasks)
    empty = np.zeros(0, np.int64)
    heldout = np.concatenate([empty] + [of_task(t) for t in sorted(tid) if t in heldout_set])
    train = sorted(t for t in tid if t not in heldout_set)

    if spec.budget_per_task is not None:
        n = spec.budget_per_task
        eligible = [t for t in train if sizes[tid[t]] >= n]
        T = len(eligible) if spec.budget_tasks is None else spec.budget_tasks
        if T > len(eligible):
            raise ValueError(f"source {spec.name!r}: budget_tasks={T} but only {len(eligible)} training tasks "
                             f"have >= budget_per_task={n} examples")
        tasks = sorted(sorted(eligible, key=lambda t: (rank(seed, "task", t), t))[:T])
        chosen = [of_task(t, n) for t in tasks]
    else:
        chosen = [of_task(t, spec.max_per_task) for t in train]

    pool = np.concatenate([empty] + chosen)
    pool = pool[np.argsort(ranks[pool], kind="stable")]
    if spec.subset is not None:
        if spec.subset > len(pool):
            raise ValueError(f"source {spec.name!r}: subset={spec.subset} but only {len(pool)} examples are available")
        pool = pool[:spec.subset]
    counts = np.bincount(index.task_ids[pool], minlength=len(index.task_names))
    selected = {index.task_names[i]: int(k) for i, k in enumerate(counts) if k}
    available = {t: int(sizes[i]) for t, i in sorted(tid.items())}
    return pool, heldout, available, selected


def open_source(spec: SourceSpec, on_bad) -> tuple[SourceSpec, RecordIndex, object]:
    """(spec with the original files' paths and image folder, index, records) of one source."""
    if spec.tfds is not None:   # tensorflow-datasets is imported only here (an optional extra)
        from vflan_jax.data.tfds_source import TFDSInstructions
        records = TFDSInstructions(spec.tfds, spec.tfds_split, spec.tfds_data_dir)
        return spec, records.index(), records
    if spec.prepared is None:
        index, records = json_source.scan_json_files(spec.paths, spec.format, spec.default_task, on_bad)
        return spec, index, records
    manifest, index, records = prepared_source.open_prepared(spec.prepared)
    skipped = SkipCounter.from_dict(manifest["skipped"])
    skipped.first_message.update(manifest.get("skipped_examples", {}))   # one culprit per reason, as for JSON
    if skipped.total:
        if on_bad == "raise":
            raise ValueError(f"{spec.prepared}: {skipped.total} bad records were left out when it was prepared "
                             f"(strict mode; see its {prepared_source.MANIFEST})")
        on_bad.merge(skipped)
    folder = spec.image_folder or manifest["image_folder"]
    return dataclasses.replace(spec, paths=tuple(s["path"] for s in manifest["sources"]), image_folder=folder), \
        index, records


def build_mixture(specs: Sequence[SourceSpec], heldout_tasks: Sequence[str] = (), seed: int = 0,
                  strict: bool = False, log: bool = True) -> Mixture:
    """Read every source's index and select; bad records are counted (or raised when strict)."""
    skipped = SkipCounter()
    selections = []
    for spec in specs:
        spec, index, records = open_source(spec, "raise" if strict else skipped)
        # Each source gets its own stream of ranks, so adding a source changes no other choice.
        chosen = select_source(spec, index, heldout_tasks, rank(seed, "source", spec.name) % (1 << 62))
        selections.append(SourceSelection(spec, records, *chosen))
    mixture = Mixture(selections, skipped)
    unknown = set(heldout_tasks) - {t for s in selections for t in s.available}
    if unknown:
        logging.warning("heldout_tasks not found in any source: %s", sorted(unknown))
    if log:
        logging.info("data mixture:\n%s", mixture.table())
    return mixture
