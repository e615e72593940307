"""Readers: conversation JSON files -> compact `Example`s.

Formats (recipe.md §2):
- "llava": a JSON list (or JSONL) of `{"id", "image", "conversations": [{"from", "value"}...]}`;
  the Vision-Flan release adds `task_name`; `<image>` may stand before or after the text.
- "vflan_raw": Vision-Flan's raw instance schema (`instance_id, img_path, instruction,
  output, task_name, ...`). `instruction` already contains `input_text` and the
  "\\nOptions: (a) ..." block (§2.2), so the human turn is `"<image>\\n" + instruction`
  and the answer is `output`. Also accepts the website's `{"data": [[...], ...]}` nesting.
- "auto": decided from the first record's keys.

Files are streamed (JSONL line by line; a JSON list element by element with
`json.JSONDecoder.raw_decode` over buffered chunks) and each record becomes an `Example`
at once, so the 983 MB release never exists twice in memory.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
from typing import Iterator, Literal

from vflan_jax.data import skips
from vflan_jax.data.skips import BadRecord, SkipCounter

IMAGE_TOKEN = "<image>"
HUMAN, GPT = "human", "gpt"
FORMATS = ("auto", "llava", "vflan_raw")


@dataclasses.dataclass(frozen=True)
class Example:
    id: str
    task_name: str
    image: str | None           # relative to the image folder, exactly as in the record
    turns: tuple[tuple[str, str], ...]   # (role "human" | "gpt", text), alternating, human first
    source: str                 # file the record came from
    index: int                  # position of the record in that file


def read_examples(path: str | os.PathLike, format: str = "auto", default_task: str | None = None,
                  on_bad: SkipCounter | Literal["raise"] = "raise") -> list[Example]:
    """All usable examples of one file; bad records are counted in `on_bad` or raised."""
    return list(iter_examples(path, format, default_task, on_bad))


def iter_examples(path: str | os.PathLike, format: str = "auto", default_task: str | None = None,
                  on_bad: SkipCounter | Literal["raise"] = "raise") -> Iterator[Example]:
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
    source = sys.intern(os.fspath(path))
    records = iter_json_records(source)
    if format == "auto":
        first = next(records, None)
        if first is None:
            return
        format = detect_format(first, source)
        records = itertools.chain([first], records)
    convert = _from_llava if format == "llava" else _from_vflan_raw
    for index, record in enumerate(records):
        try:
            if isinstance(record, _BrokenLine):
                raise BadRecord(skips.MALFORMED, f"unparsable JSON line: {record.error}")
            if not isinstance(record, dict):
                raise BadRecord(skips.MALFORMED, f"record is a {type(record).__name__}, not an object")
            yield convert(record, index, source, default_task)
        except BadRecord as e:
            rid = record.get("id", record.get("instance_id")) if isinstance(record, dict) else None
            skips.skip_or_raise(e.with_context(record_id=str(rid) if rid is not None else f"#{index}",
                                               source=source), on_bad)


def detect_format(record, source: str = "?") -> str:
    if isinstance(record, dict):
        if "conversations" in record:
            return "llava"
        if "instruction" in record and ("instance_id" in record or "img_path" in record):
            return "vflan_raw"
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(f"{source}: cannot detect the data format from the first record (keys {keys}); "
                     f"pass format='llava' or 'vflan_raw'")


# ----------------------------------------------------------------------------- record -> Example

def _task(record, default_task, source, rid) -> str:
    task = record.get("task_name") or default_task
    if not isinstance(task, str) or not task:
        raise ValueError(f"{source}: record {rid!r} has no task_name; pass default_task=... "
                         f"for files without task names (e.g. LLaVA-Instruct)")
    return sys.intern(task)


def _from_llava(record: dict, index: int, source: str, default_task: str | None) -> Example:
    rid = str(record["id"]) if record.get("id") is not None else f"#{index}"
    task = _task(record, default_task, source, rid)
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise BadRecord(skips.MALFORMED, "missing or empty 'conversations'", task_name=task)
    turns = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise BadRecord(skips.MALFORMED, f"turn {i} has no string 'value'", task_name=task)
        if turn.get("from") not in (HUMAN, GPT):
            raise BadRecord(skips.MALFORMED, f"turn {i} has role {turn.get('from')!r}", task_name=task)
        turns.append((turn["from"], turn["value"]))
    if turns[0][0] != HUMAN:   # LLaVA's preprocess_v1 drops a leading non-human turn
        turns = turns[1:]
    return Example(rid, task, _image_field(record.get("image"), task), _checked_turns(turns, record.get("image"), task),
                   source, index)


def _from_vflan_raw(record: dict, index: int, source: str, default_task: str | None) -> Example:
    rid = str(record["instance_id"]) if record.get("instance_id") is not None else f"#{index}"
    task = _task(record, default_task, source, rid)
    instruction, output = record.get("instruction"), record.get("output")
    if not isinstance(instruction, str) or not isinstance(output, str):
        raise BadRecord(skips.MALFORMED, "'instruction' and 'output' must be strings", task_name=task)
    image = _image_field(record.get("img_path"), task)
    human = instruction if IMAGE_TOKEN in instruction or image is None else IMAGE_TOKEN + "\n" + instruction
    return Example(rid, task, image, _checked_turns([(HUMAN, human), (GPT, output)], image, task), source, index)


def _image_field(image, task) -> str | None:
    if image is None:
        return None
    if not isinstance(image, str) or not image:
        raise BadRecord(skips.MALFORMED, f"image must be one non-empty path, got {image!r}", task_name=task)
    return image


def _checked_turns(turns, image, task) -> tuple[tuple[str, str], ...]:
    def bad(msg):
        return BadRecord(skips.MALFORMED, msg, task_name=task)
    if len(turns) < 2 or len(turns) % 2:
        raise bad(f"{len(turns)} turns after dropping leading non-human turns; need human/gpt pairs")
    for i, (role, _) in enumerate(turns):
        if role != (HUMAN, GPT)[i % 2]:
            raise bad(f"turn {i} is {role!r}: turns must alternate human, gpt")
    for i, (role, text) in enumerate(turns):
        if role == GPT and not text.strip():
            raise BadRecord(skips.EMPTY_ANSWER, f"answer of turn {i} is empty", task_name=task)
        if role == GPT and IMAGE_TOKEN in text:
            raise bad(f"answer of turn {i} contains {IMAGE_TOKEN}")
    with_image = sum(IMAGE_TOKEN in text for _, text in turns)
    if image is None and with_image:
        raise bad(f"{IMAGE_TOKEN} in the text but the record has no image")
    if image is not None and with_image != 1:
        raise bad(f"record has one image but {with_image} turns contain {IMAGE_TOKEN} (need exactly 1)")
    return tuple((sys.intern(role), text) for role, text in turns)


# ----------------------------------------------------------------------------- image paths

def resolve_image_path(image_folder: str | os.PathLike, rel: str) -> str:
    """`image_folder/rel`, refusing absolute paths and anything that escapes the folder (incl. symlinks)."""
    if not isinstance(rel, str) or not rel:
        raise BadRecord(skips.PATH_ESCAPE, f"image path {rel!r} is not a relative file name")
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or os.path.splitdrive(rel)[0]:
        raise BadRecord(skips.PATH_ESCAPE, f"image path {rel!r} is absolute")
    folder = os.path.realpath(image_folder)
    full = os.path.realpath(os.path.join(folder, rel))
    if os.path.commonpath([folder, full]) != folder or full == folder:
        raise BadRecord(skips.PATH_ESCAPE, f"image path {rel!r} resolves outside {folder}")
    return full


# ----------------------------------------------------------------------------- streaming JSON

_CHUNK = 1 << 20


def iter_json_records(path: str) -> Iterator:
    """Records of a JSON list, a JSONL file, or a `{"data": [[...], ...]}` object, one at a time."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        f.seek(0)
        if head == "[":
            yield from _iter_json_array(f, path)
        elif head == "{":
            yield from _iter_json_lines(f, path)
        elif head:
            raise ValueError(f"{path}: not a JSON list, JSONL file or JSON object (starts with {head!r})")


