"""POPE (docs/REFERENCE.md §5.2): object-hallucination yes/no questions on COCO val2014, three splits.

Data layout (LLaVA's playground/data/eval/pope):
    D/llava_pope_test.jsonl                 LLaVA's question file (question_id, image, text, category)
    D/coco/coco_pope_{adversarial,popular,random}.json   POPE's annotations, one JSON per line with "label"
                                            (D/coco_pope_*.json is accepted too)
    D/val2014/COCO_val2014_*.jpg            images
Scoring is LLaVA's llava/eval/eval_pope.py: labels are read in file order and paired with the
answers to that split's questions in question-file order. Only `run` needs val2014/.
"""
from __future__ import annotations

import os

from vflan_jax.eval.benchmark import (
    SHORT_ANSWER_SUFFIX,
    BenchmarkError,
    Question,
    Result,
    pct,
    record_key,
    require_dir,
    require_file,
    with_suffix,
)
from vflan_jax.eval.jsonl import read_jsonl

NAME = "pope"
MAX_NEW_TOKENS = 128
QUESTION_FILE = "llava_pope_test.jsonl"
SPLITS = ("adversarial", "popular", "random")


def load_questions(data_dir: str, images: bool = True) -> list[Question]:
    qfile = require_file(os.path.join(data_dir, QUESTION_FILE), "POPE", "LLaVA's POPE question file")
    images_dir = os.path.join(data_dir, "val2014")
    if images:
        require_dir(images_dir, "POPE", "COCO val2014 images")
    questions = []
    for r in read_jsonl(qfile, "LLaVA's POPE question file"):
        if not {"question_id", "image", "text", "category"} <= set(r):
            raise BenchmarkError(f"POPE: {qfile}: each line needs question_id, image, text, category; got {sorted(r)}")
        questions.append(Question(r["question_id"], with_suffix(r["text"], SHORT_ANSWER_SUFFIX),
                                  image=os.path.join(images_dir, r["image"]), metadata={"category": r["category"]}))
    return questions


def annotation_file(data_dir: str, split: str) -> str | None:
    for cand in (os.path.join(data_dir, "coco", f"coco_pope_{split}.json"),
                 os.path.join(data_dir, f"coco_pope_{split}.json")):
        if os.path.isfile(cand):
            return cand
    return None


def split_labels(data_dir: str, split: str, n_questions: int) -> list[str]:
    """The split's labels in file order; exactly one per question of that split."""
    path = annotation_file(data_dir, split)
    if path is None:
        raise BenchmarkError(f"POPE: expected {os.path.join(data_dir, 'coco', f'coco_pope_{split}.json')} "
                             f"(POPE's annotation file for the {split} split); not found")
    labels = [r.get("label") for r in read_jsonl(path, "POPE annotations")]
    if len(labels) != n_questions or any(label not in ("yes", "no") for label in labels):
        raise BenchmarkError(f"POPE: {path}: expected {n_questions} lines with label yes/no "
                             f"(one per {split} question of {QUESTION_FILE}, same order); got {len(labels)}")
    return labels


def validate(data_dir: str, questions: list[Question]) -> None:
    """What score will read besides the answers: every split's annotation file."""
    for split in SPLITS:
        n = sum(q.metadata["category"] == split for q in questions)
        if n:
            split_labels(data_dir, split, n)


def parse_answer(text: str) -> str:
    """eval_pope.py: first sentence, commas removed, split on spaces; No/not/no anywhere -> no."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def split_metrics(preds: list[str], labels: list[str]) -> dict:
    tp = sum(p == "yes" and label == "yes" for p, label in zip(preds, labels, strict=True))
    tn = sum(p == "no" and label == "no" for p, label in zip(preds, labels, strict=True))
    fp = sum(p == "yes" and label != "yes" for p, label in zip(preds, labels, strict=True))
    fn = sum(p == "no" and label == "yes" for p, label in zip(preds, labels, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"acc": pct(tp + tn, len(preds)), "precision": 100 * precision, "recall": 100 * recall,
            "f1": 100 * f1, "yes_ratio": pct(preds.count("yes"), len(preds)), "n": len(preds),
            "TP": tp, "FP": fp, "TN": tn, "FN": fn}


def evaluate(answers: list[dict], data_dir: str, out_dir: str, judge=None) -> Result:
    questions = load_questions(data_dir, images=False)
    by_key = {record_key(a): a for a in answers}
    per_split, notes, missing = {}, [], 0
    for split in SPLITS:
        split_questions = [q for q in questions if q.metadata["category"] == split]
        if not split_questions:
            continue
        labels = split_labels(data_dir, split, len(split_questions))
        preds, kept = [], []
        for q, label in zip(split_questions, labels, strict=True):
            a = by_key.get(q.key)
            if a is None:
                missing += 1
                continue
            preds.append(parse_answer(a["text"]))
            kept.append(label)
        if preds:
            per_split[split] = split_metrics(preds, kept)
    if missing:
        notes.append(f"{missing} of {len(questions)} questions unanswered; metrics are over answered ones")
    if len(per_split) < len(SPLITS):
        notes.append(f"splits scored: {sorted(per_split)} (of {list(SPLITS)})")
    f1 = _mean([m["f1"] for m in per_split.values()])
    acc = _mean([m["acc"] for m in per_split.values()])
    yes_ratio = _mean([m["yes_ratio"] for m in per_split.values()])
    if yes_ratio is not None:     # WHY: the figure that shows a model answering "no" (or "yes") to everything
        notes.append(f"yes-ratio {yes_ratio:.2f}% of answers, averaged over splits")
    return Result(NAME, "F1 averaged over splits (%)", f1,
                  {"f1_avg": f1, "acc_avg": acc, "yes_ratio_avg": yes_ratio, "splits": per_split},
                  {f"{s} {k}": m[k] for s, m in per_split.items() for k in ("acc", "f1", "yes_ratio")}, "%",
                  len(questions), len(questions) - missing, notes)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
