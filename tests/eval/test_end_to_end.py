"""`python -m vflan_jax.eval run` end to end: a POPE-format benchmark made from the offline task suite's
existence questions, a tiny random model checkpoint, a limited run, then a resumed full run."""
import json
import os
import shutil

import pytest

from vflan_jax.data import synthetic
from vflan_jax.eval.__main__ import main

SUFFIX = "Answer the question using a single word or phrase."
SPLITS = ("adversarial", "popular", "random")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from vflan_jax.checkpoint import save_model
    from vflan_jax.models.config import get_preset
    from vflan_jax.parallel import init_params, make_mesh
    root = tmp_path_factory.mktemp("e2e")
    suite = synthetic.write_task_suite(root / "suite", instances_per_task=6, image_size=56, chat_instances=2)
    synthetic.build_tokenizer(suite.tokenizer_dir, synthetic.suite_texts(suite))
    cfg = get_preset("tiny")
    import jax
    params, _ = init_params(cfg, make_mesh(devices=jax.devices()[:1]), seed=0)   # one device: quicker to compile
    save_model(root / "ckpt", params, cfg, tokenizer_dir=suite.tokenizer_dir)
    return suite, str(root / "ckpt")


def _pope_from_suite(suite, out):
    """llava_pope_test.jsonl + coco/coco_pope_{split}.json + val2014/ from the suite's yes/no questions."""
    records = [r for r in json.load(open(suite.train_json)) if r["task_name"] == synthetic.task_name("existence")]
    os.makedirs(out / "val2014")
    os.makedirs(out / "coco")
    by_split = {s: [] for s in SPLITS}
    for i, r in enumerate(records):
        by_split[SPLITS[i % 3]].append((i, r))
    with open(out / "llava_pope_test.jsonl", "w") as qf:
        for split, items in by_split.items():
            with open(out / "coco" / f"coco_pope_{split}.json", "w") as af:
                for i, r in items:
                    shutil.copy(os.path.join(suite.image_folder, r["image"]), out / "val2014" / r["image"])
                    human = r["conversations"][0]["value"].replace("<image>", "").strip()
                    question = human.replace("Answer yes or no. ", "")
                    qf.write(json.dumps({"question_id": i, "image": r["image"], "text": question + "\n" + SUFFIX,
                                         "category": split}) + "\n")
                    af.write(json.dumps({"question_id": i, "image": r["image"], "text": question,
                                         "label": r["conversations"][1]["value"]}) + "\n")
    return len(records)


def test_run_limit_then_resume(tiny_checkpoint, tmp_path, capsys):
    suite, ckpt = tiny_checkpoint
    n = _pope_from_suite(suite, tmp_path / "pope")
    out = tmp_path / "results"
    args = ["run", "--benchmark", "pope", "--checkpoint", ckpt, "--data_dir", str(tmp_path / "pope"),
            "--out", str(out), "--batch_size", "4", "--max_new_tokens", "3"]
    assert main(args + ["--limit", "3"]) == 0                   # an "interrupted" run: 3 answers only
    first = [json.loads(line) for line in open(out / "answers.jsonl")]
    assert len(first) == 3 and all(set(a) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
                                   for a in first)
    assert first[0]["prompt"].endswith("\n" + SUFFIX) and first[0]["model_id"] == "ckpt"
    assert main(args) == 0                                       # resumes: only the other n - 3 are asked
    answers = [json.loads(line) for line in open(out / "answers.jsonl")]
    assert len(answers) == n and [a["answer_id"] for a in answers[:3]] == [a["answer_id"] for a in first]
    assert len({a["question_id"] for a in answers}) == n
    report = json.load(open(out / "report.json"))
    assert report["benchmark"] == "pope" and report["n_answered"] == n and report["headline"] is not None
    assert set(report["metrics"]["splits"]) == set(SPLITS)
    assert os.path.getsize(out / "report.png") > 0 and "F1 averaged" in open(out / "report.md").read()
    assert f"pope: {n} questions, 3 already answered" in capsys.readouterr().out
    # score alone reproduces run's numbers
    assert main(["score", "--benchmark", "pope", "--predictions", str(out / "answers.jsonl"), "--annotations",
                 str(tmp_path / "pope"), "--out", str(tmp_path / "s"), "--json"]) == 0
    assert json.load(open(tmp_path / "s" / "report.json"))["metrics"] == report["metrics"]
