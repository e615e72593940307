"""Small file helpers every command shares: JSON written atomically, a folder copied through etils.

Atomic (write to a temporary name, then rename): a reader, or the rerun after a kill, sees the
old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import os

from etils import epath


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, value, indent: int = 2, sort_keys: bool = True) -> None:
    """JSON, non-ASCII kept, unknown types as str; atomic."""
    text = json.dumps(value, indent=indent, sort_keys=sort_keys, ensure_ascii=False, default=str)
    write_text_atomically(path, text + "\n")


def copy_tree(src: epath.Path, dst: epath.Path) -> None:
    """The files directly under src into dst (local or remote, e.g. gs://)."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file():
            (dst / item.name).write_bytes(item.read_bytes())
