"""Prepare annotation files and their images once into ArrayRecord shards (prepared_source.py).

    python -m vflan_jax.data.prepare --data vision_flan.json --image_folder images --out /data/vision-flan-prepared
    python -m vflan_jax.train --config configs/vflan_stage1.py:data_dir=/data/vision-flan-prepared ...

Records are validated exactly as the JSON reader does; usable ones are split, in file order,
into --shards contiguous shards written by --workers processes. Each record carries the parsed
turns, task name, record id, source file and position, and with `--images embed` the image
file's bytes as they are (no re-encoding: pixels stay bit-identical); `--images reference`
keeps the path, checked to exist and to stay inside --image_folder. Bad records (malformed,
missing or unreadable image, path outside the folder) are counted in the manifest, never
written.

Resumable: a shard is written under a temporary name, renamed, then marked done; a rerun with
the same inputs writes only the shards not yet done and gives the same files. index.array_record is
written last. --out may be a local folder or a gs:// path (files are written locally, then
copied with etils epath, which needs gcsfs for gs://; or prepare locally and copy the folder
with `gcloud storage cp -r`). Training hosts read gs:// through array_record alone.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import os
import sys
import tempfile

import numpy as np
from etils import epath
from PIL import Image

from vflan_jax.cli import EXIT_BAD_INPUT, EXIT_OK, is_url, resolve_path, route_logging
from vflan_jax.data import json_source, skips
from vflan_jax.data.prepared_source import FORMAT_VERSION, INDEX, MANIFEST, encode_record, shard_name
from vflan_jax.data.record_index import IndexBuilder, RecordIndex
from vflan_jax.data.skips import BadRecord, SkipCounter
from vflan_jax.data.sources import FORMATS, resolve_image_path

IMAGE_MODES = ("embed", "reference")
RECORDS_PER_SHARD = 10_000    # default shard size: small enough for a fine-grained progress bar and resume
_WRITER_OPTIONS = "group_size:1"   # Grain reads one record at a time (random access)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checked_image(ex, image_folder: str, embed: bool):
    """The example, with its image file's bytes when embedding, after checking that the image
    exists and stays inside the folder (and, embedded, that its header parses); raises BadRecord.
    A referenced image's pixels are checked when training decodes it, as for JSON input: opening
    1.66M headers here would double the time of a prepare."""
    if ex.image is None:
        return ex
    path = resolve_image_path(image_folder, ex.image)
    if not embed:
        if not os.path.isfile(path):
            raise BadRecord(skips.MISSING_IMAGE, f"image {ex.image}: file not found")
        return ex
    try:
        with open(path, "rb") as f:
            data = f.read()
        Image.open(io.BytesIO(data))   # parses the header only (pixels are decoded lazily)
    except (FileNotFoundError, IsADirectoryError):
        raise BadRecord(skips.MISSING_IMAGE, f"image {ex.image}: file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadRecord(skips.UNREADABLE_IMAGE, f"image {ex.image}: {type(e).__name__}: {e}") from None
    return dataclasses.replace(ex, image_bytes=data)


def _done_path(out: epath.Path, shard: int, shards: int) -> epath.Path:
    return out / (shard_name(shard, shards) + ".done.json")


def _index_path(out: epath.Path, shard: int, shards: int) -> epath.Path:
    return out / (shard_name(shard, shards) + ".index.npz")


def _write_array_record(out: str, name: str, records) -> int:
    """Writes records to OUT/name under a temporary name, then renames (or copies, for gs://)."""
    from array_record.python.array_record_module import ArrayRecordWriter
    final = epath.Path(out) / name
    local = not is_url(out)
    tmp_dir = None if local else tempfile.mkdtemp(prefix="vflan_prepare_")
    tmp = str(final) + ".tmp" if local else os.path.join(tmp_dir, name)
    writer = ArrayRecordWriter(tmp, _WRITER_OPTIONS)
    n = 0
    for record in records:
        writer.write(record)
        n += 1
    writer.close()
    if local:
        os.replace(tmp, final)
    else:
        epath.Path(tmp).copy(final, overwrite=True)
        os.remove(tmp)
        os.rmdir(tmp_dir)
    return n


def _usable(records, image_folder: str, embed: bool, skipped: SkipCounter, builder: IndexBuilder):
    """Encoded records whose image checks pass; the others are counted in `skipped`."""
    for i in range(len(records)):
        ex = records[i]
        try:
            ex = checked_image(ex, image_folder, embed)
        except BadRecord as e:
            skipped.add(e.with_context(record_id=ex.id, source=ex.source, task_name=ex.task_name))
            continue
        builder.add_example(ex)
        yield encode_record(ex)


def write_shard(job: dict) -> tuple[int, dict]:
    """One shard (runs in a worker process): -> (shard, its done-state: records written, skips)."""
    out, shard, shards = epath.Path(job["out"]), job["shard"], job["shards"]
    skipped, builder = SkipCounter(), IndexBuilder()
    n = _write_array_record(job["out"], shard_name(shard, shards),
                            _usable(job["records"], job["image_folder"], job["images"] == "embed", skipped, builder))
    _index_path(out, shard, shards).write_bytes(builder.build().to_bytes())
    # Written last: a shard is done only when its data and index are both in place.
    state = {"plan": job["plan"], "records": n, "skipped": skipped.as_dict(), "examples": skipped.first_message}
    _done_path(out, shard, shards).write_text(json.dumps(state))
    return shard, state


def _is_done(out: epath.Path, shard: int, shards: int, plan: str) -> dict | None:
    done = _done_path(out, shard, shards)
    if not done.exists():
        return None
    state = json.loads(done.read_text())
    return state if state.get("plan") == plan else None


def prepare(data: list[str], image_folder: str, out: str, *, format: str = "auto", default_task: str | None = None,
            shards: int | None = None, workers: int = 1, images: str = "embed", progress: bool = True) -> dict:
    """Writes the prepared folder (module doc) and returns its manifest."""
    from tqdm import tqdm
    read_skips = SkipCounter()
    total_bytes = sum(os.path.getsize(p) for p in data)
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="reading", disable=not progress,
              file=sys.stderr) as bar:
        _, records = json_source.scan_json_files(data, format, default_task, read_skips, progress=bar.update)
    hashes = [{"path": p, "sha256": _sha256(p), "bytes": os.path.getsize(p)} for p in data]
    n = len(records)
    shards = shards or max(1, -(-n // RECORDS_PER_SHARD))
    bounds = np.linspace(0, n, shards + 1).round().astype(int)
    plan = hashlib.sha256(json.dumps({"version": FORMAT_VERSION, "sources": hashes, "format": format,
                                      "default_task": default_task, "images": images, "shards": shards,
                                      "image_folder": image_folder}, sort_keys=True).encode()).hexdigest()
    root = epath.Path(out)
    root.mkdir(parents=True, exist_ok=True)
    state = {s: _is_done(root, s, shards, plan) for s in range(shards)}
    jobs = [{"out": out, "shard": s, "shards": shards, "plan": plan, "images": images, "image_folder": image_folder,
             "records": records.slice(bounds[s], bounds[s + 1])} for s in range(shards) if state[s] is None]
    resumed = shards - len(jobs)
    if resumed:
        logging.info("resuming: %d of %d shards already written", resumed, shards)
    with tqdm(total=n, initial=int(sum(bounds[s + 1] - bounds[s] for s in range(shards) if state[s])),
              unit="rec", desc="writing", disable=not progress, file=sys.stderr) as bar:
        if workers <= 1:
            for s, done in map(write_shard, jobs):
                state[s] = done
                bar.update(bounds[s + 1] - bounds[s])
        else:
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                futures = [pool.submit(write_shard, job) for job in jobs]
                for fut in concurrent.futures.as_completed(futures):
                    s, done = fut.result()
                    state[s] = done
                    bar.update(bounds[s + 1] - bounds[s])

    index = RecordIndex.concat([RecordIndex.from_bytes(_index_path(root, s, shards).read_bytes())
                                for s in range(shards)])
    skipped = SkipCounter().merge(read_skips)
    for s in range(shards):
        shard_skips = SkipCounter.from_dict(state[s]["skipped"])
        shard_skips.first_message.update(state[s].get("examples", {}))
        skipped.merge(shard_skips)
    counts = collections.Counter(np.asarray(index.task_names)[index.task_ids].tolist()) if len(index) else {}
    manifest = {
        "format_version": FORMAT_VERSION, "records": len(index), "images": images, "image_folder": image_folder,
        "tasks": len(index.task_names), "counts_per_task": dict(sorted(counts.items())),
        "skipped": skipped.as_dict(), "skipped_examples": skipped.first_message,
        "shards": [{"file": shard_name(s, shards), "records": state[s]["records"]} for s in range(shards)],
        "sources": hashes, "plan": plan,
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _write_array_record(out, INDEX, [json.dumps(manifest).encode(), index.to_bytes()])   # last: marks it complete
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vflan_jax.data.prepare", description=__doc__.split("\n")[0])
    p.add_argument("--data", action="append", required=True, help="annotation file, JSON list or JSONL (repeatable)")
    p.add_argument("--image_folder", required=True, help="folder the records' image paths are relative to")
    p.add_argument("--out", required=True, help="output folder or gs:// path")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--default_task", help="task name for files without task_name")
    p.add_argument("--shards", type=int, help=f"number of shards (default: one per {RECORDS_PER_SHARD} records)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="writer processes")
    p.add_argument("--images", default="embed", choices=IMAGE_MODES,
                   help="embed: the image bytes go into the records (buckets); reference: the checked path")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    args.data = [resolve_path(d) for d in args.data]
    args.image_folder, args.out = resolve_path(args.image_folder), resolve_path(args.out)
    route_logging()
    problem = next((f"--data {d}: file not found" for d in args.data if not os.path.isfile(d)), None)
    if problem is None and not os.path.isdir(args.image_folder):
        problem = f"--image_folder {args.image_folder}: no such directory"
    if problem is None and args.shards is not None and args.shards < 1:
        problem = f"--shards {args.shards}: must be >= 1"
    if problem is None and not is_url(args.out) and os.path.isfile(args.out):
        problem = f"--out {args.out}: is a file, not a folder"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        manifest = prepare(args.data, args.image_folder, args.out, format=args.format, default_task=args.default_task,
                           shards=args.shards, workers=args.workers, images=args.images,
                           progress=not args.no_progress)
    except (ValueError, BadRecord) as e:   # a file that cannot be read at all, or a strict-mode record
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"prepared {manifest['records']} records of {manifest['tasks']} tasks into "
          f"{len(manifest['shards'])} shards at {args.out} (images: {args.images})")
    print(SkipCounter.from_dict(manifest["skipped"]).report())
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
