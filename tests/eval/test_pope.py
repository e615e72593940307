"""POPE scoring against hand-worked numbers (docs/REFERENCE.md §5.2; LLaVA's eval_pope.py rules)."""
import json
import os
import random

import pytest

from vflan_jax.eval import pope
from vflan_jax.eval.benchmark import BenchmarkError

SUFFIX = "\nAnswer the question using a single word or phrase."
# split -> [(label, prediction)]
CASES = {
    "adversarial": [("yes", "Yes"), ("no", "No, there is not."), ("yes", "Yes, there is a dog. No cat."),
                    ("no", "not sure")],
    "popular": [("yes", "There is no dog"), ("yes", "Nope"), ("no", "yes"), ("no", "No")],  # "Nope" is not "No"
    "random": [("yes", "No,there"), ("no", "Yes")],          # "No,there" -> "Nothere": not a no-word -> yes
}


def _write(root):
    os.makedirs(root / "val2014")
    os.makedirs(root / "coco")
    qid, answers = 0, []
    with open(root / pope.QUESTION_FILE, "w") as qf:
        for split, cases in CASES.items():
            with open(root / "coco" / f"coco_pope_{split}.json", "w") as af:
                for label, pred in cases:
                    qid += 1
                    text = f"Is there a thing{qid} in the image?" + SUFFIX
                    qf.write(json.dumps({"question_id": qid, "image": f"{qid}.jpg", "text": text,
                                         "category": split}) + "\n")
                    af.write(json.dumps({"question_id": qid, "image": f"{qid}.jpg", "text": text[:-len(SUFFIX)],
                                         "label": label}) + "\n")
                    answers.append({"question_id": qid, "prompt": text, "text": pred})
    return answers


def test_per_split_metrics_and_f1_average(tmp_path):
    answers = _write(tmp_path)
    result = pope.evaluate(answers, str(tmp_path), str(tmp_path / "out"))
    s = result.metrics["splits"]
    # adversarial: preds yes,no,yes,no == labels -> perfect
    assert (s["adversarial"]["acc"], s["adversarial"]["f1"]) == (100, 100)
    # popular: preds no,yes,yes,no vs yes,yes,no,no -> TP1 FN1 FP1 TN1
    assert s["popular"]["acc"] == 50 and s["popular"]["precision"] == 50 and s["popular"]["recall"] == 50
    assert s["popular"]["f1"] == pytest.approx(50) and s["popular"]["yes_ratio"] == 50
    # random: preds yes,yes vs yes,no -> TP1 FP1: P 0.5, R 1, F1 2/3
    assert s["random"]["f1"] == pytest.approx(100 * 2 * 0.5 * 1 / 1.5)
    assert s["random"]["yes_ratio"] == 100
    assert result.headline == pytest.approx((100 + 50 + 200 / 3) / 3)


def test_parse_answer_rules():
    assert [pope.parse_answer(t) for t in ("No, there is", "There is not a cat", "no.", "Yes. No", "Nope", "NO")] \
        == ["no", "no", "no", "yes", "yes", "yes"]


def test_answers_are_aligned_by_question_not_file_order(tmp_path):
    answers = _write(tmp_path)
    shuffled = answers[:]
    random.Random(0).shuffle(shuffled)
    a = pope.evaluate(answers, str(tmp_path), str(tmp_path / "o1"))
    b = pope.evaluate(shuffled, str(tmp_path), str(tmp_path / "o2"))
    assert a.metrics == b.metrics


def test_partial_answers_are_reported(tmp_path):
    answers = _write(tmp_path)
    result = pope.evaluate(answers[:4], str(tmp_path), str(tmp_path / "out"))
    assert list(result.metrics["splits"]) == ["adversarial"] and result.n_answered == 4
    assert any("unanswered" in n for n in result.notes)


def test_missing_files(tmp_path):
    with pytest.raises(BenchmarkError, match="llava_pope_test.jsonl"):
        pope.load_questions(str(tmp_path))
    _write(tmp_path)
    os.remove(tmp_path / "coco" / "coco_pope_random.json")
    with pytest.raises(BenchmarkError, match="coco_pope_random.json"):
        pope.evaluate([], str(tmp_path), str(tmp_path / "out"))
