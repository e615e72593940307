"""Timing helpers shared by the benchmarks: best-of-N wall time, rounds interleaved between systems."""
from __future__ import annotations

import time


def interleaved_best(fns: dict, repeats: int) -> dict:
    """Best time per function over `repeats` rounds that alternate between them, so both systems
    see the same machine load (this CPU is shared; torch suffers most from oversubscription).
    Each function runs once first, untimed: compilation (jax) / allocator warm-up (torch)."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def best_time(fn, repeats: int = 5) -> float:
    """Best wall time of fn() over `repeats` runs after one untimed warm-up run."""
    return interleaved_best({"fn": fn}, repeats)["fn"]
