"""MME (docs/REFERENCE.md §5.1): 14 yes/no subtasks, two questions per image.

Data layout (LLaVA's playground/data/eval/MME):
    D/llava_mme.jsonl                        LLaVA's question file (optional: else built from the folders)
    D/MME_Benchmark_release_version/<subtask>/{images/, questions_answers_YN/*.txt}   or
    D/MME_Benchmark_release_version/<subtask>/{*.png|*.jpg, *.txt}
(D may also be the release folder itself.) Each txt line: "question<TAB>Yes|No".

Scoring follows the official eval_tool/calculation.py; the per-subtask result files are written as
LLaVA's convert_answer_to_mme.py writes them, so calculation.py can re-score R/mme_results/.
"""
from __future__ import annotations

import collections
import os

from vflan_jax.eval.benchmark import SHORT_ANSWER_SUFFIX, BenchmarkError, Question, Result, record_key, with_suffix
from vflan_jax.eval.jsonl import read_jsonl

NAME = "mme"
MAX_NEW_TOKENS = 128
RELEASE = "MME_Benchmark_release_version"
QUESTION_FILE = "llava_mme.jsonl"
OFFICIAL_SUFFIX = "Please answer yes or no."
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
              "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG")


def release_dir(data_dir: str) -> str:
    for cand in (os.path.join(data_dir, RELEASE), data_dir):
        if os.path.isdir(cand) and any(os.path.isdir(os.path.join(cand, t)) for t in PERCEPTION + COGNITION):
            return cand
    raise BenchmarkError(f"MME: expected {os.path.join(data_dir, RELEASE)}/<subtask>/ folders (MME's release, "
                         f"subtasks {', '.join(PERCEPTION + COGNITION)}) and optionally "
                         f"{os.path.join(data_dir, QUESTION_FILE)} (LLaVA's question file); none found")


def _subtask_dirs(release: str, category: str) -> tuple[str, str]:
    """(image folder, question-answer folder) as convert_answer_to_mme.get_gt finds them."""
    root = os.path.join(release, category)
    if os.path.exists(os.path.join(root, "images")):
        return os.path.join(root, "images"), os.path.join(root, "questions_answers_YN")
    return root, root


