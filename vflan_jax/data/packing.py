"""Tokenized examples -> fixed-shape batches: packed rows (best fit) or pad-to-longest.

Input elements (dicts, produced by the pipeline's decode map):
  ok:   input_ids int32[n] (one IMAGE_PLACEHOLDER -200 per image, before expansion),
        labels int32[n] (aligned, -100 = no loss), pixel_values float32[m,3,H,W],
        task_id int, task_name str, record_id str, index int (position in the refetchable
        MapDataset)
  skip: skip_reason str, task_name str, record_id str, message str, index int
  optional on ok elements: truncated bool (tokens were cut at max_length; counted per task)

Output batch (numpy), B rows of length L, K image slots per row:
  input_ids int32[B,L]   each -200 expanded to tokens_per_image copies of image_token_id
  targets int32[B,L]     labels shifted left by one inside each example (its last position
                         -100), so a target never comes from the next example; -100 = no loss
  segment_ids int32[B,L] 1..n per example in the row, 0 = padding
  positions int32[B,L]   restart at 0 for each example
  pixel_values float32[B,K,3,H,W], image_mask bool[B,K]: the row's images in order of
                         appearance, used slots first
  task_ids int32[B,L]    task index per token, -1 on padding
  meta_record_ids str[B,E] ("" = none; E = max examples per row), meta_skips str (JSON
                         SkipCounter.state() of records skipped or truncated since the previous
                         batch, record keys included so the trainer counts each record once).
                         `meta_*` keys are host-only and never go to the device.

Why not grain.experimental.FirstFitPackIterDataset/BestFitPackIterDataset: they pack flat
token features and restart their bins every pass; they cannot carry the skip markers into
the next batch's counts, string record ids, or keep a pool of part-filled rows open across
batches (what lifts the real-token fraction from ~73% padded to ~87% packed when every example is
576 image tokens plus text, at max_length 2048; 95% is out of reach there: docs/PERFORMANCE.md).
`BestFitPackIterDataset` here keeps up to `pool_rows` open rows; an example goes to the open
row it fills best, a row closes when full (no tokens, image slots or example slots left) and
the fullest row is closed when the pool overflows; every B closed rows are one batch.
Checkpointing: the state is the parent iterator's state plus the dataset indices of the
examples sitting in open/closed-not-emitted rows; restore re-reads those few examples by
index from the (deterministic) MapDataset, so nothing but ints is saved and resume is exact,
also with worker processes upstream.
"""
from __future__ import annotations

import json
from typing import Any, Callable

import grain
import numpy as np

from vflan_jax.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER
from vflan_jax.data import skips
from vflan_jax.data.skips import SkipCounter


def example_length(element: dict, tokens_per_image: int) -> int:
    """Tokens the example occupies after expanding each image placeholder."""
    return len(element["input_ids"]) + element["pixel_values"].shape[0] * (tokens_per_image - 1)


