"""MMMU validation (docs/REFERENCE.md §5.6): 30 subjects, multiple-choice and open questions, scored by MMMU's rules.

Data: the MMMU/MMMU dataset as downloaded, D/<Subject>/validation-*.parquet (columns id, question,
options, answer, question_type, image_1..image_7, ...), for the 30 subjects of mmmu_rules.SUBJECTS.
Prompts as MMMU's configs/llava1.5.yaml read by run_llava.py; the question text is kept as is,
"<image 1>" placeholders included, and image_1 is the image. A question with more than one image
among its options gets no image and is not asked (MMMU's run path; see docs/EVALUATION.md).

Writes R/mmmu_outputs/<Subject>/output.json in MMMU's own format (id, question_type, answer,
all_choices, index2ans, response), which MMMU's main_parse_and_eval.py reads; `score` accepts
such a folder as --predictions.
"""
from __future__ import annotations

import ast
import functools
import glob
import io
import json
import os
import random
import re

from vflan_jax.eval import mmmu_rules as rules
from vflan_jax.eval.benchmark import (
    MULTIPLE_CHOICE_SUFFIX,
    SHORT_ANSWER_SUFFIX,
    BenchmarkError,
    Question,
    Result,
    record_key,
)
from vflan_jax.files import write_json

NAME = "mmmu"
MAX_NEW_TOKENS = 128            # MMMU's call_llava_engine_df
SPLIT = "validation"
COLUMNS = ("id", "question", "options", "answer", "question_type")
# configs/llava1.5.yaml as YAML reads it: the blank lines inside its quoted strings fold to one "\n".
MULTI_CHOICE_FORMAT = "{}\n{}\n" + MULTIPLE_CHOICE_SUFFIX
SHORT_ANSWER_FORMAT = "{}\n" + SHORT_ANSWER_SUFFIX
# model_utils.call_llava_engine_df's answer when a question's options hold several images.
NO_IMAGE_ANSWER = "INVALID GENERATION FOR MULTIPLE IMAGE INPUTS"
INSTALL_HINT = "MMMU's parquet files are read with pyarrow: pip install 'vflan_jax[mmmu]' (pyarrow==26.0.1)"


def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BenchmarkError(INSTALL_HINT) from None
    return pq


def subject_files(data_dir: str) -> dict[str, list[str]]:
    found = {s: sorted(glob.glob(os.path.join(data_dir, s, f"{SPLIT}-*.parquet"))) for s in rules.SUBJECTS}
    found = {s: f for s, f in found.items() if f}
    if not found:
        raise BenchmarkError(f"MMMU: expected {os.path.join(data_dir, '<Subject>', SPLIT + '-*.parquet')} (the "
                             f"MMMU/MMMU dataset's files) for subjects such as {', '.join(rules.SUBJECTS[:3])}; "
                             "none found")
    return found


def read_samples(path: str, columns) -> list[dict]:
    try:
        table = _parquet().read_table(path, columns=list(columns))
    except Exception as e:          # pyarrow raises several types for a missing column or a bad file
        raise BenchmarkError(f"MMMU: {path}: cannot read columns {list(columns)}: {e}") from None
    return table.to_pylist()


@functools.lru_cache(maxsize=1)
def _images_of(path: str) -> tuple:
    """One subject's image_1 bytes (questions come subject by subject: one file in memory at a time)."""
    return tuple((r["image_1"] or {}).get("bytes") for r in read_samples(path, ["image_1"]))


def _image(path: str, row: int):
    from PIL import Image
    return Image.open(io.BytesIO(_images_of(path)[row])).convert("RGB")


def option_list(sample: dict, path: str) -> list[str]:
    """MMMU stores options as a Python list literal (construct_prompt eval()s it)."""
    try:
        options = ast.literal_eval(sample["options"]) if sample["options"] else []
    except (ValueError, SyntaxError):
        raise BenchmarkError(f"MMMU: {path}: {sample['id']}: options {sample['options'][:60]!r} "
                             "is not a list") from None
    return [str(o) for o in options]


def option_images(options: list[str]) -> int:
    """data_utils.parse_img_path over the options: how many <img='...'> references they hold."""
    return sum(len(re.findall("<img='(.*?)'>", o)) for o in options)


def build_prompt(sample: dict, options: list[str]) -> tuple[str, dict]:
    """data_utils.construct_prompt (task_instructions empty): the prompt and MMMU's choice fields."""
    if sample["question_type"] == "multiple-choice":
        letters = [chr(ord("A") + i) for i in range(len(options))]
        example = "".join(f"({letter}) {o}\n" for letter, o in zip(letters, options, strict=True))
        return MULTI_CHOICE_FORMAT.format(sample["question"], example), {
            "all_choices": letters, "index2ans": dict(zip(letters, options, strict=True))}
    return SHORT_ANSWER_FORMAT.format(sample["question"]), {}


def load_questions(data_dir: str, images: bool = True) -> list[Question]:
    questions = []
    for subject, paths in subject_files(data_dir).items():
        for path in paths:
            present = _images_of(path) if images else None
            for row, sample in enumerate(read_samples(path, COLUMNS)):
                options = option_list(sample, path)
                prompt, choice = build_prompt(sample, options)
                # run_llava.py asks nothing without an image: several option images, or (run only) no image_1.
                no_image = option_images(options) > 1 or (images and not present[row])
                questions.append(Question(
                    sample["id"], prompt, image_fn=None if no_image else functools.partial(_image, path, row),
                    fixed_answer=NO_IMAGE_ANSWER if no_image else None,
                    metadata={"subject": subject, "question_type": sample["question_type"],
                              "answer": sample["answer"], **choice}))
    return questions


