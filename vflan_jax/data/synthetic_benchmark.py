"""The offline task suite's yes/no questions as a POPE-format benchmark, so `eval run` can be tried
on the demo model with nothing downloaded:

    python -m vflan_jax.data.synthetic_benchmark --suite runs/demo/synthetic --out runs/demo/pope

Writes POPE's layout (docs/EVALUATION.md): llava_pope_test.jsonl (LLaVA's question file),
coco/coco_pope_{adversarial,popular,random}.json (labels) and val2014/ (the images). The
questions are the existence task's validation instances: a task the demo trains on, on images
it never saw. The three POPE splits are filled round-robin (they mean nothing here).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from vflan_jax.cli import EXIT_BAD_INPUT, EXIT_OK, resolve_path
from vflan_jax.constants import IMAGE_TOKEN
from vflan_jax.data.synthetic import task_name

SPLITS = ("adversarial", "popular", "random")
SHORT_ANSWER = "Answer the question using a single word or phrase."  # LLaVA's POPE prompt suffix
TASK = task_name("existence")


def write_pope(suite_dir: str, out_dir: str) -> int:
    """Number of questions written from suite_dir/val.json into out_dir."""
    with open(os.path.join(suite_dir, "val.json"), encoding="utf-8") as f:
        records = [r for r in json.load(f) if r["task_name"] == TASK]
    os.makedirs(os.path.join(out_dir, "val2014"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "coco"), exist_ok=True)
    questions, labels = [], {s: [] for s in SPLITS}
    for i, r in enumerate(records):
        split = SPLITS[i % len(SPLITS)]
        shutil.copyfile(os.path.join(suite_dir, "images", r["image"]), os.path.join(out_dir, "val2014", r["image"]))
        question = r["conversations"][0]["value"].replace(IMAGE_TOKEN, "").replace("Answer yes or no.", "").strip()
        questions.append({"question_id": i, "image": r["image"], "text": f"{question}\n{SHORT_ANSWER}",
                          "category": split})
        labels[split].append({"question_id": i, "image": r["image"], "text": question,
                              "label": r["conversations"][1]["value"]})
    _write_lines(os.path.join(out_dir, "llava_pope_test.jsonl"), questions)
    for split, rows in labels.items():
        _write_lines(os.path.join(out_dir, "coco", f"coco_pope_{split}.json"), rows)
    return len(questions)


def _write_lines(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vflan_jax.data.synthetic_benchmark", description=__doc__.split("\n")[0])
    p.add_argument("--suite", required=True, help="the task suite folder (the demo writes <workdir>/synthetic)")
    p.add_argument("--out", required=True, help="benchmark folder to write (eval run --benchmark pope --data_dir)")
    args = p.parse_args(argv)
    suite, out = resolve_path(args.suite), resolve_path(args.out)
    if not os.path.isfile(os.path.join(suite, "val.json")):
        print(f"error: --suite {suite}: no val.json (run the demo first, or python -m vflan_jax.data.synthetic)",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    n = write_pope(suite, out)
    print(f"wrote {n} POPE-format questions to {out}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