def _iter_json_array(f, path) -> Iterator:
    decoder = json.JSONDecoder()
    buf, pos, eof = "", 0, False

    def fill():
        nonlocal buf, pos, eof
        chunk = f.read(_CHUNK)
        eof = not chunk
        buf, pos = buf[pos:] + chunk, 0

    def skip_space():
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos].isspace():
                pos += 1
            if pos < len(buf) or eof:
                return
            fill()

    fill()
    skip_space()
    pos += 1  # the opening "["
    skip_space()
    if pos < len(buf) and buf[pos] == "]":
        return
    while True:
        skip_space()
        try:
            value, end = decoder.raw_decode(buf, pos)
            complete = end < len(buf) or eof   # a value touching the buffer end may be cut
        except json.JSONDecodeError as e:
            if eof:
                raise ValueError(f"{path}: invalid JSON near character {e.pos} of the current buffer: {e.msg}") from e
            complete = False
        if not complete:
            fill()
            continue
        pos = end
        yield value
        skip_space()
        if pos >= len(buf):
            raise ValueError(f"{path}: JSON list is not closed")
        if buf[pos] == "]":
            return
        if buf[pos] != ",":
            raise ValueError(f"{path}: expected ',' or ']' between list elements, found {buf[pos]!r}")
        pos += 1


def _iter_json_lines(f, path) -> Iterator:
    first = f.readline()
    try:
        value = json.loads(first)
    except json.JSONDecodeError:   # one pretty-printed object, e.g. the website's data.json
        f.seek(0)
        try:
            whole = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: neither JSONL (line 1 is not valid JSON) nor one JSON object: {e}") from e
        yield from _unnest(whole)
        return
    yield from _unnest(value)
    for lineno, line in enumerate(f, start=2):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            # A broken line is one bad record: yield a marker that iter_examples rejects with context.
            yield _BrokenLine(lineno, e.msg)


class _BrokenLine(dict):
    """Stands in for an unparsable JSONL line so it is counted like any malformed record."""

    def __init__(self, lineno: int, error: str):
        super().__init__(id=f"line {lineno}")
        self.error = error


def _unnest(value) -> Iterator:
    if isinstance(value, dict) and set(value) == {"data"} and isinstance(value["data"], list):
        for group in value["data"]:   # website format: {"data": [[instances], [instances], ...]}
            yield from (group if isinstance(group, list) else [group])
    else:
        yield value
