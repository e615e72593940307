"""Catastrophic-forgetting suite: label matching, folder layout, optional yes/no judge (docs/REFERENCE.md §5.7)."""
import os

import pytest
from PIL import Image

from tests.eval.fake_judge import fake_judge, write_config
from vflan_jax.eval import forgetting
from vflan_jax.eval.benchmark import BenchmarkError
from vflan_jax.eval.judge import make_judge


def names(dataset, folder, extra=None):
    return forgetting.class_names(dataset, folder, extra or {})


@pytest.mark.parametrize("prediction,dataset,folder,ok", [
    ("It is an airplane.", "cifar10", "airplane", True),
    ("a plane", "cifar10", "airplane", True),                  # synonym
    ("Car", "cifar10", "automobile", True),
    ("cats", "cifar10", "cat", True),                          # plural
    ("category", "cifar10", "cat", False),                     # whole words only
    ("a dog", "cifar10", "cat", False),
    ("Maple tree", "cifar100", "maple_tree", True),
    ("maple", "cifar100", "maple_tree", True),
    ("7", "mnist", "7 - seven", True),
    ("Seven", "mnist", "7", True),
    ("17", "mnist", "7", False),
    ("house finch", "miniimagenet", "n01532829", True),        # via class_names.json
])
def test_label_matching(prediction, dataset, folder, ok):
    extra = {"n01532829": ["house finch", "linnet"]}
    assert forgetting.matches(prediction, names(dataset, folder, extra)) is ok


def _write(root):
    layout = {"CIFAR-10": ["cat", "airplane"], "mnist": ["3"]}
    for dataset, classes in layout.items():
        for c in classes:
            os.makedirs(root / dataset / c)
            for i in range(2):
                Image.new("RGB", (8, 8)).save(root / dataset / c / f"{i}.png")


def test_evaluate_matching_and_judge(tmp_path, monkeypatch):
    _write(tmp_path / "data")
    questions = forgetting.load_questions(str(tmp_path / "data"))
    assert len(questions) == 6
    assert [q.metadata["dataset"] for q in questions[:3]] == ["cifar10", "cifar10", "mnist"]   # round robin
    assert questions[2].prompt == "What is the number in the image?\nAnswer the question using a single word or phrase."
    texts = {"cifar10/cat/0.png": "A cat", "cifar10/cat/1.png": "a kitten", "cifar10/airplane/0.png": "jet",
             "cifar10/airplane/1.png": "bird", "mnist/3/0.png": "3", "mnist/3/1.png": "8"}
    answers = [{"question_id": q.question_id, "prompt": q.prompt, "text": texts[q.question_id]} for q in questions]
    result = forgetting.evaluate(answers, str(tmp_path / "data"), str(tmp_path / "out"))
    datasets = result.metrics["datasets"]
    assert datasets["cifar10"]["match_acc"] == 50 and datasets["mnist"]["match_acc"] == 50
    assert result.headline == 50

    def reply(body):   # the judge also accepts "kitten" for cat; says "maybe" once
        content = body["messages"][0]["content"]
        pred = content.split("Model answer: ")[1].split("\n")[0]
        return {"A cat": "Yes.", "a kitten": "yes", "jet": "yes", "bird": "No", "3": "yes", "8": "maybe"}[pred]

    with fake_judge(reply) as server:
        judge = make_judge(write_config(tmp_path / "j.json", server.base_url))
        judged = forgetting.evaluate(answers, str(tmp_path / "data"), str(tmp_path / "out"), judge)
        assert "Authorization" not in server.requests[0]["headers"]        # no api_key_env: no key sent
    ds = judged.metrics["datasets"]
    assert ds["cifar10"]["judge_acc"] == 75 and ds["mnist"]["judge_acc"] == 50 and ds["mnist"]["judge_unparseable"] == 1
    assert judged.headline == pytest.approx((75 + 50) / 2)


def test_missing_layout(tmp_path):
    with pytest.raises(BenchmarkError, match="<dataset>/<class_name>"):
        forgetting.load_questions(str(tmp_path))
