"""Readers: conversation JSON files -> compact `Example`s.

Formats (docs/REFERENCE.md §2):
- "llava": a JSON list (or JSONL) of `{"id", "image", "conversations": [{"from", "value"}...]}`;
  the Vision-Flan release adds `task_name`; `<image>` may stand before or after the text.
- "vflan_raw": Vision-Flan's raw instance schema (`instance_id, img_path, instruction,
  output, task_name, ...`). `instruction` already contains `input_text` and the
  "\\nOptions: (a) ..." block (§2.2), so the human turn is `"<image>\\n" + instruction`
  and the answer is `output`. Also accepts the website's `{"data": [[...], ...]}` nesting.
- "auto": decided from the first record's keys.

Files are streamed (JSONL line by line; a JSON list element by element with
`json.JSONDecoder.raw_decode` over buffered chunks), and each usable record also yields its
byte span in the file, so the pipeline keeps only numpy arrays (json_source.py) and a worker
re-reads a record when it needs it. A non-UTF-8 byte in a JSONL line makes that line a counted
bad record; in a JSON list it fails naming the file and the byte offset.
"""
from __future__ import annotations

import codecs
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import re
import sys
from typing import Iterator, Literal

from vflan_jax.constants import IMAGE_TOKEN
from vflan_jax.data import skips
from vflan_jax.data.skips import BadRecord, SkipCounter

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
    image_bytes: bytes | None = dataclasses.field(default=None, repr=False, compare=False)
    # ^ the image file's encoded bytes when they travel with the record (prepared shards, --images embed)


Fields = tuple   # (id, task_name, image, turns) of one record: an Example without its location


def read_examples(path: str | os.PathLike, format: str = "auto", default_task: str | None = None,
                  on_bad: SkipCounter | Literal["raise"] = "raise") -> list[Example]:
    """All usable examples of one file; bad records are counted in `on_bad` or raised."""
    return list(iter_examples(path, format, default_task, on_bad))


def iter_examples(path: str | os.PathLike, format: str = "auto", default_task: str | None = None,
                  on_bad: SkipCounter | Literal["raise"] = "raise") -> Iterator[Example]:
    source = sys.intern(os.fspath(path))
    _, rows = iter_record_fields(source, format, default_task, on_bad)
    return (Example(*fields, source, index) for index, fields, _, _ in rows)


