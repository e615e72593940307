"""The start-up parameter table: every parameter with its shape, dtype, size, sharding and whether
it trains (clu.parameter_overview's table, for train.log: about 55 scanned leaves at any model size),
and a per-module summary of four lines for the console."""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Mapping

from clu import parameter_overview
from flax import traverse_util

from vflan_jax import cli


@dataclasses.dataclass
class ParamRow:
    name: str
    shape: tuple[int, ...]
    dtype: str
    size: int
    bytes: int
    sharding: str
    trainable: bool


@dataclasses.dataclass
class ModuleRow:
    module: str
    trainable: int
    frozen: int
    memory: str   # all shards together


def _spec(sharding) -> str:
    """'fsdp, tensor' for PartitionSpec('fsdp', 'tensor'); 'replicated' when no axis is sharded."""
    axes = [a for a in getattr(sharding, "spec", ())]
    if not any(a is not None for a in axes):
        return "replicated"
    return ", ".join("+".join(a) if isinstance(a, tuple) else str(a) for a in axes)


def parameter_rows(abstract_params: Mapping, shardings: Mapping, mask: Mapping[tuple[str, ...], bool]
                   ) -> list[ParamRow]:
    """abstract_params, shardings: the same nested tree (shapes, NamedShardings); mask: the optimizer's
    {flat path: trainable}."""
    flat, flat_sh = traverse_util.flatten_dict(abstract_params), traverse_util.flatten_dict(shardings)
    rows = []
    for path, v in sorted(flat.items()):
        size = int(math.prod(v.shape))
        rows.append(ParamRow(name="/".join(path), shape=tuple(v.shape), dtype=str(v.dtype), size=size,
                             bytes=size * v.dtype.itemsize, sharding=_spec(flat_sh[path]), trainable=bool(mask[path])))
    return rows


def module_rows(rows: list[ParamRow]) -> list[ModuleRow]:
    """One row per top-level module (vision_tower, multi_modal_projector, language_model)."""
    counts: dict[str, list[int]] = {}
    for r in rows:
        c = counts.setdefault(r.name.split("/")[0], [0, 0, 0])
        c[0 if r.trainable else 1] += r.size
        c[2] += r.bytes
    return [ModuleRow(module, trainable, frozen, _gib(size)) for module, (trainable, frozen, size) in counts.items()]


def _gib(size: int) -> str:
    return f"{size / 1024 ** 3:.2f} GiB" if size >= 1024 ** 3 / 10 else f"{size / 1024 ** 2:.2f} MiB"


def summary_table(rows: list[ParamRow]) -> str:
    """A line per module under the totals, no borders: the console budget of a run is a few lines."""
    modules = module_rows(rows)
    trainable, frozen = sum(m.trainable for m in modules), sum(m.frozen for m in modules)
    width = max(len(m.module) for m in modules)
    return "\n".join([f"parameters: {trainable + frozen:,} ({trainable:,} trainable, {frozen:,} frozen)"] +
                     [f"  {m.module:{width}s} {m.trainable:>15,} trainable {m.frozen:>15,} frozen {m.memory:>12s}"
                      for m in modules])


def full_table(rows: list[ParamRow]) -> str:
    return parameter_overview.make_table(rows)


def log_tables(abstract_params: Mapping, shardings: Mapping, mask: Mapping[tuple[str, ...], bool]) -> None:
    """The per-module summary to the console and train.log, every parameter to train.log only."""
    rows = parameter_rows(abstract_params, shardings, mask)
    logging.info("%s", summary_table(rows))
    logging.info("every parameter:\n%s", full_table(rows), extra=cli.FILE_ONLY)
