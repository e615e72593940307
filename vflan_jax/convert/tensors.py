"""Moving tensors from a flat {checkpoint key: array} view into the nested Flax tree, following
a layout table (convert/layout.py). Host-memory (numpy) versions; the importer builds device
arrays shard by shard on top of `assemble`, and the exporter streams the reverse direction.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from vflan_jax.convert.layout import ParamSource, to_flax


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
