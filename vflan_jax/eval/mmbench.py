"""MMBench (docs/REFERENCE.md §5.3): multiple choice, CircularEval carried by the data.

Data: D/mmbench_dev_20230712.tsv (or the one *.tsv in D) with columns index, question, hint, A..D,
answer (absent on test splits), category, l2-category, image (base64). Row index idx + k*1,000,000
is rotation k of base question idx; a base question is right only when every rotation present in
the TSV is answered right (a rotation without an answer counts as wrong).

Writes the submission file of LLaVA's scripts/convert_mmbench_for_submission.py: an .xlsx when
openpyxl is installed, otherwise a .tsv with the same columns.
"""
from __future__ import annotations

import collections
import csv
import os
import re
import sys

from vflan_jax.eval.benchmark import MULTIPLE_CHOICE_SUFFIX, BenchmarkError, Question, Result, pct, record_key

NAME = "mmbench"
MAX_NEW_TOKENS = 1024
DEFAULT_TSV = "mmbench_dev_20230712.tsv"
LETTERS = "ABCD"
ROTATION = 1_000_000
REQUIRED = ("index", "question", "A", "B")
SUBMISSION_DROP = ("hint", "category", "source", "image", "comment", "l2-category")


def tsv_path(data_dir: str) -> str:
    path = os.path.join(data_dir, DEFAULT_TSV)
    if os.path.isfile(path):
        return path
    tsvs = sorted(f for f in os.listdir(data_dir) if f.endswith(".tsv")) if os.path.isdir(data_dir) else []
    if len(tsvs) == 1:
        return os.path.join(data_dir, tsvs[0])
    raise BenchmarkError(f"MMBench: expected {path} (MMBench's TSV with index, question, hint, A-D, answer, "
                         f"category, image as base64) or exactly one *.tsv in {data_dir}; found {tsvs}")


def read_rows(path: str) -> tuple[list[str], list[dict]]:
    csv.field_size_limit(sys.maxsize)               # base64 images exceed csv's default field limit
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        rows = list(reader)
        columns = list(reader.fieldnames or [])
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise BenchmarkError(f"MMBench: {path}: missing columns {missing}; expected index, question, hint, A-D, "
                             "answer, category, image")
    return columns, rows


def is_none(value) -> bool:
    """model_vqa_mmbench.is_none: pandas NaN (an empty cell) or the string 'nan'."""
    return value is None or value.strip() == "" or value.strip().lower() == "nan"


def options_of(row: dict) -> list[str]:
    out = []
    for letter in LETTERS:
        if is_none(row.get(letter)):
            break                                   # LLaVA stops at the first missing option
        out.append(row[letter])
    return out


def build_prompt(row: dict) -> str:
    """model_vqa_mmbench.py: [hint\\n] question, then '\\nA. opt' per option (the logged prompt)."""
    question = row["question"]
    if not is_none(row.get("hint")):
        question = row["hint"] + "\n" + question
    for letter, option in zip(LETTERS, options_of(row), strict=False):  # a row may have fewer than 4 options
        question = question + "\n" + letter + ". " + option
    return question


def load_questions(data_dir: str) -> list[Question]:
    _, rows = read_rows(tsv_path(data_dir))
    questions = []
    for row in rows:
        index = int(row["index"])
        logged = build_prompt(row)
        questions.append(Question(index, logged + "\n" + MULTIPLE_CHOICE_SUFFIX, image_b64=row.get("image") or None,
                                  record_prompt=logged, metadata={"options": options_of(row)}))
    # WHY: rotations of a base question side by side, so --limit and interrupted runs keep them together.
    questions.sort(key=lambda q: (q.question_id % ROTATION, q.question_id))
    return questions


