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
MAX_EXAMPLES = 5   # culprits kept per reason for the report


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
    """Counts skipped records per reason and per (task, reason), each record once per reason.

    A record met again (the same record on a later pass over the data) is not counted again:
    it adds to `repeats`, which the report shows beside the count. Records whose tokens were
    cut at max_length are not skips; they are counted, once each, in `truncated` (per task).
    `state()` / `from_state()` carry the record keys (batch -> trainer -> checkpoint) so the
    once-per-record rule holds across batches and resumes; `as_dict()` is the compact report.
    """

    def __init__(self):
        self._records: dict[tuple, str] = {}                  # (reason, record key) -> task
        self._anonymous: collections.Counter[tuple[str, str]] = collections.Counter()  # (task, reason)
        self._truncated: dict[str, str] = {}                  # record key -> task
        self._truncated_anonymous: collections.Counter[str] = collections.Counter()
        self.repeats: collections.Counter[str] = collections.Counter()
        self.first_message: dict[str, str] = {}
        self.examples: dict[str, list[str]] = {}              # the first few culprits per reason

    def add(self, error: BadRecord | str, task_name: str | None = None, count: int = 1,
            record_id: str | None = None, message: str | None = None) -> None:
        reason = error.reason if isinstance(error, BadRecord) else error
        if reason not in REASONS:
            raise ValueError(f"unknown bad-record reason {reason!r}")
        task = task_name or (error.task_name if isinstance(error, BadRecord) else None) or "?"
        if isinstance(error, BadRecord):
            message = message or str(error)
            if record_id is None and error.record_id is not None:
                record_id = f"{error.source or ''}\x1f{error.record_id}"
        if record_id is not None:
            key = (reason, f"{task}\x1f{record_id}")
            if key in self._records:
                self.repeats[reason] += count
                return
            self._records[key] = task
        else:
            self._anonymous[(task, reason)] += count
        if message:
            self.first_message.setdefault(reason, message)
            culprits = self.examples.setdefault(reason, [])
            if len(culprits) < MAX_EXAMPLES:
                culprits.append(message)

    def add_truncated(self, task_name: str, record_id: str | None = None) -> None:
        """A record cut at max_length (counted once per record)."""
        if record_id is None:
            self._truncated_anonymous[task_name] += 1
        else:
            self._truncated.setdefault(f"{task_name}\x1f{record_id}", task_name)

    def merge(self, other: "SkipCounter") -> "SkipCounter":
        for (reason, key), task in other._records.items():
            if (reason, key) in self._records:
                self.repeats[reason] += 1
            else:
                self._records[(reason, key)] = task
        self._anonymous.update(other._anonymous)
        self.repeats.update(other.repeats)
        for key, task in other._truncated.items():
            self._truncated.setdefault(key, task)
        self._truncated_anonymous.update(other._truncated_anonymous)
        for reason, msg in other.first_message.items():
            self.first_message.setdefault(reason, msg)
        for reason, msgs in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(m for m in msgs[:MAX_EXAMPLES - len(mine)] if m not in mine)
        return self

    @property
    def by_task(self) -> collections.Counter[tuple[str, str]]:
        out = collections.Counter(self._anonymous)
        out.update((task, reason) for (reason, _), task in self._records.items())
        return out

    @property
    def by_reason(self) -> collections.Counter[str]:
        out = collections.Counter()
        for (_, reason), n in self.by_task.items():
            out[reason] += n
        return out

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    @property
    def truncated_by_task(self) -> collections.Counter[str]:
        out = collections.Counter(self._truncated_anonymous)
        out.update(self._truncated.values())
        return out

    def as_dict(self) -> dict:
        by_task: dict[str, dict[str, int]] = {}
        for (task, reason), n in sorted(self.by_task.items()):
            by_task.setdefault(task, {})[reason] = n
        truncated = self.truncated_by_task
        return {"total": self.total, "by_reason": dict(sorted(self.by_reason.items())),
                "by_task": by_task, "repeats": dict(sorted(self.repeats.items())),
                "truncated": {"total": sum(truncated.values()), "by_task": dict(sorted(truncated.items()))}}

    @classmethod
    def from_dict(cls, d: dict) -> "SkipCounter":
        """From `as_dict()` (counts only) or `state()` (with the record keys)."""
        counter = cls()
        for task, reasons in d.get("by_task", {}).items():
            for reason, n in reasons.items():
                counter.add(reason, task_name=task, count=n)
        counter.repeats.update(d.get("repeats", {}))
        counter._truncated_anonymous.update(d.get("truncated", {}).get("by_task", {}))
        if "records" in d:   # state(): the counts above are rebuilt from the keys instead
            counter._anonymous = collections.Counter(
                {tuple(k.split("\x1e")): n for k, n in d["anonymous"].items()})
            counter._records = {(r, k): t for r, k, t in d["records"]}
            counter._truncated = dict(d["truncated_records"])
            counter._truncated_anonymous = collections.Counter(d["truncated_anonymous"])
            counter.examples = {r: list(m) for r, m in d.get("examples", {}).items()}
            counter.first_message = {r: m[0] for r, m in counter.examples.items() if m}
        return counter

    def state(self) -> dict:
        """Everything, record keys included (JSON): what batches and checkpoints carry."""
        return {**self.as_dict(), "records": [[r, k, t] for (r, k), t in self._records.items()],
                "anonymous": {f"{t}\x1e{r}": n for (t, r), n in self._anonymous.items()},
                "truncated_records": sorted(self._truncated.items()),
                "truncated_anonymous": dict(self._truncated_anonymous), "examples": self.examples}

    def report(self) -> str:
        lines = []
        if not self.total:
            lines.append("skipped records: none")
        else:
            by_reason, by_task = self.by_reason, self.by_task
            width = max(len(r) for r in by_reason)
            repeats = sum(self.repeats.values())
            lines.append(f"skipped records: {self.total}" + (
                f" (each counted once; met {repeats} more times on later passes over the data)" if repeats else ""))
            for reason, n in by_reason.most_common():
                tasks = sorted(((t, k) for (t, r), k in by_task.items() if r == reason), key=lambda tk: -tk[1])
                top = ", ".join(f"{t}={k}" for t, k in tasks[:3]) + (", ..." if len(tasks) > 3 else "")
                lines.append(f"  {reason:<{width}}  {n:>8}   tasks: {top}")
                if reason in self.first_message:
                    lines.append(f"  {'':<{width}}  e.g. {self.first_message[reason]}")
        truncated = self.truncated_by_task
        if truncated:
            top = ", ".join(f"{t}={k}" for t, k in truncated.most_common(3)) + (", ..." if len(truncated) > 3 else "")
            lines.append(f"truncated at max_length (answer cut): {sum(truncated.values())} records   tasks: {top}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"SkipCounter({dict(self.by_reason)})"


class TooManySkips(RuntimeError):
    """The data yields (almost) nothing usable: stopping beats looping at step 0 forever."""


class SkipRateGuard:
    """Stops a pipeline whose records are mostly skips.

    Two rules: a first full pass over the data (`records_per_pass` elements, when known) with no
    usable example; or more than `max_fraction` skips among the last `window` elements.
    The message gives the counts per reason and the first few culprits.
    """

    def __init__(self, max_fraction: float = 0.5, window: int = 1000, records_per_pass: int | None = None):
        self.max_fraction, self.window, self.records_per_pass = max_fraction, window, records_per_pass
        self.seen = self.usable = 0
        self._recent: collections.deque[bool] = collections.deque(maxlen=window)
        self._recent_skips = 0
        self._reasons: collections.Counter[str] = collections.Counter()
        self._culprits: list[str] = []

    def observe(self, skip_reason: str | None = None, message: str = "") -> None:
        skipped = skip_reason is not None
        if len(self._recent) == self.window:
            self._recent_skips -= self._recent[0]
        self._recent.append(skipped)
        self._recent_skips += skipped
        self.seen += 1
        if not skipped:
            self.usable += 1
            return
        self._reasons[skip_reason] += 1
        if len(self._culprits) < MAX_EXAMPLES and message:
            self._culprits.append(message)
        if self.records_per_pass and self.seen >= self.records_per_pass and not self.usable:
            self._fail(f"no usable record in a full pass over the data ({self.seen} records, all skipped)")
        if len(self._recent) == self.window and self._recent_skips > self.max_fraction * self.window:
            self._fail(f"{self._recent_skips} of the last {self.window} records were skipped, more than "
                       f"data.max_skip_fraction={self.max_fraction:g} (data.skip_window={self.window})")

    def _fail(self, what: str) -> None:
        reasons = ", ".join(f"{r}={n}" for r, n in self._reasons.most_common())
        culprits = "".join(f"\n  e.g. {m}" for m in self._culprits)
        raise TooManySkips(f"data: {what}; skips by reason since the start: {reasons}{culprits}\n"
                           "check image_folder and the annotation files (python -m vflan_jax.data.inspect)")

    def get_state(self) -> dict:
        return {"seen": self.seen, "usable": self.usable}

    def set_state(self, state: dict) -> None:   # the window restarts empty after a restore
        self.seen, self.usable = int(state.get("seen", 0)), int(state.get("usable", 0))


def skip_or_raise(error: BadRecord, on_bad: "SkipCounter | Literal['raise']") -> None:
    """Strict mode (on_bad='raise') re-raises; otherwise the record is counted and skipped."""
    if isinstance(on_bad, SkipCounter):
        on_bad.add(error)
    elif on_bad == RAISE:
        raise error
    else:
        raise TypeError(f"on_bad must be a SkipCounter or {RAISE!r}, got {on_bad!r}")
