"""LLaVA-Bench (in-the-wild) (docs/REFERENCE.md §5.4): open answers rated against GPT-4's by a judge.

Data layout (LLaVA's playground/data/eval/llava-bench-in-the-wild):
    D/questions.jsonl       question_id, image, text, category (conv | detail | complex)
    D/context.jsonl         image, caption (str or list) - the judge's view of the image
    D/answers_gpt4.jsonl    question_id, text - the reference answers ("Assistant 1")
    D/images/               images
    D/rule.json             optional: LLaVA's llava/eval/table/rule.json (else the built-in copy)
Judging is eval_gpt_review_bench.py; summarising is summarize_gpt_review.py: relative score =
round(mean(model score), 3) / round(mean(reference score), 3) * 100, rounded to 1 decimal, with
failed parses kept as [-1, -1] as there. Only `run` needs images/; scoring reads none.
"""
from __future__ import annotations

import collections
import json
import os

import numpy as np

from vflan_jax.eval.benchmark import BenchmarkError, Question, Result, files_with_images, record_key
from vflan_jax.eval.jsonl import read_jsonl, write_jsonl
from vflan_jax.eval.judge import ReviewLog, request_body, review_key, write_pending_requests

NAME = "llava_bench"
MAX_NEW_TOKENS = 1024
JUDGE_MODEL = "gpt-4-0314"
JUDGE_TEMPERATURE = 0.2
JUDGE_MAX_TOKENS = 1024
SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
RULE_PROMPT = (  # llava/eval/table/rule.json, identical for llava_bench_{conv,detail,complex}
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above. The user asks the question on observing an image. For your reference, the visual "
    "content in the image is represented with a few sentences describing the image. \nPlease rate the helpfulness,"
    " relevance, accuracy, level of details of their responses. Each assistant receives an overall score on a "
    "scale of 1 to 10, where a higher score indicates better overall performance.\nPlease first output a single "
    "line containing only two values indicating the scores for Assistant 1 and 2, respectively. The two scores "
    "are separated by a space.\nIn the subsequent line, please provide a comprehensive explanation of your "
    "evaluation, avoiding any potential bias and ensuring that the order in which the responses were presented "
    "does not affect your judgment.")


def _files(data_dir: str, images: bool = True) -> dict[str, str]:
    return files_with_images(data_dir, "LLaVA-Bench", {
        "questions": ("questions.jsonl", "question file"), "context": ("context.jsonl", "image captions"),
        "reference": ("answers_gpt4.jsonl", "GPT-4 reference answers")}, images)


def load_questions(data_dir: str, images: bool = True) -> list[Question]:
    files = _files(data_dir, images)
    questions = []
    for r in read_jsonl(files["questions"], "LLaVA-Bench questions"):
        if not {"question_id", "image", "text", "category"} <= set(r):
            raise BenchmarkError(f"LLaVA-Bench: {files['questions']}: each line needs question_id, image, text, "
                                 f"category; got {sorted(r)}")
        questions.append(Question(r["question_id"], r["text"], image=os.path.join(files["images"], r["image"]),
                                  metadata={"category": r["category"], "image_name": r["image"]}))
    return questions


