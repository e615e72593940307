"""Prepared data (python -m vflan_jax.data.prepare): ArrayRecord shards + index + manifest.

  OUT/data-SSSSS-of-NNNNN.array_record   one record per usable example (encode_record)
  OUT/manifest.json                      counts per task, skipped records per reason, source hashes
  OUT/index.array_record                 written last (a folder without it is not prepared data):
                                         record 0 the manifest, record 1 the RecordIndex over all
                                         shards in shard order (record_index.py)
Everything a host reads goes through array_record, which opens local and gs:// paths itself (its
GCS reader), so a bucket needs no extra file-system package; shards are read through Grain's
ArrayRecordDataSource (random access, lazily opened readers, picklable without its readers).
"""
from __future__ import annotations

import dataclasses
import json
import struct

from array_record.python.array_record_module import ArrayRecordReader
from grain.sources import ArrayRecordDataSource

from vflan_jax.data.record_index import RecordIndex
from vflan_jax.data.sources import Example

MANIFEST, INDEX = "manifest.json", "index.array_record"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<I")


def shard_name(shard: int, shards: int) -> str:
    return f"data-{shard:05d}-of-{shards:05d}.array_record"


def encode_record(ex: Example) -> bytes:
    """4-byte header length, the JSON header (text fields), then the image's bytes as they were."""
    header = json.dumps({"id": ex.id, "task_name": ex.task_name, "image": ex.image, "turns": ex.turns,
                         "source": ex.source, "index": ex.index}, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return _HEADER.pack(len(header)) + header + (ex.image_bytes or b"")


def decode_record(data: bytes, embedded: bool) -> Example:
    (n,) = _HEADER.unpack_from(data)
    h = json.loads(data[_HEADER.size:_HEADER.size + n].decode("utf-8", "surrogatepass"))
    image_bytes = data[_HEADER.size + n:] if embedded and h["image"] is not None else None
    return Example(h["id"], h["task_name"], h["image"], tuple((r, t) for r, t in h["turns"]), h["source"],
                   h["index"], image_bytes=image_bytes)


@dataclasses.dataclass(frozen=True)
class _FileInstruction:   # what ArrayRecordDataSource accepts instead of opening every shard to count it
    filename: str
    skip: int
    take: int
    examples_in_shard: int


class PreparedRecords:
    """index -> Example over the shards (what Grain's workers receive: paths and counts only)."""

    def __init__(self, folder: str, manifest: dict):
        self.embedded = manifest["images"] == "embed"
        files = [_FileInstruction(join(folder, s["file"]), 0, s["records"], s["records"])
                 for s in manifest["shards"] if s["records"]]
        self._source = ArrayRecordDataSource(files) if files else None

    def __len__(self) -> int:
        return len(self._source) if self._source is not None else 0

    def __getitem__(self, i: int) -> Example:
        return decode_record(self._source[i], self.embedded)


def join(folder: str, name: str) -> str:
    return folder.rstrip("/") + "/" + name


def _open_index(folder: str) -> ArrayRecordReader | None:
    reader = ArrayRecordReader(join(folder, INDEX))
    return reader if reader.ok() and reader.num_records() == 2 else None


def is_prepared(folder: str) -> bool:
    return _open_index(folder) is not None


def open_prepared(folder: str) -> tuple[dict, RecordIndex, PreparedRecords]:
    """(manifest, index, records) of a prepared folder or bucket."""
    reader = _open_index(folder)
    if reader is None:
        raise ValueError(f"{folder}: not prepared data ({INDEX} missing or incomplete; "
                         f"run python -m vflan_jax.data.prepare)")
    raw_manifest, raw_index = reader.read([0, 1])
    reader.close()
    manifest = json.loads(raw_manifest)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder}: format_version {manifest.get('format_version')!r}, this code reads "
                         f"{FORMAT_VERSION}; prepare the data again")
    index = RecordIndex.from_bytes(raw_index)
    records = PreparedRecords(folder, manifest)
    if len(index) != len(records) or len(index) != manifest["records"]:
        raise ValueError(f"{folder}: index has {len(index)} records, shards {len(records)}, manifest "
                         f"{manifest['records']}; prepare the data again")
    return manifest, index, records


def read_manifest(folder: str) -> dict:
    return open_prepared(folder)[0]