def expand_example(input_ids: np.ndarray, labels: np.ndarray, *, tokens_per_image: int,
                   image_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Each -200 -> tokens_per_image copies of image_token_id (labels -100 there)."""
    ids = np.asarray(input_ids, np.int32)
    is_image = ids == IMAGE_PLACEHOLDER
    counts = np.where(is_image, tokens_per_image, 1)
    out_ids = np.repeat(ids, counts)
    out_labels = np.repeat(np.asarray(labels, np.int32), counts)
    image_pos = np.repeat(is_image, counts)
    out_ids[image_pos] = image_token_id
    out_labels[image_pos] = IGNORE_INDEX
    return out_ids, out_labels


def next_token_targets(labels: np.ndarray) -> np.ndarray:
    """targets[i] = labels[i+1]; the example's last position predicts nothing."""
    targets = np.full_like(labels, IGNORE_INDEX)
    targets[:-1] = labels[1:]
    return targets


class BatchLayout:
    """Shapes and ids that every batch of one pipeline shares."""

    def __init__(self, *, batch_size: int, max_length: int, max_images_per_row: int,
                 image_shape: tuple[int, int, int], tokens_per_image: int, image_token_id: int,
                 pad_id: int = 0, max_examples_per_row: int | None = None):
        self.batch_size, self.max_length = batch_size, max_length
        self.max_images_per_row, self.image_shape = max_images_per_row, tuple(image_shape)
        self.tokens_per_image, self.image_token_id, self.pad_id = tokens_per_image, image_token_id, pad_id
        self.max_examples_per_row = max_examples_per_row or max(1, max_length // max(1, tokens_per_image + 1))
        for name in ("batch_size", "max_length", "max_images_per_row", "tokens_per_image", "max_examples_per_row"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def fits_alone(self, element: dict) -> str | None:
        """Why the example can never go into a row (or None when it can)."""
        n = example_length(element, self.tokens_per_image)
        m = element["pixel_values"].shape[0]
        if int(np.sum(element["input_ids"] == IMAGE_PLACEHOLDER)) != m:
            raise ValueError(f"record {element['record_id']!r}: {m} images but "
                             f"{int(np.sum(element['input_ids'] == IMAGE_PLACEHOLDER))} image placeholders")
        if m and tuple(element["pixel_values"].shape[1:]) != self.image_shape:
            raise ValueError(f"record {element['record_id']!r}: pixel_values shape "
                             f"{element['pixel_values'].shape[1:]} != {self.image_shape}")
        if n > self.max_length:
            return f"{n} tokens after image expansion > max_length {self.max_length}"
        if m > self.max_images_per_row:
            return f"{m} images > max_images_per_row {self.max_images_per_row}"
        return None

    def assemble(self, rows: list[list[dict]], skipped: SkipCounter, length: int | None = None) -> dict:
        """Rows of examples -> one batch dict (rows beyond len(rows) are all padding)."""
        B, L, K = self.batch_size, length or self.max_length, self.max_images_per_row
        E = self.max_examples_per_row
        batch = {
            "input_ids": np.full((B, L), self.pad_id, np.int32),
            "targets": np.full((B, L), IGNORE_INDEX, np.int32),
            "segment_ids": np.zeros((B, L), np.int32),
            "positions": np.zeros((B, L), np.int32),
            "pixel_values": np.zeros((B, K) + self.image_shape, np.float32),
            "image_mask": np.zeros((B, K), bool),
            "task_ids": np.full((B, L), -1, np.int32),
            "meta_record_ids": np.full((B, E), "", dtype=object),
        }
        for r, row in enumerate(rows):
            start, slot = 0, 0
            for s, ex in enumerate(row):
                ids, labels = expand_example(ex["input_ids"], ex["labels"], tokens_per_image=self.tokens_per_image,
                                             image_token_id=self.image_token_id)
                end = start + len(ids)
                batch["input_ids"][r, start:end] = ids
                batch["targets"][r, start:end] = next_token_targets(labels)
                batch["segment_ids"][r, start:end] = s + 1
                batch["positions"][r, start:end] = np.arange(len(ids))
                batch["task_ids"][r, start:end] = ex["task_id"]
                m = ex["pixel_values"].shape[0]
                batch["pixel_values"][r, slot:slot + m] = ex["pixel_values"]
                batch["image_mask"][r, slot:slot + m] = True
                batch["meta_record_ids"][r, s] = ex["record_id"]
                start, slot = end, slot + m
        batch["meta_record_ids"] = batch["meta_record_ids"].astype(str)
        batch["meta_skips"] = json.dumps(skipped.state(), sort_keys=True)
        return batch


class _Row:
    __slots__ = ("members", "tokens", "images")

    def __init__(self):
        self.members: list[dict] = []
        self.tokens = 0
        self.images = 0

    def add(self, element: dict, length: int) -> None:
        self.members.append(element)
        self.tokens += length
        self.images += element["pixel_values"].shape[0]


def _count(counter: SkipCounter, guard: skips.SkipRateGuard | None, element: dict) -> bool:
    """Counts a skip marker (True) or a truncation of a usable element (False); feeds the guard."""
    task = element.get("task_name") or "?"
    if "skip_reason" in element:
        counter.add(element["skip_reason"], task_name=task, record_id=_record_key(element),
                    message=element.get("message"))
        if guard is not None:
            guard.observe(element["skip_reason"], element.get("message", ""))
        return True
    if element.get("truncated"):
        counter.add_truncated(task, _record_key(element))
    return False


def _record_key(element: dict) -> str | None:
    rid = element.get("record_id")
    return None if rid is None else f"{element.get('source', '')}\x1f{rid}"


def _skip_too_long(counter: SkipCounter, guard: skips.SkipRateGuard | None, element: dict, why: str) -> None:
    error = skips.BadRecord(skips.TOO_LONG, why, record_id=element["record_id"], source=element.get("source"),
                            task_name=element.get("task_name") or "?")
    counter.add(error, record_id=_record_key(element))
    if guard is not None:
        guard.observe(skips.TOO_LONG, str(error))


class BestFitPackIterDataset(grain.IterDataset):
    """Packs examples into rows of `layout.max_length` and emits batches of `layout.batch_size` rows.

    `refetch(index) -> element` re-creates an element by its dataset index (used on restore);
    `pool_rows` bounds how many part-filled rows stay open (more = fuller rows, more refetch
    work after a restore).  `first_fit=True` puts an example into the oldest open row it fits
    instead of the one it fills best (for comparison).  `guard` (a factory of
    skips.SkipRateGuard) stops data that is mostly skips instead of looping on it forever.
    """

    def __init__(self, parent: grain.IterDataset, layout: BatchLayout, refetch: Callable[[int], dict],
                 pool_rows: int | None = None, first_fit: bool = False,
                 guard: Callable[[], skips.SkipRateGuard] | None = None):
        super().__init__(parent)
        self._layout, self._refetch, self._first_fit, self._guard = layout, refetch, first_fit, guard
        self._pool_rows = pool_rows or max(8, 2 * layout.batch_size)

    def __iter__(self):
        return _BestFitPackIterator(self._parent.__iter__(), self._layout, self._refetch, self._pool_rows,
                                    self._first_fit, self._guard() if self._guard else None)

    def __str__(self):
        return f"BestFitPackIterDataset(pool_rows={self._pool_rows})"


class _BestFitPackIterator(grain.DatasetIterator):
    def __init__(self, parent, layout: BatchLayout, refetch, pool_rows: int, first_fit: bool,
                 guard: skips.SkipRateGuard | None = None):
        super().__init__(parent)
        self._layout, self._refetch, self._pool_rows, self._first_fit = layout, refetch, pool_rows, first_fit
        self._guard = guard
        self._open: list[_Row] = []
        self._closed: list[_Row] = []
        self._skipped = SkipCounter()
        self._exhausted = False

    # -- packing --------------------------------------------------------------------------
    def _place(self, element: dict) -> None:
        lay = self._layout
        why = lay.fits_alone(element)
        if why is not None:
            _skip_too_long(self._skipped, self._guard, element, why)
            return
        if self._guard is not None:
            self._guard.observe()
        n, m = example_length(element, lay.tokens_per_image), element["pixel_values"].shape[0]
        best, best_left = None, None
        for row in self._open:
            left = lay.max_length - row.tokens - n
            if left >= 0 and row.images + m <= lay.max_images_per_row and (best_left is None or left < best_left):
                best, best_left = row, left
                if self._first_fit:
                    break
        if best is None:
            best = _Row()
            self._open.append(best)
        best.add(element, n)
        if (best.tokens == lay.max_length or best.images == lay.max_images_per_row
                or len(best.members) == lay.max_examples_per_row):
            self._close(best)
        if len(self._open) > self._pool_rows:
            self._close(min(self._open, key=lambda r: lay.max_length - r.tokens))

    def _close(self, row: _Row) -> None:
        self._open.remove(row)
        self._closed.append(row)

    def __next__(self) -> dict:
        B = self._layout.batch_size
        while len(self._closed) < B and not self._exhausted:
            try:
                element = next(self._parent)
            except StopIteration:
                self._exhausted = True
                break
            if not _count(self._skipped, self._guard, element):
                self._place(element)
        if self._exhausted:   # drain: open rows become closed; last batch padded with empty rows
            self._closed.extend(self._open)
            self._open = []
            if not self._closed and not self._skipped.total:
                raise StopIteration
        rows, self._closed = self._closed[:B], self._closed[B:]
        skipped, self._skipped = self._skipped, SkipCounter()
        return self._layout.assemble([r.members for r in rows], skipped)

    # -- checkpointing --------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        return {
            "parent": self._parent.get_state(),
            "open_rows": [[int(e["index"]) for e in r.members] for r in self._open],
            "closed_rows": [[int(e["index"]) for e in r.members] for r in self._closed],
            "pending_skips": self._skipped.state(),
            "exhausted": self._exhausted,
            **({"guard": self._guard.get_state()} if self._guard is not None else {}),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._open = [self._rebuild(ix) for ix in state["open_rows"]]
        self._closed = [self._rebuild(ix) for ix in state["closed_rows"]]
        self._skipped = SkipCounter.from_dict(state["pending_skips"])
        self._exhausted = bool(state["exhausted"])
        if self._guard is not None:
            self._guard.set_state(state.get("guard", {}))

    def _rebuild(self, indices: list[int]) -> _Row:
        row = _Row()
        for index in indices:
            element = self._refetch(index)
            if "skip_reason" in element:
                raise RuntimeError(f"restoring the packer: dataset index {index} was packed before the "
                                   f"checkpoint but now fails ({element['skip_reason']}: {element.get('message')}); "
                                   f"the data changed on disk")
            row.add(element, example_length(element, self._layout.tokens_per_image))
        return row


class PadToLongestBatchIterDataset(grain.IterDataset):
    """One example per row; the batch is padded to its longest example rounded up to `multiple`
    (capped at max_length).  For comparison with packing; shapes vary between batches."""

    def __init__(self, parent: grain.IterDataset, layout: BatchLayout, multiple: int = 64,
                 guard: Callable[[], skips.SkipRateGuard] | None = None):
        super().__init__(parent)
        self._layout, self._multiple, self._guard = layout, multiple, guard

    def __iter__(self):
        return _PadToLongestIterator(self._parent.__iter__(), self._layout, self._multiple,
                                     self._guard() if self._guard else None)


class _PadToLongestIterator(grain.DatasetIterator):
    def __init__(self, parent, layout: BatchLayout, multiple: int, guard: skips.SkipRateGuard | None = None):
        super().__init__(parent)
        self._layout, self._multiple, self._guard = layout, multiple, guard
        self._skipped = SkipCounter()

    def __next__(self) -> dict:
        lay, rows = self._layout, []
        while len(rows) < lay.batch_size:
            try:
                element = next(self._parent)
            except StopIteration:
                break
            if _count(self._skipped, self._guard, element):
                continue
            why = lay.fits_alone(element)
            if why is not None:
                _skip_too_long(self._skipped, self._guard, element, why)
                continue
            if self._guard is not None:
                self._guard.observe()
            rows.append([element])
        if not rows and not self._skipped.total:
            raise StopIteration
        longest = max([example_length(r[0], lay.tokens_per_image) for r in rows] or [1])
        length = min(lay.max_length, -(-longest // self._multiple) * self._multiple)
        skipped, self._skipped = self._skipped, SkipCounter()
        return lay.assemble(rows, skipped, length=length)

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "pending_skips": self._skipped.state(),
                **({"guard": self._guard.get_state()} if self._guard is not None else {})}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._skipped = SkipCounter.from_dict(state["pending_skips"])
        if self._guard is not None:
            self._guard.set_state(state.get("guard", {}))
