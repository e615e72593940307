"""Annotation files (JSON list / JSONL) as a random-access record source with a numpy index.

Start-up reads each file once (sources.iter_record_fields: validation, bad-record counts) and
keeps, per usable record, only its byte span and the index fields (record_index.py): no
Example objects stay in memory, so start-up memory is flat and Grain's spawned workers receive
a few numpy arrays. A record is read again, by its span, when the pipeline decodes it
(`os.pread`, thread-safe; the page cache is shared by the worker processes).
"""
from __future__ import annotations

import array
import os
import sys
from typing import Callable, Literal, Sequence

import numpy as np

from vflan_jax.data import sources
from vflan_jax.data.record_index import IndexBuilder, RecordIndex
from vflan_jax.data.skips import SkipCounter
from vflan_jax.data.sources import Example

_PROGRESS_BYTES = 1 << 22


class JsonRecords:
    """index -> Example for the usable records of some annotation files (picklable, small)."""

    def __init__(self, paths: Sequence[str], formats: Sequence[str], default_task: str | None,
                 file_ids: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, positions: np.ndarray,
                 inline: dict[int, list[Example]]):
        self.paths, self.formats, self.default_task = list(paths), list(formats), default_task
        self.file_ids, self.offsets, self.lengths, self.positions = file_ids, offsets, lengths, positions
        self.inline = inline     # file id -> Examples of a nested-object file (no byte spans; small files)
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> Example:
        f, offset = int(self.file_ids[i]), int(self.offsets[i])
        if offset == sources.WHOLE_FILE:
            return self.inline[f][int(self.lengths[i])]
        path = self.paths[f]
        fd = self._fds.get(f)
        if fd is None:
            fd = self._fds.setdefault(f, os.open(path, os.O_RDONLY))
        record = sources.record_at(path, fd, offset, int(self.lengths[i]))
        return sources.convert_record(record, self.formats[f], int(self.positions[i]), path, self.default_task)

    def slice(self, start: int, stop: int) -> "JsonRecords":
        """Records [start, stop) (what one prepare worker needs)."""
        s = slice(start, stop)
        return JsonRecords(self.paths, self.formats, self.default_task, self.file_ids[s], self.offsets[s],
                           self.lengths[s], self.positions[s], self.inline)

    def __getstate__(self):
        return {**self.__dict__, "_fds": {}}   # descriptors are per process

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)


def scan_json_files(paths: Sequence[str], format: str = "auto", default_task: str | None = None,
                    on_bad: SkipCounter | Literal["raise"] = "raise",
                    progress: Callable[[int], None] | None = None) -> tuple[RecordIndex, JsonRecords]:
    """Read and validate every file once -> (index, records). `progress(bytes)` gets byte increments."""
    builder = IndexBuilder()
    offsets, lengths, positions = array.array("q"), array.array("q"), array.array("i")
    per_file, formats, inline = [], [], {}
    add = builder.add
    # The loop runs once per record (1.66M for the release): locals only, one call per record.
    for f, path in enumerate(paths):
        fmt, rows = sources.iter_record_fields(path, format, default_task, on_bad)
        formats.append(fmt)
        done, before = 0, len(offsets)
        for index, fields, offset, length in rows:
            add(*fields)
            positions.append(index)
            if offset == sources.WHOLE_FILE:
                lengths.append(len(inline.setdefault(f, [])))
                inline[f].append(Example(*fields, sys.intern(os.fspath(path)), index))
            else:
                lengths.append(length)
                if progress and offset - done > _PROGRESS_BYTES:
                    progress(offset - done)
                    done = offset
            offsets.append(offset)
        per_file.append(len(offsets) - before)
        if progress:
            progress(os.path.getsize(path) - done)
    file_ids = np.repeat(np.arange(len(paths), dtype=np.uint16), per_file)
    records = JsonRecords([os.fspath(p) for p in paths], formats, default_task,
                          file_ids, np.frombuffer(offsets, np.int64).copy(),
                          np.frombuffer(lengths, np.int64).copy(), np.frombuffer(positions, np.int32).copy(), inline)
    return builder.build(), records
