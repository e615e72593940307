"""JSON-lines files: read with clear errors; append crash-safely (the answer and review logs)."""
from __future__ import annotations

import json
import os

from vflan_jax.eval.benchmark import BenchmarkError


def read_jsonl(path: str, what: str = "JSON-lines file") -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise BenchmarkError(f"{path}:{n}: not valid JSON in {what}: {e}") from None
    return records


def read_log(path: str) -> list[dict]:
    """Records of an append-only log. A torn last line (the process died mid-write) is cut off
    so the next append starts on a clean line; anything else malformed is an error."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(cut)
    return read_jsonl(path, "append-only log")


def append_jsonl(path: str, records: list[dict]) -> None:
    if not records:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def write_jsonl(path: str, records: list[dict]) -> None:
    """Replace path with these records (for files that hold one scoring's output, unlike the logs)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
