"""The training input pipeline: a Grain Dataset graph from config to packed host batches.

  mixture (selected record indices of each source's index, mixture.py; a source is annotation
           files read by span, json_source.py, prepared ArrayRecord shards, prepared_source.py,
           or a TFDS classification split, data/tfds_source.py)
  -> MapDataset.source per data source -> shuffle(seed) -> repeat(num_epochs)
     (several sources with weights: each shuffled + repeated forever, then MapDataset.mix)
  -> slice [process_index::process_count]          (each host reads its own share)
  -> map_with_index: tokenize + truncate + decode image (a BadRecord becomes a skip marker)
  -> to_iter_dataset (read threads) -> mp_prefetch (num_workers processes; 0 = in-process)
  -> BestFitPackIterDataset / PadToLongestBatchIterDataset (B rows; counts skip markers
     into the next batch's meta_skips) -> thread prefetch
The iterator's state (Grain's own states + the packer's few open-row indices) saves through
Orbax: `ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it), ...)`.
Skips are counted where they happen, travel through worker processes as ordinary elements
and live in the iterator state until reported, so the counts stay exact across resumes.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import logging
import os
from typing import Any

import grain
import ml_collections
import numpy as np
from ml_collections import config_dict

from vflan_jax.constants import IMAGE_PLACEHOLDER
from vflan_jax.data import conversation, decoding, image, mixture, packing, prepared_source, skips, tokenize
from vflan_jax.data.skips import BadRecord, SkipCounter
from vflan_jax.data.sources import FORMATS, Example, resolve_image_path

PACKINGS = ("best_fit", "first_fit", "pad_to_longest")
SOURCE_FIELDS = ("paths", "image_folder", "format", "default_task", "weight", "max_per_task",
                 "budget_tasks", "budget_per_task", "subset", "prepared", "tfds", "tfds_split", "tfds_data_dir")


class BadRecordError(RuntimeError):
    """strict=True: the first bad record stops the run (message names the file and record id)."""


def default_data_config() -> ml_collections.ConfigDict:
    """Every field of the data pipeline, with its default.

    sources: name -> ConfigDict, one per data source, e.g.
        c.sources.vflan = source_config(paths=["vision_flan.json"], image_folder="images")
      fields (see source_config): paths (a tuple of files), image_folder, format
      ("auto"|"llava"|"vflan_raw"), default_task (task name for files without task_name),
      weight (None everywhere = concatenate; all set = mix by weight, infinite stream),
      max_per_task, budget_tasks, budget_per_task, subset (mixture.py); or, instead of paths,
      prepared (a folder or bucket written by `python -m vflan_jax.data.prepare`; see
      prepared_source_config), or tfds + tfds_split + tfds_data_dir (a TFDS classification
      dataset, image + label as an instruction; see tfds_source_config).
    """
    c = ml_collections.ConfigDict()
    c.sources = ml_collections.ConfigDict()
    c.template = "vicuna_v1"             # "vicuna_v1" (finetune) | "plain" (projector pretraining)
    c.image_aspect = "pad"               # "pad" (LLaVA-1.5 finetune/eval) | "square" (pretraining)
    c.exif_transpose = False             # LLaVA does not apply EXIF orientation
    c.max_pixels = config_dict.placeholder(int)   # decompression-bomb cap; None = PIL's MAX_IMAGE_PIXELS
    c.max_length = 2048                  # tokens per row, images expanded (docs/REFERENCE.md §3.6)
    c.max_images_per_row = config_dict.placeholder(int)   # K slots; None = max_length // (tokens_per_image + 1)
    c.max_examples_per_row = config_dict.placeholder(int)  # None = max(1, max_length // 32)
    c.packing = "best_fit"               # "best_fit" | "first_fit" | "pad_to_longest"
    c.pool_rows = config_dict.placeholder(int)     # open rows kept by the packer; None = max(8, 2*B)
    c.pad_to_multiple = 64               # pad_to_longest: round the batch length up to this
    c.heldout_tasks = ()                 # task names excluded from training (kept for eval)
    c.num_workers = 0                    # decode worker processes (0 = in the training process)
    c.worker_buffer_size = 4             # elements buffered per worker
    c.read_threads = 2                   # threads per process for decode (PIL releases the GIL)
    c.prefetch = 2                       # batches prefetched by a thread (0 = off)
    c.strict = False                     # raise on the first bad record instead of counting it
    c.max_skip_fraction = 0.5            # stop when more of the last skip_window records are skipped
    c.skip_window = 1000                 # (or when a whole pass has no usable record): never loop at step 0
    c.seed = 0
    c.shuffle = True
    c.num_epochs = config_dict.placeholder(int)    # None = repeat forever (steps end the run)
    return c


def source_config(paths=(), image_folder: str = "", *, format: str = "auto", default_task: str | None = None,
                  weight: float | None = None, max_per_task: int | None = None, budget_tasks: int | None = None,
                  budget_per_task: int | None = None, subset: int | None = None, prepared: str | None = None,
                  tfds: str | None = None, tfds_split: str = "train",
                  tfds_data_dir: str | None = None) -> ml_collections.ConfigDict:
    """One entry of `data.sources` (typed, so command-line overrides of None fields work)."""
    c = ml_collections.ConfigDict()
    # A tuple, not a list: ml_collections overrides tuples from the command line, not lists.
    c.paths = tuple(os.fspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths))
    c.image_folder = os.fspath(image_folder)
    c.prepared = config_dict.placeholder(str) if prepared is None else os.fspath(prepared)
    c.tfds = config_dict.placeholder(str) if tfds is None else tfds
    c.tfds_split = tfds_split
    c.tfds_data_dir = config_dict.placeholder(str) if tfds_data_dir is None else os.fspath(tfds_data_dir)
    c.format = format
    c.default_task = config_dict.placeholder(str) if default_task is None else default_task
    c.weight = config_dict.placeholder(float) if weight is None else float(weight)
    for name, value in (("max_per_task", max_per_task), ("budget_tasks", budget_tasks),
                        ("budget_per_task", budget_per_task), ("subset", subset)):
        c[name] = config_dict.placeholder(int) if value is None else int(value)
    return c


def prepared_source_config(folder: str, image_folder: str = "", **kw) -> ml_collections.ConfigDict:
    """A source read from prepared shards; image_folder overrides the one recorded at prepare time
    (used only by data prepared with --images reference)."""
    return source_config((), image_folder, prepared=folder, **kw)


def tfds_source_config(name: str, split: str = "train", data_dir: str | None = None,
                       **kw) -> ml_collections.ConfigDict:
    """A TFDS classification dataset (cifar10, cifar100, mnist) read by tfds.data_source without
    TensorFlow (pip install 'vflan_jax[tfds]'): each image + label is a one-turn instruction whose
    answer is the class name, task f"tfds_{name}" (vflan_jax/data/tfds_source.py)."""
    return source_config((), "", tfds=name, tfds_split=split, tfds_data_dir=data_dir, **kw)


def validate_data_config(c: ml_collections.ConfigDict) -> list[mixture.SourceSpec]:
    """Clear errors naming the field; returns the source specs."""
    def bad(field, msg):
        raise ValueError(f"data config: {field}: {msg}")

    if not c.sources or not len(c.sources):
        bad("sources", "no data source configured (add data.sources.<name> = source_config(...))")
    choices = {"template": tuple(conversation.TEMPLATES),
               "image_aspect": image.ASPECTS, "packing": PACKINGS}
    for field, allowed in choices.items():
        if c[field] not in allowed:
            bad(field, f"{c[field]!r} is not one of {tuple(allowed)}")
    for field in ("max_length", "pad_to_multiple", "worker_buffer_size", "read_threads", "skip_window"):
        if not isinstance(c[field], int) or c[field] < 1:
            bad(field, f"must be an int >= 1, got {c[field]!r}")
    if not isinstance(c.max_skip_fraction, (int, float)) or not 0 < c.max_skip_fraction <= 1:
        bad("max_skip_fraction", f"must be in (0, 1] (1 = never stop on the skip rate), got {c.max_skip_fraction!r}")
    for field in ("num_workers", "prefetch"):
        if not isinstance(c[field], int) or c[field] < 0:
            bad(field, f"must be an int >= 0, got {c[field]!r}")
    for field in ("max_images_per_row", "max_examples_per_row", "pool_rows", "num_epochs", "max_pixels"):
        if c[field] is not None and (not isinstance(c[field], int) or c[field] < 1):
            bad(field, f"must be None or an int >= 1, got {c[field]!r}")
    if isinstance(c.heldout_tasks, str):
        bad("heldout_tasks", "must be a list of task names, not one string")
    specs = []
    for name, s in c.sources.items():
        f = f"sources.{name}"
        unknown = set(s.keys()) - set(SOURCE_FIELDS)
        if unknown:
            bad(f, f"unknown field(s) {sorted(unknown)}; known: {SOURCE_FIELDS}")
        paths = s.get("paths") or ()
        if isinstance(paths, str):
            paths = [paths]
        if s.get("tfds"):
            if paths or s.get("prepared"):
                bad(f"{f}.tfds", "give one of paths, prepared or tfds")
            if not isinstance(s.get("tfds_split"), str) or not s.tfds_split:
                bad(f"{f}.tfds_split", f"must be a split name such as 'train', got {s.get('tfds_split')!r}")
            if s.get("tfds_data_dir") and not os.path.isdir(s.tfds_data_dir):
                bad(f"{f}.tfds_data_dir", f"not a directory: {s.tfds_data_dir!r}")
        elif s.get("prepared"):
            if paths:
                bad(f"{f}.paths", "give either paths (annotation files) or prepared (a prepared folder), not both")
            if not prepared_source.is_prepared(s.prepared):
                bad(f"{f}.prepared", f"not prepared data ({prepared_source.INDEX} missing): {s.prepared}")
            if s.get("image_folder") and not os.path.isdir(s.image_folder):
                bad(f"{f}.image_folder", f"not a directory: {s.image_folder!r}")
        else:
            if not paths:
                bad(f"{f}.paths", "no file given")
            for p in paths:
                if not os.path.isfile(p):
                    bad(f"{f}.paths", f"file not found: {p}")
            if not s.get("image_folder") or not os.path.isdir(s.image_folder):
                bad(f"{f}.image_folder", f"not a directory: {s.get('image_folder')!r}")
        if s.get("format", "auto") not in FORMATS:
            bad(f"{f}.format", f"{s.format!r} is not one of {FORMATS}")
        for k in ("max_per_task", "budget_tasks", "budget_per_task", "subset"):
            v = s.get(k)
            if v is not None and (not isinstance(v, int) or v < 1):
                bad(f"{f}.{k}", f"must be None or an int >= 1, got {v!r}")
        if s.get("budget_tasks") is not None and s.get("budget_per_task") is None:
            bad(f"{f}.budget_tasks", "needs budget_per_task (T tasks x N per task)")
        if s.get("budget_per_task") is not None and s.get("max_per_task") is not None:
            bad(f"{f}.max_per_task", "cannot be combined with budget_per_task (the budget sets the per-task count)")
        w = s.get("weight")
        if w is not None and (not isinstance(w, (int, float)) or w <= 0):
            bad(f"{f}.weight", f"must be None or > 0, got {w!r}")
        specs.append(mixture.SourceSpec(
            name=name, paths=tuple(os.fspath(p) for p in paths), image_folder=os.fspath(s.image_folder),
            format=s.get("format", "auto"), default_task=s.get("default_task"), weight=w,
            max_per_task=s.get("max_per_task"), budget_tasks=s.get("budget_tasks"),
            budget_per_task=s.get("budget_per_task"), subset=s.get("subset"), prepared=s.get("prepared") or None,
            tfds=s.get("tfds") or None, tfds_split=s.get("tfds_split") or "train",
            tfds_data_dir=s.get("tfds_data_dir") or None))
    weighted = [s.weight is not None for s in specs]
    if any(weighted) and not all(weighted):
        bad("sources.*.weight", "set a weight on every source or on none (none = concatenate)")
    if all(weighted) and c.num_epochs is not None:
        bad("num_epochs", "must be None when sources are mixed by weight (the mix is an infinite stream)")
    return specs


@dataclasses.dataclass
class PipelineInfo:
    task_names: list[str]             # task_ids value i <-> task_names[i]
    counts: dict                      # mixture.counts(): {source: {task: {available, selected}}}
    skipped: SkipCounter              # bad records met while reading the files (before training)
    mixture: mixture.Mixture
    layout: packing.BatchLayout


class DecodeExample:
    """Example -> packer element (tokens, labels, pixels) or a skip marker. Picklable for workers."""

    def __init__(self, tokenizer, *, template: str, task_ids: dict[str, int], image_folders: dict[str, str],
                 max_length: int, tokens_per_image: int, image_size: int, image_aspect: str,
                 exif_transpose: bool = False, max_pixels: int | None = None, strict: bool = False):
        self.tokenizer, self.template, self.task_ids = tokenizer, template, task_ids
        self.image_folders, self.max_length, self.tokens_per_image = image_folders, max_length, tokens_per_image
        self.image_size, self.image_aspect, self.exif_transpose = image_size, image_aspect, exif_transpose
        self.max_pixels, self.strict = max_pixels, strict

    def __call__(self, index: int, ex: Example) -> dict[str, Any]:
        try:
            return self.decode(index, ex)
        except BadRecord as e:
            e = e.with_context(record_id=ex.id, source=ex.source, task_name=ex.task_name)
            if self.strict:
                raise BadRecordError(str(e)) from None
            return {"index": index, "skip_reason": e.reason, "task_name": ex.task_name,
                    "record_id": ex.id, "source": ex.source, "message": str(e)}

    def decode(self, index: int, ex: Example) -> dict[str, Any]:
        ids, labels = tokenize.tokenize_example(ex, self.tokenizer, self.template)
        full_length = len(ids)
        ids, labels = tokenize.truncate(ids, labels, self.max_length, self.tokens_per_image, ex)
        n_images = sum(1 for t in ids if t == IMAGE_PLACEHOLDER)
        if ex.image is not None and n_images:
            if ex.image_bytes is not None:   # embedded in prepared shards: the file's bytes as they were
                path = io.BytesIO(ex.image_bytes)
                path.name = ex.image          # named in error messages
            else:
                path = resolve_image_path(self.image_folders[ex.source], ex.image)
            pixels = image.load_pixels(path, image_size=self.image_size, aspect=self.image_aspect,
                                       exif_transpose=self.exif_transpose, max_pixels=self.max_pixels)[None]
        else:   # text-only record (or plain template without image?) -> no image slots used
            pixels = np.zeros((0, 3, self.image_size, self.image_size), np.float32)
        return {"index": index, "input_ids": np.asarray(ids, np.int32), "labels": np.asarray(labels, np.int32),
                "pixel_values": pixels, "task_id": self.task_ids[ex.task_name], "task_name": ex.task_name,
                "record_id": ex.id, "source": ex.source, "truncated": len(ids) < full_length}


def build_train_pipeline(data_cfg: ml_collections.ConfigDict, tokenizer, *, image_token_id: int,
                         tokens_per_image: int, image_size: int, per_host_batch_size: int,
                         process_index: int | None = None, process_count: int | None = None,
                         seed: int | None = None) -> tuple[grain.IterDataset, PipelineInfo]:
    """Config -> (IterDataset of host batches, info). `iter(ds)` is checkpointable (module doc)."""
    specs = validate_data_config(data_cfg)
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
    seed = data_cfg.seed if seed is None else seed

    mix = mixture.build_mixture(specs, tuple(data_cfg.heldout_tasks), seed=seed, strict=data_cfg.strict)
    task_names = mix.task_names
    if not task_names:
        raise ValueError("data config: sources: no training example left after selection "
                         "(check heldout_tasks, caps and the files)")
    image_folders = {}
    for sel in mix.sources:
        for p in sel.spec.paths:
            if image_folders.setdefault(os.fspath(p), sel.spec.image_folder) != sel.spec.image_folder:
                raise ValueError(f"data config: sources: file {p} is listed with two image folders")

    datasets = [grain.MapDataset.source(sel.train) for sel in mix.sources if len(sel.train_indices)]
    weights = [sel.spec.weight for sel in mix.sources if len(sel.train_indices)]
    if all(w is None for w in weights):
        ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.concatenate(datasets)
        if data_cfg.shuffle:
            ds = ds.shuffle(seed=seed)
        ds = ds.repeat(data_cfg.num_epochs)
    else:
        parts = [(d.shuffle(seed=seed + i) if data_cfg.shuffle else d).repeat() for i, d in enumerate(datasets)]
        ds = grain.MapDataset.mix(parts, weights)
    ds = ds[process_index::process_count]

    decode = DecodeExample(task_ids={t: i for i, t in enumerate(task_names)}, image_folders=image_folders,
                           **decoding.decode_kwargs(data_cfg, tokenizer, tokens_per_image=tokens_per_image,
                                                    image_size=image_size))
    decoded = ds.map_with_index(decode)
    it = decoded.to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.read_threads,
                                                   prefetch_buffer_size=max(2, 2 * data_cfg.read_threads)))
    if data_cfg.num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers,
                                                         per_worker_buffer_size=data_cfg.worker_buffer_size))

    K = data_cfg.max_images_per_row or max(1, data_cfg.max_length // (tokens_per_image + 1))
    pad_mode = data_cfg.packing == "pad_to_longest"
    layout = packing.BatchLayout(
        batch_size=per_host_batch_size, max_images_per_row=K,
        max_examples_per_row=1 if pad_mode else (data_cfg.max_examples_per_row or max(1, data_cfg.max_length // 32)),
        **decoding.layout_kwargs(data_cfg, tokenizer, image_token_id=image_token_id,
                                 tokens_per_image=tokens_per_image, image_size=image_size))
    # Mostly-skipped data stops with the counts (skips.SkipRateGuard), a pass = every record once.
    guard = functools.partial(skips.SkipRateGuard, data_cfg.max_skip_fraction, data_cfg.skip_window,
                              max(1, sum(len(d) for d in datasets) // process_count))
    if pad_mode:
        batches = packing.PadToLongestBatchIterDataset(it, layout, multiple=data_cfg.pad_to_multiple, guard=guard)
    else:
        batches = packing.BestFitPackIterDataset(it, layout, refetch=decoded.__getitem__,
                                                 pool_rows=data_cfg.pool_rows,
                                                 first_fit=data_cfg.packing == "first_fit", guard=guard)
    if data_cfg.prefetch:
        batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=data_cfg.prefetch)

    logging.info("data pipeline: %d training tasks, host %d/%d, %s, B=%d x L=%d, K=%d image slots",
                 len(task_names), process_index, process_count, data_cfg.packing, per_host_batch_size,
                 data_cfg.max_length, K)
    return batches, PipelineInfo(task_names, mix.counts(), mix.skipped, mix, layout)


def skips_of(batch: dict) -> SkipCounter:
    """The records skipped since the previous batch (a batch's `meta_skips`)."""
    import json
    return SkipCounter.from_dict(json.loads(batch["meta_skips"]))


def device_part(batch: dict) -> dict[str, np.ndarray]:
    """The arrays that go to the device: everything but the host-only `meta_*` keys."""
    return {k: v for k, v in batch.items() if not k.startswith("meta_")}
