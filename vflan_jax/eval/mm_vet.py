"""MM-Vet (docs/REFERENCE.md §5.5): open answers graded 0..1 against the ground truth by a judge.

Data layout (LLaVA's playground/data/eval/mm-vet + MM-Vet's release):
    D/llava-mm-vet.jsonl    LLaVA's question file (question_id, image, text)
    D/mm-vet.json           MM-Vet annotations {"v1_<n>": {question, answer, capability: [...], imagename}}
    D/images/               images
Writes R/mm-vet_results.json ({"v1_<qid>": answer}, LLaVA's convert_mmvet_for_eval.py), the file
MM-Vet's official evaluator takes. Grading repeats the official evaluator's few-shot prompt,
max_tokens 3, retries at temperature 0, 0.5, 1.0, 1.5, score 0 after 5 failed parses.
Only `run` needs images/; scoring reads none.
"""
from __future__ import annotations

import collections
import json
import os

from vflan_jax.eval.benchmark import BenchmarkError, Question, Result, files_with_images, pct, record_key
from vflan_jax.eval.jsonl import read_jsonl
from vflan_jax.eval.judge import ReviewLog, request_body, review_key, write_pending_requests
from vflan_jax.files import write_json

NAME = "mm_vet"
MAX_NEW_TOKENS = 1024
JUDGE_MODEL = "gpt-4-0613"
JUDGE_MAX_TOKENS = 3
MAX_TRIES = 5
CAPABILITIES = ("rec", "ocr", "know", "gen", "spat", "math")
RETRY_SUFFIX = "\nPredict the correctness of the answer (digit): "
FEW_SHOT = """Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. <AND> in the ground truth means it is totally right only when all elements in the ground truth are present in the prediction, and <OR> means it is totally right when any one element in the ground truth is present in the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right). Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme talks about Iceland and Greenland. It's pointing out that despite their names, Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme is using humor to point out the misleading nature of Iceland's and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that these contradictions can lead to distrust or confusion. The humor in this meme is derived from the unexpected contrast between the names of the countries and their actual physical characteristics. | 1.0
"""


def _files(data_dir: str, images: bool = True) -> dict[str, str]:
    return files_with_images(data_dir, "MM-Vet", {
        "questions": ("llava-mm-vet.jsonl", "LLaVA's MM-Vet question file"),
        "annotations": ("mm-vet.json", "MM-Vet's annotations with answer and capability")}, images)


def load_questions(data_dir: str, images: bool = True) -> list[Question]:
    files = _files(data_dir, images)
    out = []
    for r in read_jsonl(files["questions"], "LLaVA's MM-Vet question file"):
        if not {"question_id", "image", "text"} <= set(r):
            raise BenchmarkError(f"MM-Vet: {files['questions']}: each line needs question_id, image, text")
        out.append(Question(r["question_id"], r["text"], image=os.path.join(files["images"], r["image"])))
    return out


