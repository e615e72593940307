"""Read tensors, or row ranges of them, from safetensors files without mapping whole files.

Why not `safetensors.safe_open`: it memory-maps the file, and every page a conversion touches
then counts as resident memory of the process until the kernel evicts it, so a sharded import
of a 13B model would *look* like it needs the whole file in RAM. Here a read is one `readinto`
of exactly the bytes of the rows asked for (the format is an 8-byte header length, a JSON
header, then raw little-endian C-order data), and nothing else stays resident.

The header is validated up front (lengths, offsets, dtypes against the file size), so a
truncated or corrupt file fails with its name before any conversion work starts.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

from vflan_jax.convert.errors import ConversionError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: pathlib.Path
    name: str          # the key as stored in the file
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int        # absolute byte offset of the data in the file

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_header(path: pathlib.Path) -> dict[str, TensorInfo]:
    """Every tensor of one safetensors file; raises ConversionError naming the file when the
    header is unreadable or any tensor's bytes lie beyond the end of the file."""
    path = pathlib.Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConversionError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(_MAX_HEADER, size - 8):
            raise ConversionError(f"{path}: corrupt or truncated safetensors file (header length {header_len}, "
                                  f"file size {size})")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start, data_len = 8 + header_len, size - 8 - header_len
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path}: tensor {name!r} has an unreadable header entry {entry!r}") from None
        if end > data_len:
            raise ConversionError(f"{path}: tensor {name!r} ends at byte {end} of the data section, but the file holds "
                                  f"only {data_len} data bytes (truncated file?)")
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise ConversionError(f"{path}: tensor {name!r} of {entry['dtype']}{list(shape)} has "
                                  f"{end - begin} bytes (corrupt header)")
        out[name] = TensorInfo(path, name, dtype, shape, data_start + begin)
    return out


def read_rows(info: TensorInfo, rows: slice | None = None) -> np.ndarray:
    """The whole tensor, or rows[start:stop] of its first dimension (contiguous bytes)."""
    shape = info.shape
    if not shape:
        start, stop, row_shape = 0, 1, ()
    else:
        start, stop, _ = (rows or slice(None)).indices(shape[0])
        stop = max(stop, start)
        row_shape = shape[1:]
    row_bytes = math.prod(row_shape) * info.dtype.itemsize
    buf = np.empty((stop - start) * row_bytes, np.uint8)
    with open(info.file, "rb") as f:
        f.seek(info.offset + start * row_bytes)
        got = f.readinto(memoryview(buf))
    if got != buf.size:
        raise ConversionError(f"{info.file}: tensor {info.name!r} is truncated (read {got} of {buf.size} bytes)")
    out = buf.view(info.dtype)
    return out.reshape(shape if not shape else (stop - start,) + row_shape)


class CheckpointFiles:
    """The safetensors weights of one checkpoint directory (or one file), by key.

    A directory with `model.safetensors.index.json` uses exactly the files its weight_map
    names; otherwise every `*.safetensors` in it. `rename` maps stored keys to the names a
    layout table uses (e.g. layout.canonical_key); the stored name stays in error messages.
    """

    def __init__(self, path: str | os.PathLike, rename=lambda key: key):
        self.path = pathlib.Path(path)
        self.tensors: dict[str, TensorInfo] = {}
        for file in self._files():
            for name, info in read_header(file).items():
                key = rename(name)
                if key in self.tensors:
                    other = self.tensors[key]
                    raise ConversionError(f"tensor {name!r} in {file} duplicates {other.name!r} in {other.file}")
                self.tensors[key] = info

    def _files(self) -> list[pathlib.Path]:
        p = self.path
        if p.is_file():
            return [p]
        if not p.is_dir():
            raise ConversionError(f"{p}: no such checkpoint directory or file")
        index = p / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConversionError(f"{index}: unreadable index ({e!r})") from None
            files = sorted({p / name for name in weight_map.values()})
            missing = [f for f in files if not f.exists()]
            if missing:
                raise ConversionError(f"{index} lists shard {missing[0].name} (tensor "
                                      f"{next(k for k, v in weight_map.items() if p / v == missing[0])!r}), "
                                      f"which is not in {p}")
            return files
        files = sorted(p.glob("*.safetensors"))
        if not files:
            pickles = (".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
            others = sorted(f.name for f in p.iterdir() if f.suffix in pickles)
            hint = (f"; found {others[:3]}: PyTorch pickles are not read (convert them to safetensors first, e.g. "
                    "save_pretrained(..., safe_serialization=True))") if others else ""
            raise ConversionError(f"{p}: no weights (no *.safetensors files and no {INDEX_NAME}){hint}")
        return files

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def keys(self) -> Iterable[str]:
        return self.tensors.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key].shape

    def dtype(self, key: str) -> np.dtype:
        return self.tensors[key].dtype

    def read(self, key: str, rows: slice | None = None) -> np.ndarray:
        return read_rows(self.tensors[key], rows)

    def describe(self, key: str) -> str:
        info = self.tensors[key]
        return f"tensor {info.name!r} in {info.file}"