def rules(data_dir: str) -> dict[str, dict]:
    path = os.path.join(data_dir, "rule.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return {f"llava_bench_{c}": {"role": "Assistant", "prompt": RULE_PROMPT} for c in ("conv", "detail", "complex")}


def judge_content(caption, question: str, reference: str, answer: str, rule: dict) -> str:
    cap = "\n".join(caption) if isinstance(caption, list) else caption
    role = rule["role"]
    return (f"[Context]\n{cap}\n\n[Question]\n{question}\n\n[{role} 1]\n{reference}\n\n[End of {role} 1]\n\n"
            f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n[System]\n{rule['prompt']}\n\n")


def parse_score(review: str) -> list[float]:
    """eval_gpt_review_bench.parse_score: first line, commas -> spaces, exactly two numbers, else [-1, -1]."""
    try:
        parts = review.split("\n")[0].replace(",", " ").split(" ")
        return [float(parts[0]), float(parts[1])] if len(parts) == 2 else [-1, -1]
    except (ValueError, IndexError):
        return [-1, -1]


def build_requests(answers: list[dict], data_dir: str) -> tuple[list[dict], int]:
    """One judge request per answered question: (request dicts with key/category/messages, #unanswered)."""
    files = _files(data_dir, images=False)
    context = {c["image"]: c for c in read_jsonl(files["context"], "LLaVA-Bench context")}
    reference = {str(r["question_id"]): r for r in read_jsonl(files["reference"], "LLaVA-Bench references")}
    rule_table = rules(data_dir)
    by_key = {record_key(a): a for a in answers}
    requests, missing = [], 0
    for i, q in enumerate(load_questions(data_dir, images=False)):
        a = by_key.get(q.key)
        if a is None:
            missing += 1
            continue
        category = "llava_bench_" + q.metadata["category"]
        image = q.metadata["image_name"]
        if image not in context or str(q.question_id) not in reference or category not in rule_table:
            raise BenchmarkError(f"LLaVA-Bench: question {q.question_id}: needs a context.jsonl line for {image}, a "
                                 f"reference answer in answers_gpt4.jsonl and rule {category}")
        ref = reference[str(q.question_id)]
        content = judge_content(context[image]["caption"], q.prompt, ref["text"], a["text"], rule_table[category])
        requests.append({"key": str(q.question_id), "id": i + 1, "question_id": q.question_id,
                         "answer1_id": ref.get("answer_id", ref["question_id"]),
                         "answer2_id": a.get("answer_id", a["question_id"]), "category": category, "answer": a["text"],
                         "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]})
    return requests, missing


def validate(data_dir: str, questions: list[Question]) -> None:
    """What score will read besides the answers: a caption, a reference answer and a rule per question."""
    build_requests([{"question_id": q.question_id, "prompt": q.logged_prompt, "text": ""} for q in questions],
                   data_dir)


def summarize(reviews: list[dict]) -> dict:
    """summarize_gpt_review.py: per category and 'all', the mean of each score (failures included as
    -1) rounded to 3 decimals, then round(model / reference * 100, 1); the unrounded ratio beside it."""
    scores = collections.defaultdict(list)
    for r in reviews:
        scores[r["category"]].append(r["tuple"])
        scores["all"].append(r["tuple"])
    out = {}
    for k, v in sorted(scores.items()):
        ref, model = np.asarray(v, dtype=np.float64).mean(0).tolist()
        ref3, model3 = round(ref, 3), round(model, 3)
        out[k] = {"relative": round(model3 / ref3 * 100, 1) if ref3 else None,
                  "relative_unrounded": 100 * model / ref if ref else None,
                  "reference_x10": 10 * ref, "model_x10": 10 * model,
                  "n": len(v), "n_parse_failures": sum(t == [-1, -1] for t in v)}
    return out


def evaluate(answers: list[dict], data_dir: str, out_dir: str, judge=None) -> Result:
    requests, missing = build_requests(answers, data_dir)
    n_questions = len(requests) + missing
    notes = [f"{missing} of {n_questions} questions unanswered (not judged)"] if missing else []
    if judge is None:
        path = os.path.join(out_dir, "llava_bench_judge_requests.jsonl")
        write_pending_requests(path, [{"question_id": r["question_id"], "category": r["category"],
                                       **request_body(JUDGE_MODEL, r["messages"], JUDGE_TEMPERATURE,
                                                      JUDGE_MAX_TOKENS)} for r in requests])
        notes.append("scores pending: no judge configured (--judge_config); judge requests written")
        return Result(NAME, "relative score (%)", None, {}, {}, n_questions=n_questions,
                      n_answered=len(requests), notes=notes, files={"judge_requests": path})
    cache = ReviewLog(os.path.join(out_dir, "llava_bench_judge_cache.jsonl"))
    temperature, max_tokens = judge.resolve(JUDGE_TEMPERATURE, JUDGE_MAX_TOKENS)

    def review(r):
        content = judge.chat(r["messages"], temperature, max_tokens)
        return {"content": content, "tuple": parse_score(content)}

    items = [(review_key(judge, r["key"], r["answer"], r["messages"], temperature, max_tokens), r) for r in requests]
    cached = cache.review_all(items, review, desc="judge llava_bench")
    # This scoring's reviews alone, in LLaVA's review-file fields: summarize_gpt_review.py -f reads it as is.
    reviews = [{k: r[k] for k in ("id", "question_id", "answer1_id", "answer2_id", "category")}
               | {"content": c["content"], "tuple": c["tuple"]} for r, c in zip(requests, cached, strict=True)]
    review_path = os.path.join(out_dir, "llava_bench_reviews.jsonl")
    write_jsonl(review_path, reviews)
    notes.append(cache.note())
    summary = summarize(reviews) if reviews else {}
    failures = sum(r["tuple"] == [-1, -1] for r in reviews)
    if failures:
        notes.append(f"{failures} judge outputs unparseable, kept as [-1, -1] as the official summary does")
    headline = summary["all"]["relative"] if summary else None
    return Result(NAME, "relative score (%)", headline,
                  {"summary": summary, "n_parse_failures": failures, "judge": cache.counts()},
                  {k: v["relative"] for k, v in summary.items() if v["relative"] is not None}, "relative score (%)",
                  n_questions, len(requests), notes, {"reviews": review_path, "judge_cache": cache.path})
