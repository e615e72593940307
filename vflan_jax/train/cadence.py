"""When a periodic action (log line, evaluation, checkpoint) runs, as big_vision's `itstime`."""
from __future__ import annotations


def due(step: int, every: int, total: int, *, last: bool = False) -> bool:
    """After step `step` (1-based), every `every` steps (0: never). The final step is `last`'s
    alone: the loop logs it, but evaluates and saves it after the loop (final eval, final save)."""
    if step == total:
        return last
    return bool(every) and step % every == 0
