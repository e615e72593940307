"""Data pipeline benchmark: decode-to-batch throughput per core, and packing efficiency.

  python benchmarks/data_pipeline.py --sample_dir ../shared/data/vision_flan_sample [--tokenizer DIR] [--repeats 3]

(1) One process, one decode thread, the real Vision-Flan sample (136 records), three paths
    measured interleaved in the same run (CPU seconds per example = per core):
    ours      vflan_jax pipeline (tokenize + labels + image + pack into [B, 2048] rows)
    reference transformers CLIPImageProcessor (PIL backend) after LLaVA's expand2square +
              LLaVA's tokenizer_image_token and preprocess_v1 label arithmetic + pad collation
    floor     PIL alone: open, convert('RGB'), full-size expand2square, BICUBIC resize
    and the largest pixel difference ours vs reference.
(2) Fraction of real (non-pad) tokens per batch at max_length 2048, 576 tokens per image,
    text lengths resampled from the sample (LLaMA-like ~3.7 characters/token + 45 template
    tokens): best-fit packing vs pad-to-longest (rounded up to 64), B=16.
Without --tokenizer a small offline LLaMA-style tokenizer is built (synthetic.build_tokenizer).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from absl import flags

from vflan_jax.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER
from vflan_jax.data import conversation, image, packing, pipeline, sources, synthetic, tokenize


def ours_pass(data_cfg, tok):
    ds, _ = pipeline.build_train_pipeline(data_cfg, tok, image_token_id=32000, tokens_per_image=576,
                                          image_size=336, per_host_batch_size=4, process_index=0, process_count=1)
    n = 0
    for batch in ds:
        n += int((batch["meta_record_ids"] != "").sum())
    return n


def reference_pass(examples, folder, tok, proc):
    from PIL import Image
    batch_ids, batch_labels, pixels = [], [], []
    for ex in examples:
        text = conversation.render(conversation.preprocess_multimodal(ex.turns), "vicuna_v1")
        ids = tokenize.tokenizer_image_token(text, tok)
        labels = tokenize.llava_reference_labels(text, ids, tok, "vicuna_v1", model_max_length=2048)
        img = Image.open(os.path.join(folder, ex.image)).convert("RGB")
        img = expand2square(img, tuple(int(x * 255) for x in proc.image_mean))
        pixels.append(proc(img, return_tensors="np")["pixel_values"][0])
        batch_ids.append(ids[:2048])
        batch_labels.append((labels or [IGNORE_INDEX] * len(ids))[:2048])
        if len(batch_ids) == 4:
            collate(batch_ids, batch_labels, pixels)
            batch_ids, batch_labels, pixels = [], [], []
    if batch_ids:
        collate(batch_ids, batch_labels, pixels)
    return len(examples)


def collate(ids, labels, pixels):
    L = max(len(x) for x in ids)
    out = np.zeros((len(ids), L), np.int64)
    lab = np.full((len(ids), L), IGNORE_INDEX, np.int64)
    for i, (a, b) in enumerate(zip(ids, labels, strict=True)):
        out[i, :len(a)], lab[i, :len(b)] = a, b
    return out, lab, np.stack(pixels)


def expand2square(pil_img, background_color):   # LLaVA mm_utils, verbatim
    from PIL import Image
    width, height = pil_img.size
    if width == height:
        return pil_img
    side = max(width, height)
    result = Image.new(pil_img.mode, (side, side), background_color)
    result.paste(pil_img, ((side - width) // 2, (side - height) // 2))
    return result


def floor_pass(examples, folder):
    from PIL import Image
    for ex in examples:
        img = Image.open(os.path.join(folder, ex.image)).convert("RGB")
        expand2square(img, (122, 116, 104)).resize((336, 336), Image.BICUBIC)
    return len(examples)


def throughput(args, tok):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    proc = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    folder = os.path.join(args.sample_dir, "images")
    files = [os.path.join(args.sample_dir, f) for f in ("llava_format.json", "raw_format.json")]
    examples = [e for f in files for e in sources.read_examples(f)]
    cfg = pipeline.default_data_config()
    for i, f in enumerate(files):
        cfg.sources[f"s{i}"] = pipeline.source_config(f, folder)
    cfg.num_epochs, cfg.read_threads, cfg.prefetch, cfg.num_workers = 1, 1, 0, 0

    worst = 0.0
    for ex in examples:   # pixel parity on every image
        from PIL import Image
        rgb = expand2square(Image.open(os.path.join(folder, ex.image)).convert("RGB"), (122, 116, 104))
        ref = proc(rgb, return_tensors="np")["pixel_values"][0]
        worst = max(worst, float(np.abs(image.load_pixels(os.path.join(folder, ex.image)) - ref).max()))

    paths = {"ours": lambda: ours_pass(cfg, tok), "reference": lambda: reference_pass(examples, folder, tok, proc),
             "floor": lambda: floor_pass(examples, folder)}
    cpu = {k: [] for k in paths}
    for _ in range(args.repeats):
        for name, fn in paths.items():
            t = time.process_time()
            n = fn()
            cpu[name].append((time.process_time() - t) / n)
    ms = {k: 1e3 * min(v) for k, v in cpu.items()}   # min over repeats: least disturbed by other load
    med = {k: 1e3 * statistics.median(v) for k, v in cpu.items()}
    return ms, med, worst, len(examples)


def fill_rates(args):
    import grain
    recs = json.load(open(os.path.join(args.sample_dir, "llava_format.json")))
    chars = np.array([sum(len(t["value"]) for t in r["conversations"]) for r in recs])
    rng = np.random.default_rng(0)
    text = (rng.choice(chars, args.n_fill) / 3.7).astype(int) + 45
    shape = (3, 1, 1)
    els = []
    for i, t in enumerate(text):
        ids = np.ones(t, np.int32)
        ids[1] = IMAGE_PLACEHOLDER
        els.append({"index": i, "input_ids": ids, "labels": ids, "pixel_values": np.zeros((1,) + shape, np.float32),
                    "task_id": 0, "task_name": "t", "record_id": str(i)})
    src = grain.MapDataset.source(els)
    out = {}
    for name in ("best_fit", "first_fit", "pad_to_longest"):
        pad = name == "pad_to_longest"
        lay = packing.BatchLayout(batch_size=16, max_length=2048, max_images_per_row=1 if pad else 3,
                                  image_shape=shape, tokens_per_image=576, image_token_id=32000,
                                  max_examples_per_row=1 if pad else 64)
        ds = (packing.PadToLongestBatchIterDataset(src.to_iter_dataset(), lay, multiple=64) if pad else
              packing.BestFitPackIterDataset(src.to_iter_dataset(), lay, src.__getitem__,
                                             first_fit=name == "first_fit"))
        fracs = [(b["segment_ids"] > 0).mean() for b in ds][:-1]     # last batch is a partial tail
        out[name] = float(np.mean(fracs))
    lengths = text + 575
    return out, np.percentile(lengths, [10, 50, 90]).astype(int).tolist()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sample_dir", required=True)
    p.add_argument("--tokenizer")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n_fill", type=int, default=20000)
    args = p.parse_args()
    flags.FLAGS(sys.argv[:1])
    from transformers import AutoTokenizer
    tok_dir = args.tokenizer
    if tok_dir is None:
        suite = synthetic.write_task_suite(os.path.join(tempfile.gettempdir(), "vflan_bench_suite"))
        tok_dir = synthetic.build_tokenizer(suite.tokenizer_dir, synthetic.suite_texts(suite))
    tok = AutoTokenizer.from_pretrained(tok_dir)

    ms, med, worst, n = throughput(args, tok)
    print(f"(1) decode-to-batch, {n} real records, CPU ms/example (min | median of {args.repeats}), 1 core")
    print(f"{'path':<10} {'ms/ex':>7} {'median':>7} {'ex/s/core':>10} {'vs ref':>7} {'vs floor':>9}")
    for k in ("ours", "reference", "floor"):
        print(f"{k:<10} {ms[k]:>7.2f} {med[k]:>7.2f} {1e3 / ms[k]:>10.1f} {ms['reference'] / ms[k]:>6.2f}x "
              f"{ms[k] / ms['floor']:>8.2f}x")
    print(f"max |ours - reference| pixels: {worst:.2e}")
    fill, pct = fill_rates(args)
    print(f"(2) real-token fraction per batch, max_length 2048, B=16, {args.n_fill} examples "
          f"(length p10/p50/p90 = {pct})")
    for k, v in fill.items():
        print(f"{k:<15} {100 * v:6.2f}%")


if __name__ == "__main__":
    main()