def read_annotations(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            annotations = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BenchmarkError(f"MM-Vet: {path}: not valid JSON: {e}") from None
    bad = [k for k, v in annotations.items() if not (isinstance(v, dict) and {"question", "answer"} <= set(v))]
    if bad:
        raise BenchmarkError(f"MM-Vet: {path}: entries need question and answer; {bad[:5]} do not")
    return annotations


def validate(data_dir: str, questions: list[Question]) -> None:
    """What score will read besides the answers: an annotation per question."""
    annotations = read_annotations(_files(data_dir, images=False)["annotations"])
    unknown = [f"v1_{q.question_id}" for q in questions if f"v1_{q.question_id}" not in annotations]
    if unknown:
        raise BenchmarkError(f"MM-Vet: {_files(data_dir, images=False)['annotations']} has no entry for {unknown[:5]}")


def grader_prompt(question: str, answer: str, prediction: str) -> str:
    gt = answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    return FEW_SHOT + "\n" + " | ".join([question, gt, prediction, ""])


def parse_grade(content: str) -> float | None:
    """Official: the first space-separated token as a float in [0, 1], else None (retry)."""
    try:
        score = float(content.split(" ")[0].strip())
    except ValueError:
        return None
    return score if 0.0 <= score <= 1.0 else None


def grade(judge, prompt: str) -> tuple[float | None, list[str]]:
    """(score or None when never parseable, raw outputs) with the official evaluator's retry schedule."""
    temperature, max_tokens = judge.resolve(0.0, JUDGE_MAX_TOKENS)
    raw = [judge.chat([{"role": "user", "content": prompt}], temperature, max_tokens)]
    score = parse_grade(raw[-1])
    while score is None and len(raw) < MAX_TRIES:
        # Official order: a retry is sent, then its temperature raised (its 6th, unparsed call is skipped).
        raw.append(judge.chat([{"role": "user", "content": prompt + RETRY_SUFFIX}], temperature, max_tokens))
        temperature += 0.5
        score = parse_grade(raw[-1])
    return score, raw


def read_predictions(path: str) -> list[dict]:
    """LLaVA answer JSONL, or the official {"v1_<qid>": text} results JSON."""
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
        return [{"question_id": int(k[3:]) if k[3:].isdigit() else k[3:], "text": v, "v1_key": k}
                for k, v in results.items()]
    return read_jsonl(path, "LLaVA answer file")


def evaluate(answers: list[dict], data_dir: str, out_dir: str, judge=None) -> Result:
    files = _files(data_dir, images=False)
    annotations = read_annotations(files["annotations"])
    questions = load_questions(data_dir, images=False)
    by_key = {record_key(a): a for a in answers}
    by_id = {str(a["question_id"]): a for a in answers if "v1_key" in a}   # results-JSON input has no prompt
    answered = {}
    for q in questions:
        a = by_key.get(q.key) or by_id.get(str(q.question_id))
        if a is not None:
            answered[f"v1_{q.question_id}"] = a["text"]
    results_path = os.path.join(out_dir, "mm-vet_results.json")
    write_json(results_path, answered, indent=1, sort_keys=False)
    missing = len(questions) - len(answered)
    notes = [f"{missing} of {len(questions)} questions unanswered (not graded)"] if missing else []
    unknown = [k for k in answered if k not in annotations]
    if unknown:
        raise BenchmarkError(f"MM-Vet: {files['annotations']} has no entry for {unknown[:5]}")
    prompts = {k: grader_prompt(annotations[k]["question"], annotations[k]["answer"], v) for k, v in answered.items()}
    files_out = {"results": results_path}
    if judge is None:
        path = os.path.join(out_dir, "mm_vet_judge_requests.jsonl")
        write_pending_requests(path, [{"key": k, **request_body(JUDGE_MODEL, [{"role": "user", "content": p}], 0.0,
                                                                JUDGE_MAX_TOKENS)} for k, p in prompts.items()])
        notes.append("scores pending: no judge configured (--judge_config); judge requests written "
                     "(or run MM-Vet's official evaluator on mm-vet_results.json)")
        return Result(NAME, "total (%)", None, {}, {}, n_questions=len(questions), n_answered=len(answered),
                      notes=notes, files=files_out | {"judge_requests": path})
    cache = ReviewLog(os.path.join(out_dir, "mm_vet_judge_cache.jsonl"))
    temperature, max_tokens = judge.resolve(0.0, JUDGE_MAX_TOKENS)

    def review(k):
        score, raw = grade(judge, prompts[k])
        return {"key": k, "score": 0.0 if score is None else score, "parsed": score is not None, "raw": raw}

    items = [(review_key(judge, k, answered[k], [{"role": "user", "content": p}], temperature, max_tokens), k)
             for k, p in prompts.items()]
    grades = dict(zip(prompts, cache.review_all(items, review, desc="judge mm_vet"), strict=True))
    notes.append(cache.note())
    scores = {k: g["score"] for k, g in grades.items()}
    per_cap = collections.defaultdict(list)
    no_capability = [k for k in scores if not annotations[k].get("capability")]
    for k, s in scores.items():
        for cap in annotations[k].get("capability") or []:
            per_cap[cap].append(s)
    if no_capability:
        notes.append(f"{len(no_capability)} of {len(scores)} graded questions have no 'capability' in "
                     f"{files['annotations']} (e.g. {no_capability[0]}): capability scores "
                     f"{'cover the others only' if per_cap else 'cannot be computed'}")
    failures = sum(not g["parsed"] for g in grades.values())
    if failures:
        notes.append(f"{failures} answers ungradeable after {MAX_TRIES} judge tries, scored 0 as the official "
                     "evaluator does")
    total = pct(sum(scores.values()), len(scores)) if scores else None
    capabilities = {c: pct(sum(v), len(v)) for c, v in sorted(per_cap.items(), key=lambda kv: _cap_order(kv[0]))}
    return Result(NAME, "total (%)", total, {"total": total, "capabilities": capabilities,
                                             "n_ungradeable": failures, "n_without_capability": len(no_capability),
                                             "judge": cache.counts()},
                  {"total": total, **capabilities} if total is not None else {}, "%", len(questions),
                  len(answered), notes, files_out | {"judge_cache": cache.path})


def _cap_order(cap: str) -> int:
    return CAPABILITIES.index(cap) if cap in CAPABILITIES else len(CAPABILITIES)
