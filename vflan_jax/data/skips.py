"""Bad-record accounting shared by the whole data layer.

A long run must never crash on one broken record, and must never drop one silently:
every reader / tokenizer / image loader raises `BadRecord` with a reason from the fixed
set below; the caller either counts it in a `SkipCounter` (reported in metrics and at
the end of the run) or, in strict mode, lets it propagate with a message that names the
file, the record id and the reason.
"""
from __future__ import annotations

import collections
from typing import Literal

MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
MALFORMED = "malformed_conversation"
EMPTY_ANSWER = "empty_answer"
TOO_LONG = "too_long"
PATH_ESCAPE = "path_outside_folder"
MISALIGNED = "label_misaligned"
NO_SUPERVISED = "no_supervised_tokens"

REASONS = (MISSING_IMAGE, UNREADABLE_IMAGE, MALFORMED, EMPTY_ANSWER, TOO_LONG, PATH_ESCAPE,
           MISALIGNED, NO_SUPERVISED)

RAISE = "raise"


class BadRecord(Exception):
    """One record that cannot be used, with the reason and where it came from."""

    def __init__(self, reason: str, message: str = "", *, record_id: str | None = None,
                 source: str | None = None, task_name: str | None = None):
        if reason not in REASONS:
            raise ValueError(f"unknown bad-record reason {reason!r}; expected one of {REASONS}")
        super().__init__(reason, message)
        self.reason = reason
        self.message = message
        self.record_id = record_id
        self.source = source
        self.task_name = task_name

    def with_context(self, *, record_id=None, source=None, task_name=None) -> "BadRecord":
        """A copy with the missing location fields filled in (e.g. by the caller that knows the example)."""
        return BadRecord(self.reason, self.message,
                         record_id=self.record_id if self.record_id is not None else record_id,
                         source=self.source if self.source is not None else source,
                         task_name=self.task_name if self.task_name is not None else task_name)

    def __str__(self) -> str:
        where = f"{self.source or '<unknown file>'}, record {self.record_id!r}"
        task = f" (task {self.task_name})" if self.task_name else ""
        detail = f": {self.message}" if self.message else ""
        return f"{where}{task}: {self.reason}{detail}"


class SkipCounter:
    """Counts skipped records per reason and per (task, reason); keeps one example message per reason."""

    def __init__(self):
        self.by_reason: collections.Counter[str] = collections.Counter()
        self.by_task: collections.Counter[tuple[str, str]] = collections.Counter()
        self.first_message: dict[str, str] = {}

    def add(self, error: BadRecord | str, task_name: str | None = None, count: int = 1) -> None:
        reason = error.reason if isinstance(error, BadRecord) else error
        if reason not in REASONS:
            raise ValueError(f"unknown bad-record reason {reason!r}")
        task = task_name or (error.task_name if isinstance(error, BadRecord) else None) or "?"
        self.by_reason[reason] += count
        self.by_task[(task, reason)] += count
        if isinstance(error, BadRecord):
            self.first_message.setdefault(reason, str(error))

    def merge(self, other: "SkipCounter") -> "SkipCounter":
        self.by_reason.update(other.by_reason)
        self.by_task.update(other.by_task)
        for reason, msg in other.first_message.items():
            self.first_message.setdefault(reason, msg)
        return self

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def as_dict(self) -> dict:
        by_task: dict[str, dict[str, int]] = {}
        for (task, reason), n in sorted(self.by_task.items()):
            by_task.setdefault(task, {})[reason] = n
        return {"total": self.total, "by_reason": dict(sorted(self.by_reason.items())),
                "by_task": by_task}

    @classmethod
    def from_dict(cls, d: dict) -> "SkipCounter":
        counter = cls()
        for task, reasons in d.get("by_task", {}).items():
            for reason, n in reasons.items():
                counter.add(reason, task_name=task, count=n)
        return counter

    def report(self) -> str:
        if not self.total:
            return "skipped records: none"
        width = max(len(r) for r in self.by_reason)
        lines = [f"skipped records: {self.total}"]
        for reason, n in self.by_reason.most_common():
            tasks = sorted(((t, k) for (t, r), k in self.by_task.items() if r == reason),
                           key=lambda tk: -tk[1])
            top = ", ".join(f"{t}={k}" for t, k in tasks[:3]) + (", ..." if len(tasks) > 3 else "")
            lines.append(f"  {reason:<{width}}  {n:>8}   tasks: {top}")
            if reason in self.first_message:
                lines.append(f"  {'':<{width}}  e.g. {self.first_message[reason]}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"SkipCounter({dict(self.by_reason)})"


def skip_or_raise(error: BadRecord, on_bad: "SkipCounter | Literal['raise']") -> None:
    """Strict mode (on_bad='raise') re-raises; otherwise the record is counted and skipped."""
    if isinstance(on_bad, SkipCounter):
        on_bad.add(error)
    elif on_bad == RAISE:
        raise error
    else:
        raise TypeError(f"on_bad must be a SkipCounter or {RAISE!r}, got {on_bad!r}")