def iter_record_fields(path: str | os.PathLike, format: str = "auto", default_task: str | None = None,
                       on_bad: SkipCounter | Literal["raise"] = "raise") -> tuple[str, Iterator[tuple]]:
    """(format decided, iterator of (index in file, Fields, byte offset, byte length)) for every
    usable record of one file; the byte span re-reads the record later (`record_at`).

    No Example is built: at start-up this runs 1.66M times and only the index is kept. The
    format is decided from the first record when "auto", so this reads one record at once."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
    source = sys.intern(os.fspath(path))
    spans = iter_json_spans(source)
    if format == "auto":
        first = next(spans, None)
        if first is None:
            return "llava", iter(())
        format = detect_format(first[0], source)
        spans = itertools.chain([first], spans)
    return format, _convert_all(spans, format, source, default_task, on_bad)


def _convert_all(spans, format, source, default_task, on_bad) -> Iterator[tuple]:
    convert = _from_llava if format == "llava" else _from_vflan_raw
    for index, (record, offset, length) in enumerate(spans):
        try:
            if type(record) is not dict:   # (a _BrokenLine is a dict subclass)
                raise _not_an_object(record)
            yield index, convert(record, index, source, default_task), offset, length
        except BadRecord as e:
            rid = record.get("id", record.get("instance_id")) if isinstance(record, dict) else None
            skips.skip_or_raise(e.with_context(record_id=str(rid) if rid is not None else f"#{index}",
                                               source=source), on_bad)


def _not_an_object(record) -> BadRecord:
    if isinstance(record, _BrokenLine):
        return BadRecord(skips.MALFORMED, f"unparsable JSON line: {record.error}")
    return BadRecord(skips.MALFORMED, f"record is a {type(record).__name__}, not an object")


def convert_record(record, format: str, index: int, source: str, default_task: str | None) -> Example:
    """One parsed JSON record of a known format -> Example; raises BadRecord."""
    if type(record) is not dict:
        raise _not_an_object(record)
    fields = (_from_llava if format == "llava" else _from_vflan_raw)(record, index, source, default_task)
    return Example(*fields, source, index)


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


def _from_llava(record: dict, index: int, source: str, default_task: str | None) -> Fields:
    # Runs for every record at every start (1.66M times): exact type checks, one pass per list.
    rid = record.get("id")
    rid = f"#{index}" if rid is None else str(rid)
    task = _task(record, default_task, source, rid)
    conv = record.get("conversations")
    if type(conv) is not list or not conv:
        raise BadRecord(skips.MALFORMED, "missing or empty 'conversations'", task_name=task)
    turns = []
    for i, turn in enumerate(conv):
        if type(turn) is dict:
            role, value = turn.get("from"), turn.get("value")
            if type(value) is str and (role == HUMAN or role == GPT):
                turns.append((role, value))
                continue
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise BadRecord(skips.MALFORMED, f"turn {i} has no string 'value'", task_name=task)
        raise BadRecord(skips.MALFORMED, f"turn {i} has role {turn.get('from')!r}", task_name=task)
    if turns[0][0] != HUMAN:   # LLaVA's preprocess_v1 drops a leading non-human turn
        turns = turns[1:]
    image = record.get("image")
    return rid, task, _image_field(image, task), _checked_turns(turns, image, task)


def _from_vflan_raw(record: dict, index: int, source: str, default_task: str | None) -> Fields:
    rid = str(record["instance_id"]) if record.get("instance_id") is not None else f"#{index}"
    task = _task(record, default_task, source, rid)
    instruction, output = record.get("instruction"), record.get("output")
    if not isinstance(instruction, str) or not isinstance(output, str):
        raise BadRecord(skips.MALFORMED, "'instruction' and 'output' must be strings", task_name=task)
    image = _image_field(record.get("img_path"), task)
    human = instruction if IMAGE_TOKEN in instruction or image is None else IMAGE_TOKEN + "\n" + instruction
    return rid, task, image, _checked_turns([(HUMAN, human), (GPT, output)], image, task)


def _image_field(image, task) -> str | None:
    if image is None:
        return None
    if not isinstance(image, str) or not image:
        raise BadRecord(skips.MALFORMED, f"image must be one non-empty path, got {image!r}", task_name=task)
    return image


def _checked_turns(turns, image, task) -> tuple[tuple[str, str], ...]:
    def bad(msg):
        return BadRecord(skips.MALFORMED, msg, task_name=task)
    n = len(turns)
    if n < 2 or n % 2:
        raise bad(f"{n} turns after dropping leading non-human turns; need human/gpt pairs")
    with_image = 0
    for k in range(0, n, 2):
        (human, question), (gpt, _) = turns[k], turns[k + 1]
        if human != HUMAN or gpt != GPT:
            i = k if human != HUMAN else k + 1
            raise bad(f"turn {i} is {turns[i][0]!r}: turns must alternate human, gpt")
        if IMAGE_TOKEN in question:
            with_image += 1
    for k in range(1, n, 2):
        answer = turns[k][1]
        if not answer.strip():
            raise BadRecord(skips.EMPTY_ANSWER, f"answer of turn {k} is empty", task_name=task)
        if IMAGE_TOKEN in answer:
            raise bad(f"answer of turn {k} contains {IMAGE_TOKEN}")
    if image is None and with_image:
        raise bad(f"{IMAGE_TOKEN} in the text but the record has no image")
    if image is not None and with_image != 1:
        raise bad(f"record has one image but {with_image} turns contain {IMAGE_TOKEN} (need exactly 1)")
    return tuple(turns)


# ----------------------------------------------------------------------------- content identity

def content_digest(task_name: str, id: str, image: str | None, turns) -> int:
    """64-bit hash of what a record IS (task, id, image, turns): the mixture ranks by it, so a
    selection does not depend on file order, on splitting files, or on JSON vs prepared shards."""
    parts = [task_name, id, image or ""]
    for turn in turns:
        parts += turn
    key = "\x1f".join(parts).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little")   # sha256: hardware-accelerated


# ----------------------------------------------------------------------------- image paths

@functools.lru_cache(maxsize=64)
def _real_folder(folder: str) -> str:
    return os.path.realpath(folder)   # once per folder, not once per record


def resolve_image_path(image_folder: str | os.PathLike, rel: str) -> str:
    """`image_folder/rel`, refusing absolute paths and anything that escapes the folder (incl. symlinks)."""
    if not isinstance(rel, str) or not rel:
        raise BadRecord(skips.PATH_ESCAPE, f"image path {rel!r} is not a relative file name")
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or os.path.splitdrive(rel)[0]:
        raise BadRecord(skips.PATH_ESCAPE, f"image path {rel!r} is absolute")
    folder = _real_folder(os.fspath(image_folder))
    full = os.path.realpath(os.path.join(folder, rel))
    if os.path.commonpath([folder, full]) != folder or full == folder:
        raise BadRecord(skips.PATH_ESCAPE, f"image path {rel!r} resolves outside {folder}")
    return full


# ----------------------------------------------------------------------------- streaming JSON

_CHUNK = 1 << 20
WHOLE_FILE = -1   # offset of a record that has no byte range of its own (one nested JSON object)


def iter_json_spans(path: str) -> Iterator[tuple[object, int, int]]:
    """(record, byte offset, byte length) per record: the span re-reads exactly that record later
    (`record_at`); records of one nested JSON object get offset WHOLE_FILE. The file is read as
    bytes so every error can name its byte offset in the file."""
    with open(path, "rb") as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        f.seek(0)
        if head == b"[":
            yield from _iter_json_array(f, path)
        elif head == b"{":
            yield from _iter_json_lines(f, path)
        elif head:
            raise ValueError(f"{path}: not a JSON list, JSONL file or JSON object (starts with {head!r})")


def record_at(path: str, fd: int, offset: int, length: int):
    """The record stored at a span from `iter_json_spans` (read again by a worker)."""
    raw = os.pread(fd, length, offset)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RuntimeError(f"{path}: the record at byte {offset} no longer parses ({e}); "
                           f"the file changed after the pipeline started") from None


def _utf8_error(path, e: UnicodeDecodeError, at: int) -> ValueError:
    return ValueError(f"{path}: not UTF-8 at byte offset {at + e.start} (byte {e.object[e.start:e.start + 1]!r})")


def _nbytes(buf: str, start: int, end: int) -> int:
    # str.isascii() is O(1) in CPython (a flag of the string): ASCII text needs no encoding.
    return end - start if buf.isascii() else len(buf[start:end].encode("utf-8", "surrogatepass"))


_WS = re.compile(r"[ \t\n\r]*")
_SEP = re.compile(r"[ \t\n\r]*([,\]])[ \t\n\r]*")   # between list elements, and the closing "]"


def _iter_json_array(f, path) -> Iterator:
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    buf, pos, pos_b, eof = "", 0, 0, False   # pos_b: byte offset in the file of buf[pos]
    read_b = 0                                # bytes read from the file so far

    def fill():
        nonlocal buf, pos, eof, read_b
        chunk = f.read(_CHUNK)
        eof = not chunk
        pending = len(utf8.getstate()[0])
        try:
            text = utf8.decode(chunk, final=eof)
        except UnicodeDecodeError as e:
            raise _utf8_error(path, e, read_b - pending) from None
        read_b += len(chunk)
        buf, pos = buf[pos:] + text, 0

    fill()
    while True:   # up to and past the opening "[" (the caller saw it is the first non-space byte)
        start = _WS.match(buf, pos).end()
        if start < len(buf) or eof:
            break
        fill()
    pos_b, pos = start + 1, start + 1
    while True:
        end_ws = _WS.match(buf, pos).end()
        if end_ws < len(buf) or eof:
            break
        fill()
    pos_b, pos = pos_b + end_ws - pos, end_ws
    if buf[pos:pos + 1] == "]":
        return
    while True:
        # The hot loop (1.66M times for the release): one C decode and one C regex per record.
        try:
            value, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError as e:
            ws = _WS.match(buf, pos).end()
            if ws > pos:   # whitespace after a "," that the previous buffer cut off
                pos_b, pos = pos_b + ws - pos, ws
                continue
            if eof:
                raise ValueError(f"{path}: invalid JSON at byte offset {pos_b + _nbytes(buf, pos, e.pos)}: "
                                 f"{e.msg}") from None
            fill()
            continue
        sep = _SEP.match(buf, end)
        if sep is None or (sep.end() == len(buf) and not eof):   # the value or what follows may be cut
            if not eof and _WS.match(buf, end).end() == len(buf):
                fill()
                continue
            if sep is None:
                at = pos_b + _nbytes(buf, pos, _WS.match(buf, end).end())
                found = buf[_WS.match(buf, end).end():][:1]
                raise ValueError(f"{path}: expected ',' or ']' between list elements at byte offset {at}, "
                                 f"found {found or 'the end of the file'!r}")
        value_b = _nbytes(buf, pos, end)
        yield value, pos_b, value_b
        nxt = sep.end()
        pos_b += value_b + _nbytes(buf, end, nxt)
        pos = nxt
        if sep.group(1) == "]":
            return


def _iter_json_lines(f, path) -> Iterator:
    first = f.readline()
    try:
        value = json.loads(first)
    except (json.JSONDecodeError, UnicodeDecodeError):   # one pretty-printed object, e.g. the website's data.json
        f.seek(0)
        raw = f.read()
        try:
            whole = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise _utf8_error(path, e, 0) from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: neither JSONL (line 1 is not valid JSON) nor one JSON object: "
                             f"{e.msg} at byte offset {len(raw.decode('utf-8')[:e.pos].encode())}") from None
        yield from ((r, WHOLE_FILE, 0) for r in _unnest(whole))
        return
    if isinstance(value, dict) and set(value) == {"data"}:
        yield from ((r, WHOLE_FILE, 0) for r in _unnest(value))
    else:
        yield value, 0, len(first)
    offset = len(first)
    for lineno, line in enumerate(f, start=2):
        start, offset = offset, offset + len(line)
        if not line.strip():
            continue
        try:
            yield json.loads(line), start, len(line)
        except UnicodeDecodeError as e:
            # A broken line is one bad record: yield a marker that iter_examples rejects with context.
            yield _BrokenLine(lineno, f"not UTF-8 at byte offset {start + e.start}"), start, len(line)
        except json.JSONDecodeError as e:
            yield _BrokenLine(lineno, e.msg), start, len(line)


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
