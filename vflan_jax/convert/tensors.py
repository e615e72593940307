"""Moving tensors between a flat {checkpoint key: array} view and the nested Flax tree,
following a layout table (convert/layout.py). Host-memory (numpy) versions; the importer
builds device arrays shard by shard on top of `assemble`.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from vflan_jax.convert.layout import ParamSource, to_flax, to_torch


def assemble(source: ParamSource, get: Callable[[str], np.ndarray]) -> np.ndarray:
    """Build one Flax parameter from its checkpoint tensor(s)."""
    parts = [to_flax(np.asarray(get(key)), source.kind) for key in source.keys]
    return np.stack(parts) if source.stacked else parts[0]


def nest(flat: Mapping[tuple[str, ...], object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


def flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    out = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix + (name,)))
        else:
            out[prefix + (name,)] = value
    return out


def params_from_tensors(layout: Mapping[tuple[str, ...], ParamSource], get: Callable[[str], np.ndarray]) -> dict:
    return nest({path: assemble(src, get) for path, src in layout.items()})


def tensors_from_params(layout: Mapping[tuple[str, ...], ParamSource], params: Mapping) -> dict[str, np.ndarray]:
    """Inverse of params_from_tensors: {canonical checkpoint key: torch-layout array}."""
    flat = flatten(params)
    out = {}
    for path, src in layout.items():
        if path not in flat:
            raise KeyError(f"parameter {'/'.join(path)} is missing from the Flax tree")
        value = np.asarray(flat[path])
        parts = list(value) if src.stacked else [value]
        if len(parts) != len(src.keys):
            raise ValueError(f"parameter {'/'.join(path)} has {len(parts)} layers, the layout expects {len(src.keys)}")
        for key, part in zip(src.keys, parts):
            out[key] = np.ascontiguousarray(to_torch(part, src.kind))
    return out
