"""Write a sharded safetensors checkpoint one tensor at a time.

The header of each file is computed from shapes alone, then the tensors are fetched and
written in order, so memory holds one tensor, not one shard. Layout as transformers writes it:
one `model.safetensors` when everything fits in one shard, else
`model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`.
"""
from __future__ import annotations

import json
import math
import pathlib
import struct
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from vflan_jax.convert.safetensors_reader import DTYPE_NAMES, INDEX_NAME


def plan_shards(specs: Sequence[tuple[str, tuple[int, ...], np.dtype]], max_shard_bytes: int) -> list[list[int]]:
    """Greedy in order: a new shard starts when the next tensor would overflow this one."""
    shards, size = [[]], 0
    for i, (_, shape, dtype) in enumerate(specs):
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def _header(specs, metadata: dict[str, str]) -> bytes:
    header, offset = {"__metadata__": metadata}, 0
    for name, shape, dtype in specs:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors does


def write_safetensors(out_dir: str | pathlib.Path, specs: Sequence[tuple[str, tuple[int, ...], np.dtype]],
                      fetch: Callable[[int], np.ndarray], max_shard_bytes: int = 5 * 2**30,
                      metadata: dict[str, str] | None = None, progress: bool = True) -> list[pathlib.Path]:
    """specs[i] = (name, shape, dtype); fetch(i) returns tensor i (any dtype castable to specs[i])."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", **(metadata or {})}
    shards = plan_shards(specs, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    bar = tqdm(total=len(specs), desc="export", unit="tensor", disable=not progress or None)
    weight_map, total = {}, 0
    for name, members in zip(names, shards, strict=True):
        shard_specs = [specs[i] for i in members]
        header = _header(shard_specs, metadata)
        with open(out_dir / name, "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            for i, (key, shape, dtype) in zip(members, shard_specs, strict=True):
                array = np.ascontiguousarray(np.asarray(fetch(i)).astype(dtype, copy=False))
                if array.shape != tuple(shape):
                    raise ValueError(f"tensor {key!r}: fetched shape {array.shape}, planned {tuple(shape)}")
                f.write(array.reshape(-1).view(np.uint8))  # no byte copy; one tensor in memory at a time
                weight_map[key] = name
                total += array.nbytes
                bar.update()
    bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [out_dir / n for n in names]
