"""What the model sees: one JSON line per record (ids with -200, labels), optional pixels.

  python -m vflan_jax.data.inspect --data vision_flan.json --image_folder images \\
      --tokenizer tok_dir --template vicuna_v1 --max_length 2048 --out seen.jsonl \\
      [--pixels_out pix/] [--limit 100] [--image_aspect pad|square] [--image_size 336]

Each line: {"line", "id", "task_name", "source", "status": "ok" | skip reason, "message",
"input_ids" (before image expansion, -200 per image), "labels" (same length, -100 = no loss)}.
--pixels_out DIR writes DIR/<line>.npy (float32 [3,H,W]; <line> is the 1-based line number in
--out) for every ok record.  The terminal shows a few records with supervised spans in [[...]]
and the per-task / per-reason counts.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import numpy as np

from vflan_jax.cli import EXIT_BAD_INPUT, is_url, resolve_path, route_logging
from vflan_jax.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER
from vflan_jax.data import image, sources, tokenize
from vflan_jax.data.skips import BadRecord, SkipCounter

TOKENS_PER_IMAGE = 576


class _RecordingCounter(SkipCounter):
    """Counts like SkipCounter and keeps the errors, so read-time failures get their own line."""

    def __init__(self):
        super().__init__()
        self.errors: list[BadRecord] = []

    def add(self, error, task_name=None, count=1):
        super().add(error, task_name, count)
        if isinstance(error, BadRecord):
            self.errors.append(error)


def marked_text(ids, labels, tokenizer) -> str:
    """Decoded text with supervised runs in [[...]] and each image as <image>."""
    out, run, run_sup = [], [], None

    def flush():
        if run:
            text = tokenizer.decode(run, skip_special_tokens=False)
            out.append(f"[[{text}]]" if run_sup else text)

    for t, label in zip(ids, labels, strict=True):
        if t == IMAGE_PLACEHOLDER:
            flush()
            run, run_sup = [], None
            out.append("<image>")
            continue
        sup = label != IGNORE_INDEX
        if run and sup != run_sup:
            flush()
            run = []
        run.append(int(t))
        run_sup = sup
    flush()
    return "".join(out)


def inspect_records(args, tokenizer, out_file, show: int) -> tuple[collections.Counter, SkipCounter]:
    counter = _RecordingCounter()
    per_task: collections.Counter = collections.Counter()
    line = 0
    shown = 0

    def write(obj):
        nonlocal line
        line += 1
        out_file.write(json.dumps({"line": line, **obj}) + "\n")
        return line

    for path in args.data:
        for ex in _with_errors(sources.iter_examples(path, "auto", args.default_task, on_bad=counter), counter, write):
            if args.limit is not None and line >= args.limit:
                return per_task, counter
            base = {"id": ex.id, "task_name": ex.task_name, "source": ex.source}
            try:
                ids, labels = tokenize.tokenize_example(ex, tokenizer, args.template)
                ids, labels = tokenize.truncate(ids, labels, args.max_length, args.tokens_per_image, ex)
                pixels = None
                if ex.image is not None:
                    img_path = sources.resolve_image_path(args.image_folder, ex.image)
                    pixels = image.load_pixels(img_path, image_size=args.image_size, aspect=args.image_aspect)
            except BadRecord as e:
                e = e.with_context(record_id=ex.id, source=ex.source, task_name=ex.task_name)
                counter.add(e)
                counter.errors.pop()        # written here, not by _with_errors
                write({**base, "status": e.reason, "message": str(e), "input_ids": None, "labels": None})
                per_task[(ex.task_name, e.reason)] += 1
                continue
            n = write({**base, "status": "ok", "message": "", "input_ids": list(map(int, ids)),
                       "labels": list(map(int, labels))})
            per_task[(ex.task_name, "ok")] += 1
            if args.pixels_out and pixels is not None:
                np.save(os.path.join(args.pixels_out, f"{n}.npy"), pixels)
            if shown < show:
                shown += 1
                print(f"--- line {n}: {ex.id} ({ex.task_name}), {len(ids)} ids, "
                      f"{sum(label != IGNORE_INDEX for label in labels)} supervised")
                print(marked_text(ids, labels, tokenizer))
    return per_task, counter


def _with_errors(examples, counter, write):
    """Yields examples; writes a line for every record that failed while being read."""
    for ex in examples:
        _flush_errors(counter, write)
        yield ex
    _flush_errors(counter, write)


def _flush_errors(counter, write):
    while counter.errors:
        e = counter.errors.pop(0)
        write({"id": e.record_id, "task_name": e.task_name, "source": e.source, "status": e.reason,
               "message": str(e), "input_ids": None, "labels": None})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vflan_jax.data.inspect", description=__doc__.split("\n")[0])
    p.add_argument("--data", action="append", required=True, help="data file (repeatable)")
    p.add_argument("--image_folder", required=True)
    p.add_argument("--tokenizer", required=True, help="HF tokenizer directory")
    p.add_argument("--template", default="vicuna_v1", choices=["vicuna_v1", "plain"])
    p.add_argument("--max_length", type=int, default=2048)
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--pixels_out", help="directory for <line>.npy pixel arrays")
    p.add_argument("--limit", type=int, help="stop after this many lines")
    p.add_argument("--image_aspect", default="pad", choices=list(image.ASPECTS))
    p.add_argument("--image_size", type=int, default=336)
    p.add_argument("--tokens_per_image", type=int, default=TOKENS_PER_IMAGE)
    p.add_argument("--default_task", help="task name for files without task_name")
    p.add_argument("--show", type=int, default=3, help="records printed to the terminal")
    args = p.parse_args(argv)
    args.data = [resolve_path(d) for d in args.data]
    args.image_folder, args.tokenizer, args.out, args.pixels_out = (
        resolve_path(x) for x in (args.image_folder, args.tokenizer, args.out, args.pixels_out))
    route_logging()
    problem = next((f"--data {d}: file not found" for d in args.data if not is_url(d) and not os.path.isfile(d)), None)
    if problem is None and not is_url(args.image_folder) and not os.path.isdir(args.image_folder):
        problem = f"--image_folder {args.image_folder}: no such directory"
    if problem is None and not os.path.isdir(args.tokenizer):
        problem = f"--tokenizer {args.tokenizer}: no such directory (an HF tokenizer directory is expected)"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if args.pixels_out:
        os.makedirs(args.pixels_out, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        per_task, counter = inspect_records(args, tokenizer, f, args.show)

    statuses = sorted({s for _, s in per_task} | set(counter.by_reason))
    tasks = sorted({t for t, _ in per_task} | {t for t, _ in counter.by_task})
    width = max([len(t) for t in tasks] + [4])
    print(f"\n{'task':<{width}} " + " ".join(f"{s:>{max(len(s), 5)}}" for s in statuses))
    for t in tasks:
        row = [per_task.get((t, s), 0) if s == "ok" else counter.by_task.get((t, s), 0) for s in statuses]
        print(f"{t:<{width}} " + " ".join(f"{n:>{max(len(s), 5)}}" for s, n in zip(statuses, row, strict=True)))
    ok = sum(n for (_, s), n in per_task.items() if s == "ok")
    print(f"\nok: {ok}")
    print(counter.report())
    print(f"wrote {args.out}" + (f" and {args.pixels_out}/<line>.npy" if args.pixels_out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
