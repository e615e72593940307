"""Benchmark name -> module (each with NAME, MAX_NEW_TOKENS, load_questions, evaluate)."""
from __future__ import annotations

import importlib

from vflan_jax.eval.benchmark import BenchmarkError

BENCHMARKS = {"mme": "mme", "pope": "pope", "mmbench": "mmbench", "llava_bench": "llava_bench",
              "mm_vet": "mm_vet", "mmmu": "mmmu", "forgetting": "forgetting"}
ALIASES = {"llava-bench": "llava_bench", "llava_w": "llava_bench", "mm-vet": "mm_vet", "mmvet": "mm_vet",
           "cf": "forgetting"}


def get_benchmark(name: str):
    key = ALIASES.get(name.lower(), name.lower())
    if key not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return importlib.import_module(f"vflan_jax.eval.{BENCHMARKS[key]}")