def ground_truth(release: str) -> dict[tuple[str, str, str], str]:
    """{(subtask, txt file, official question): "Yes"/"No"} exactly as convert_answer_to_mme.get_gt."""
    gt = {}
    for category in sorted(os.listdir(release)):
        if not os.path.isdir(os.path.join(release, category)):
            continue
        _, qa_dir = _subtask_dirs(release, category)
        if not os.path.isdir(qa_dir):
            raise BenchmarkError(f"MME: expected question/answer txt files in {qa_dir}")
        for name in sorted(os.listdir(qa_dir)):
            if not name.endswith(".txt"):
                continue
            with open(os.path.join(qa_dir, name), encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    parts = line.strip().split("\t")
                    if len(parts) != 2:
                        raise BenchmarkError(f"MME: {os.path.join(qa_dir, name)}:{n}: expected "
                                             f"'question<TAB>answer', got {line.strip()!r}")
                    gt[(category, name, parts[0])] = parts[1]
    return gt


def official_question(gt: dict, category: str, file: str, prompt: str) -> str:
    """convert_answer_to_mme.py's restoration of MME's question string from LLaVA's prompt."""
    if SHORT_ANSWER_SUFFIX in prompt:
        prompt = prompt.replace(SHORT_ANSWER_SUFFIX, "").strip()
    if OFFICIAL_SUFFIX not in prompt:
        prompt = prompt + " " + OFFICIAL_SUFFIX
        if (category, file, prompt) not in gt:
            prompt = prompt.replace(" " + OFFICIAL_SUFFIX, "  " + OFFICIAL_SUFFIX)
    return prompt


def _locate(question_id: str) -> tuple[str, str]:
    """(subtask, txt file name) from a question id "<subtask>/.../<stem>.<ext>" (LLaVA's rule)."""
    return question_id.split("/")[0], question_id.split("/")[-1].split(".")[0] + ".txt"


def load_questions(data_dir: str) -> list[Question]:
    release = release_dir(data_dir)
    qfile = os.path.join(data_dir, QUESTION_FILE)
    if os.path.isfile(qfile):
        questions = []
        for r in read_jsonl(qfile, "LLaVA's MME question file"):
            if not {"question_id", "image", "text"} <= set(r):
                raise BenchmarkError(f"MME: {qfile}: each line needs question_id, image, text; got {sorted(r)}")
            questions.append(Question(r["question_id"], with_suffix(r["text"], SHORT_ANSWER_SUFFIX),
                                      image=os.path.join(release, r["image"])))
        return questions
    return _questions_from_folders(release)


def _questions_from_folders(release: str) -> list[Question]:
    """LLaVA's question text: MME's question without "Please answer yes or no." + the short-answer suffix."""
    questions = []
    for (category, file, official), _ in ground_truth(release).items():
        image_dir, _ = _subtask_dirs(release, category)
        stem = file[:-len(".txt")]
        image = next((stem + e for e in IMAGE_EXTS if os.path.isfile(os.path.join(image_dir, stem + e))), None)
        if image is None:
            raise BenchmarkError(f"MME: no image {stem}.png|.jpg in {image_dir} for {file}")
        rel = os.path.relpath(os.path.join(image_dir, image), release).replace(os.sep, "/")
        base = official.replace(OFFICIAL_SUFFIX, "").strip()
        questions.append(Question(rel, base + "\n" + SHORT_ANSWER_SUFFIX, image=os.path.join(release, rel)))
    return questions


def validate(data_dir: str, questions: list[Question]) -> None:
    """What score will read besides the answers: a ground-truth line for every question."""
    gt = ground_truth(release_dir(data_dir))
    for q in questions:
        category, file = _locate(str(q.question_id))
        if (category, file, official_question(gt, category, file, q.logged_prompt)) not in gt:
            raise BenchmarkError(f"MME: no ground truth for question {q.question_id} ({q.logged_prompt[:60]!r}) in "
                                 f"{release_dir(data_dir)}/{category}/")


# ----------------------------------------------------------------------------- scoring

def parse_pred(pred: str) -> str:
    """calculation.py parse_pred_ans (after its .lower()): exact yes/no, else look at the first 4 chars."""
    pred = pred.lower()
    if pred in ("yes", "no"):
        return pred
    head = pred[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def score_rows(rows: list[tuple[str, str, str]]) -> dict:
    """rows: (image key, gt, prediction text). acc over questions; acc+ over images whose questions are
    all right (calculation.py pairs lines two by two, which is the same grouping for its files)."""
    by_image = collections.defaultdict(list)
    correct = other = 0
    for image, gt, pred in rows:
        label = parse_pred(pred)
        ok = label == gt.lower()
        correct += ok
        other += label == "other"
        by_image[image].append(ok)
    n = len(rows)
    acc = correct / n if n else 0.0
    acc_plus = sum(all(v) and len(v) >= 2 for v in by_image.values()) / len(by_image) if by_image else 0.0
    return {"acc": 100 * acc, "acc_plus": 100 * acc_plus, "score": 100 * acc + 100 * acc_plus,
            "n_questions": n, "n_images": len(by_image), "n_other": other}


def _totals(per_subtask: dict) -> dict:
    out = {}
    for group, names in (("perception", PERCEPTION), ("cognition", COGNITION)):
        present = [t for t in names if t in per_subtask]
        out[group] = sum(per_subtask[t]["score"] for t in present)
        out[f"{group}_subtasks"] = len(present)
    return out


def _result(per_subtask: dict, n_questions: int, n_answered: int, notes: list, files: dict) -> Result:
    totals = _totals(per_subtask)
    for group, names in (("perception", PERCEPTION), ("cognition", COGNITION)):
        if totals[f"{group}_subtasks"] < len(names):
            notes.append(f"{group}: only {totals[f'{group}_subtasks']} of {len(names)} subtasks present; "
                         "the total is not comparable to published numbers")
    return Result(NAME, "perception (sum of 10 subtask scores, max 2000)", totals["perception"],
                  {"perception": totals["perception"], "cognition": totals["cognition"], "subtasks": per_subtask},
                  {t: s["score"] for t, s in per_subtask.items()}, "score (acc + acc+, max 200)",
                  n_questions, n_answered, notes, files)


def evaluate(answers: list[dict], data_dir: str, out_dir: str, judge=None) -> Result:
    release = release_dir(data_dir)
    gt = ground_truth(release)
    questions = load_questions(data_dir)
    by_key = {record_key(a): a for a in answers}
    per_category = collections.defaultdict(list)       # in question-file order, like LLaVA's answer file
    missing = 0
    for q in questions:
        a = by_key.get(q.key)
        if a is None:
            missing += 1
            continue
        category, file = _locate(str(q.question_id))
        official = official_question(gt, category, file, a["prompt"])
        if (category, file, official) not in gt:
            raise BenchmarkError(f"MME: no ground truth for ({category}, {file}, {official!r}) in {release}")
        # WHY normalise: a tab or newline in an answer would break calculation.py's line format.
        text = " ".join(a["text"].split())
        per_category[category].append((file, official, gt[(category, file, official)], text))
    result_dir = os.path.join(out_dir, "mme_results")
    os.makedirs(result_dir, exist_ok=True)
    for category, tups in per_category.items():
        with open(os.path.join(result_dir, f"{category}.txt"), "w", encoding="utf-8") as f:
            f.writelines("\t".join(t) + "\n" for t in tups)
    per_subtask = {c: score_rows([(t[0], t[2], t[3]) for t in tups]) for c, tups in per_category.items()}
    notes = [f"{missing} of {len(questions)} questions unanswered (left out of acc; their images do not "
             "count as acc+ correct)"] if missing else []
    return _result(per_subtask, len(questions), len(questions) - missing, notes,
                   {"mme_results": result_dir})


def read_result_dir(path: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """An eval_tool answers folder (<subtask>.txt with 'image<TAB>question<TAB>gt<TAB>pred' lines),
    grouped two lines per image as calculation.py does."""
    out = []
    for category in PERCEPTION + COGNITION:
        path_txt = os.path.join(path, category + ".txt")
        if not os.path.isfile(path_txt):
            continue
        rows = []
        with open(path_txt, encoding="utf-8") as f:
            for n, line in enumerate(f):
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 4:
                    raise BenchmarkError(f"MME: {path_txt}:{n + 1}: expected 4 tab-separated fields")
                rows.append((str(n // 2), parts[2], parts[3]))
        out.append((category, rows))
    if not out:
        raise BenchmarkError(f"MME: expected <subtask>.txt result files in {path}")
    return out


def score_result_dir(path: str) -> Result:
    per_subtask = {c: score_rows(rows) for c, rows in read_result_dir(path)}
    n = sum(s["n_questions"] for s in per_subtask.values())
    return _result(per_subtask, n, n, [], {"mme_results": path})