def output_record(q: Question, response: str) -> dict:
    """One line of MMMU's per-subject output.json."""
    record = {"id": q.question_id, "question_type": q.metadata["question_type"], "answer": q.metadata["answer"]}
    if q.metadata["question_type"] == "multiple-choice":
        record |= {"all_choices": q.metadata["all_choices"], "index2ans": q.metadata["index2ans"]}
    return record | {"response": response}


def score_outputs(outputs: dict[str, list[dict]]) -> dict:
    """main_parse_and_eval.py --subject ALL, then the table main_eval_only.py / print_results.py print."""
    rng = random.Random(rules.SEED)
    results, random_picks = {}, {}
    for subject in rules.SUBJECTS:                      # WHY this order: it decides the random draws
        if subject not in outputs:
            continue
        correct, picks = 0, 0
        for o in outputs[subject]:
            if o["question_type"] == "multiple-choice":
                pred, drawn = rules.parse_multi_choice_response(o["response"], o["all_choices"], o["index2ans"], rng)
                picks += drawn
                correct += rules.eval_multi_choice(o["answer"], pred)
            else:
                correct += rules.eval_open(o["answer"], rules.parse_open_response(o["response"]))
        n = len(outputs[subject])
        results[subject] = {"acc": correct / n if n else 0, "num_example": n}
        random_picks[subject] = picks
    table = {}
    for domain, subjects in rules.DOMAIN_CAT2SUB_CAT.items():
        present = {s: results[s] for s in subjects if s in results}
        table["Overall-" + domain] = {"num": sum(r["num_example"] for r in present.values()),
                                      "acc": round(rules.calculate_ins_level_acc(present), 3)}
        table |= {s: {"num": r["num_example"], "acc": round(r["acc"], 3)} for s, r in present.items()}
    table["Overall"] = {"num": sum(r["num_example"] for r in results.values()),
                        "acc": round(rules.calculate_ins_level_acc(results), 3)}
    return {"table": table, "subjects": results, "random_picks": random_picks,
            "overall_unrounded": rules.calculate_ins_level_acc(results)}


def _result(outputs: dict[str, list[dict]], n_questions: int, notes: list[str], files: dict) -> Result:
    scored = score_outputs(outputs)
    overall = scored["table"]["Overall"]
    picks = sum(scored["random_picks"].values())
    n_mc = sum(o["question_type"] == "multiple-choice" for v in outputs.values() for o in v)
    if picks:
        notes.append(f"{picks} of {n_mc} multiple-choice responses named no option: a seeded random letter was "
                     "drawn, as MMMU's parse_multi_choice_response does")
    if len(outputs) < len(rules.SUBJECTS):
        notes.append(f"{len(outputs)} of {len(rules.SUBJECTS)} subjects present; the overall accuracy is over those")
    headline = round(100 * overall["acc"], 1) if overall["num"] else None
    bars = {k[len("Overall-"):]: 100 * v["acc"] for k, v in scored["table"].items()
            if k.startswith("Overall-") and v["num"]}
    return Result(NAME, "accuracy (%), MMMU's rounding", headline,
                  {**scored, "n_random_picks": picks, "n_multiple_choice": n_mc}, bars, "accuracy (%)",
                  n_questions, sum(len(v) for v in outputs.values()), notes, files)


def evaluate(answers: list[dict], data_dir: str, out_dir: str, judge=None) -> Result:
    questions = load_questions(data_dir, images=False)
    by_key = {record_key(a): a for a in answers}
    outputs: dict[str, list[dict]] = {}
    for q in questions:
        a = by_key.get(q.key)
        if a is not None:
            outputs.setdefault(q.metadata["subject"], []).append(output_record(q, a["text"]))
    root = os.path.join(out_dir, "mmmu_outputs")
    for subject, records in outputs.items():
        write_json(os.path.join(root, subject, "output.json"), records, indent=1, sort_keys=False)
    answered = sum(len(v) for v in outputs.values())
    notes = [f"{len(questions) - answered} of {len(questions)} questions unanswered (not scored)"] if answered < len(
        questions) else []
    no_image = sum(a["text"] == NO_IMAGE_ANSWER for a in by_key.values())
    if no_image:
        notes.append(f"{no_image} questions without a usable image (several option images or no image_1) were "
                     f"not asked: response {NO_IMAGE_ANSWER!r}, as MMMU's runner")
    return _result(outputs, len(questions), notes, {"mmmu_outputs": root})


def read_result_dir(path: str) -> dict[str, list[dict]]:
    """MMMU's output folder: <Subject>/output.json lists with id, question_type, answer, response
    (+ all_choices, index2ans for multiple choice)."""
    outputs = {}
    for subject in rules.SUBJECTS:
        file = os.path.join(path, subject, "output.json")
        if not os.path.isfile(file):
            continue
        try:
            with open(file, encoding="utf-8") as f:
                records = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BenchmarkError(f"MMMU: {file}: not valid JSON: {e}") from None
        for i, r in enumerate(records):
            need = {"id", "question_type", "answer", "response"} | (
                {"all_choices", "index2ans"} if r.get("question_type") == "multiple-choice" else set())
            if not isinstance(r, dict) or not need <= set(r):
                raise BenchmarkError(f"MMMU: {file}: entry {i} needs {sorted(need)}")
        outputs[subject] = records
    if not outputs:
        raise BenchmarkError(f"MMMU: expected <Subject>/output.json files (MMMU's output format) in {path}")
    return outputs


def score_result_dir(path: str) -> Result:
    outputs = read_result_dir(path)
    return _result(outputs, sum(len(v) for v in outputs.values()), [], {"mmmu_outputs": path})
