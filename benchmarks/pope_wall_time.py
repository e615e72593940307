"""Wall time of a full POPE-sized evaluation: `python -m vflan_jax.eval run --benchmark pope` on
8,910 questions with the `small` model on this machine, measured end to end (process start,
checkpoint load, compilation, image loading, generation, answer file, scoring, report).

    .venv/bin/python benchmarks/pope_wall_time.py                      # full run: 8,910 questions
    .venv/bin/python benchmarks/pope_wall_time.py --questions 320      # a quick look

Data: LLaVA's POPE layout (llava_pope_test.jsonl, coco/coco_pope_{split}.json, val2014/) with the
real benchmark's shape: 3 splits x 2,970 questions over 500 COCO-sized (640x480) JPEGs, ~18
questions per image, LLaVA's prompt + short-answer suffix. Model: PRESETS["small"] with random
weights and the offline synthetic tokenizer, saved as a vflan_jax checkpoint. A random model never
emits EOS, so answers are capped at --max_new_tokens 3 (a trained LLaVA answers "Yes"/"No" + EOS,
2-3 tokens); LLaVA's default of 128 would measure 128-token babble instead.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from vflan_jax.eval.benchmark import SHORT_ANSWER_SUFFIX as SUFFIX
from vflan_jax.eval.pope import QUESTION_FILE, SPLITS

POPE_QUESTIONS = 8910
OBJECTS = ("dog", "car", "person", "dining table", "traffic light", "bicycle", "chair", "cup", "bus", "umbrella")


def write_pope(root: str, questions: int, images: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "val2014"))
    os.makedirs(os.path.join(root, "coco"))
    names = [f"COCO_val2014_{i:012d}.jpg" for i in range(images)]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), np.uint8)).save(os.path.join(root, "val2014", name),
                                                                            quality=90)
    per_split = -(-questions // len(SPLITS))
    qid = 0
    with open(os.path.join(root, QUESTION_FILE), "w") as qf:
        for split in SPLITS:
            with open(os.path.join(root, "coco", f"coco_pope_{split}.json"), "w") as af:
                for i in range(min(per_split, questions - qid)):
                    image = names[i % images]
                    question = f"Is there a {OBJECTS[(qid * 7) % len(OBJECTS)]} in the image?"
                    qf.write(json.dumps({"question_id": qid, "image": image, "text": f"{question}\n{SUFFIX}",
                                         "category": split}) + "\n")
                    af.write(json.dumps({"question_id": qid, "image": image, "text": question,
                                         "label": "yes" if rng.random() < 0.5 else "no"}) + "\n")
                    qid += 1


def write_checkpoint(root: str) -> str:
    import jax

    from vflan_jax.checkpoint import save_model
    from vflan_jax.data import synthetic
    from vflan_jax.models.config import get_preset
    from vflan_jax.parallel import init_params, make_mesh
    texts = [f"Is there a {o} in the image?\n{SUFFIX} Yes No" for o in OBJECTS] * 30
    tok_dir = synthetic.build_tokenizer(os.path.join(root, "tokenizer"), texts, vocab_size=1024)
    cfg = get_preset("small")
    params, _ = init_params(cfg, make_mesh(devices=jax.devices()[:1]), seed=0)
    save_model(os.path.join(root, "ckpt"), params, cfg, tokenizer_dir=tok_dir)
    return os.path.join(root, "ckpt")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--questions", type=int, default=POPE_QUESTIONS)
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_pope(os.path.join(tmp, "pope"), args.questions, min(args.images, args.questions))
        ckpt = write_checkpoint(tmp)
        cmd = [sys.executable, "-m", "vflan_jax.eval", "run", "--benchmark", "pope", "--checkpoint", ckpt,
               "--data_dir", os.path.join(tmp, "pope"), "--out", os.path.join(tmp, "out"),
               "--batch_size", str(args.batch_size), "--max_new_tokens", str(args.max_new_tokens)]
        t = time.perf_counter()
        subprocess.run(cmd, check=True)
        seconds = time.perf_counter() - t
        with open(os.path.join(tmp, "out", "report.json")) as f:
            report = json.load(f)
        with open(os.path.join(tmp, "out", "answers.jsonl")) as f:
            answered = sum(1 for _ in f)
    if answered != args.questions or report["n_answered"] != args.questions:
        raise SystemExit(f"expected {args.questions} answers, the run wrote {answered} (report: "
                         f"{report['n_answered']})")
    print(json.dumps({"pope_wall_time": {"questions": args.questions, "seconds": round(seconds, 1),
                                         "minutes": round(seconds / 60, 2),
                                         "questions_per_s": round(args.questions / seconds, 2),
                                         "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                                         "headline": report["headline"]}}))


if __name__ == "__main__":
    main()