def extract_letter(text: str, options: list[str]) -> str | None:
    """The chosen option letter of a free-form answer, or None when it cannot be told."""
    valid = LETTERS[:len(options)]
    text = text.strip()
    patterns = (rf"^\(?([{valid}])\)?[.:)]?$",               # "B", "B.", "(B)"
                rf"^\(?([{valid}])[.:)]\s",                   # "B. red", "(C) blue"
                rf"\banswer(?: is)?\s*:?\s*\(?([{valid}])\b")  # "The answer is C"
    for pattern in patterns:
        m = re.search(pattern, text, flags=re.IGNORECASE if pattern.startswith(r"\banswer") else 0)
        if m:
            return m.group(1).upper()
    # Standalone capital letters; "A" followed by a lower-case word is the article, not an option.
    tokens = {m.group(1) for m in re.finditer(rf"\b([{valid}])\b", text)
              if not (m.group(1) == "A" and re.match(r" [a-z]", text[m.end():m.end() + 2]))}
    if len(tokens) == 1:
        return tokens.pop()
    lowered = text.lower()
    hits = [valid[i] for i, o in enumerate(options) if o.strip() and o.strip().lower() in lowered]
    return hits[0] if len(hits) == 1 else None


def evaluate(answers: list[dict], data_dir: str, out_dir: str, judge=None) -> Result:
    path = tsv_path(data_dir)
    columns, rows = read_rows(path)
    by_key = {record_key(a): a for a in answers}
    predictions = {}
    for row in rows:
        a = by_key.get(record_key({"question_id": int(row["index"]), "prompt": build_prompt(row)}))
        predictions[int(row["index"])] = None if a is None else a["text"]
    files = {"submission": write_submission(columns, rows, predictions, out_dir)}
    notes = [] if files["submission"].endswith(".xlsx") else [
        "openpyxl is not installed: the submission is a TSV (same columns as LLaVA's xlsx); convert it "
        "to .xlsx before uploading"]
    if "answer" not in columns:
        notes.append("no 'answer' column (a test split): nothing scored locally; upload the submission")
        return Result(NAME, "CircularEval accuracy (%)", None, {}, {}, notes=notes, files=files,
                      n_questions=len(rows), n_answered=sum(p is not None for p in predictions.values()))
    groups = collections.defaultdict(list)
    for row in rows:
        index = int(row["index"])
        text = predictions[index]
        letter = None if text is None else extract_letter(text, options_of(row))
        groups[index % ROTATION].append((row, text is not None, letter == row["answer"].strip()))
    base_right = {b: all(ok for _, _, ok in g) for b, g in groups.items()}
    complete = [b for b, g in groups.items() if all(answered for _, answered, _ in g)]
    by_category = collections.defaultdict(list)
    for b, g in groups.items():
        by_category[g[0][0].get("category") or "unknown"].append(base_right[b])
    n_missing = sum(p is None for p in predictions.values())
    if n_missing:
        notes.append(f"{n_missing} of {len(rows)} rows unanswered; their base questions count as wrong "
                     f"({len(groups) - len(complete)} of {len(groups)} base questions incomplete)")
    circular = pct(sum(base_right.values()), len(groups))
    metrics = {"circular_acc": circular,
               "circular_acc_answered": pct(sum(base_right[b] for b in complete), len(complete)),
               "n_base_questions": len(groups), "n_base_complete": len(complete),
               "row_acc": pct(sum(ok for g in groups.values() for _, _, ok in g), len(rows)),
               "categories": {c: pct(sum(v), len(v)) for c, v in sorted(by_category.items())}}
    return Result(NAME, "CircularEval accuracy (%)", circular, metrics, dict(metrics["categories"]), "%",
                  len(rows), len(rows) - n_missing, notes, files)


def write_submission(columns: list[str], rows: list[dict], predictions: dict, out_dir: str) -> str:
    """convert_mmbench_for_submission.py: drop hint/category/source/image/comment/l2-category, insert
    'prediction' as the 7th column, raw answer text per row."""
    kept = [c for c in columns if c not in SUBMISSION_DROP]
    kept.insert(min(6, len(kept)), "prediction")
    table = [[predictions.get(int(r["index"])) if c == "prediction" else r.get(c) for c in kept] for r in rows]
    os.makedirs(out_dir, exist_ok=True)
    try:
        import openpyxl
    except ImportError:
        path = os.path.join(out_dir, "mmbench_submission.tsv")
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t")
            writer.writerow(kept)
            writer.writerows([["" if v is None else v for v in line] for line in table])
        return path
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(kept)
    for line in table:
        sheet.append([int(v) if c == "index" else v for c, v in zip(kept, line, strict=True)])
    path = os.path.join(out_dir, "mmbench_submission.xlsx")
    book.save(path)
    return path
