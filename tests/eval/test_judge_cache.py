"""Judge reviews are reused only for the same question, answer text, judge and prompt (issue 14
defect 1); `score` reads no image (defect 2); LLaVA-Bench's official rounding (defect 3); MM-Vet
without capabilities says so (defect 4)."""
import json
import os
import shutil

import pytest

from tests.eval.fake_judge import fake_judge, write_config
from tests.eval.test_judged import MMVET, _write_llava_bench, _write_mm_vet
from vflan_jax.eval import llava_bench
from vflan_jax.eval.__main__ import main

DONT_KNOW = "I do not know."


def _lb_reply(body):
    """Scores follow the answer: a model that does not know gets 2, a real answer 8 (the reference 9)."""
    return "9 2\nweak" if f"[Assistant 2]\n{DONT_KNOW}\n" in body["messages"][1]["content"] else "9 8\ngood"


def _mmvet_reply(body):
    return "0.0" if f"| {DONT_KNOW} |" in body["messages"][0]["content"] else "1.0"


def _answer_files(folder, answers):
    """LLaVA's layout: answers/<model>.jsonl, a good model and one that knows nothing."""
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for model, text in (("good", None), ("blank", DONT_KNOW)):
        paths[model] = str(folder / f"{model}.jsonl")
        with open(paths[model], "w") as f:
            f.writelines(json.dumps({**a, "text": text or a["text"]}) + "\n" for a in answers)
    return paths


def _score(benchmark, predictions, data, config, out, capsys):
    assert main(["score", "--benchmark", benchmark, "--predictions", predictions, "--annotations", str(data),
                 "--judge_config", config, "--out", str(out), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("benchmark", ["llava_bench", "mm_vet"])
def test_two_answer_files_into_one_folder_get_their_own_scores(benchmark, tmp_path, capsys):
    write, reply = (_write_llava_bench, _lb_reply) if benchmark == "llava_bench" else (_write_mm_vet, _mmvet_reply)
    answers = write(tmp_path / "data")
    paths = _answer_files(tmp_path / "answers", answers)
    shutil.rmtree(tmp_path / "data" / "images")                  # score reads no image (defect 2)
    out = tmp_path / "answers" / "scores"                          # one folder for both models
    n = len(answers)
    with fake_judge(reply) as server:
        config = write_config(tmp_path / "judge.json", server.base_url)
        good = _score(benchmark, paths["good"], tmp_path / "data", config, out, capsys)
        blank = _score(benchmark, paths["blank"], tmp_path / "data", config, out, capsys)
        assert len(server.requests) == 2 * n                       # the second model was judged too
        again = _score(benchmark, paths["good"], tmp_path / "data", config, out, capsys)
        assert len(server.requests) == 2 * n                       # the same answers and judge: all reused
        other = write_config(tmp_path / "other.json", server.base_url, model="another-judge")
        _score(benchmark, paths["good"], tmp_path / "data", other, out, capsys)
        assert len(server.requests) == 3 * n                       # another judge: judged again
        assert {r["body"]["model"] for r in server.requests[2 * n:]} == {"another-judge"}
    if benchmark == "llava_bench":
        assert good["headline"] == round(8 / 9 * 100, 1) and blank["headline"] == round(2 / 9 * 100, 1)
    else:
        assert good["headline"] == 100 and blank["headline"] == 0
    assert again["headline"] == good["headline"]
    def reviews(report):
        judge = report["metrics"]["judge"]
        return judge["reviews_requested"], judge["reviews_reused"]

    assert (reviews(good), reviews(blank), reviews(again)) == ((n, 0), (n, 0), (0, n))
    assert any(f"0 reviews requested, {n} reused" in note for note in again["notes"])


def test_llava_bench_reviews_file_holds_this_scoring_only(tmp_path, capsys):
    answers = _write_llava_bench(tmp_path / "data")
    paths = _answer_files(tmp_path / "answers", answers)
    with fake_judge(_lb_reply) as server:
        config = write_config(tmp_path / "judge.json", server.base_url)
        for model in ("good", "blank"):
            _score("llava_bench", paths[model], tmp_path / "data", config, tmp_path / "out", capsys)
    reviews = [json.loads(line) for line in open(tmp_path / "out" / "llava_bench_reviews.jsonl")]
    assert [r["tuple"] for r in reviews] == [[9.0, 2.0]] * len(answers)        # summarize_gpt_review.py input


def test_default_score_folder_is_per_predictions_file(tmp_path, capsys):
    from tests.eval.test_pope import _write
    answers = _write(tmp_path / "pope")
    os.rmdir(tmp_path / "pope" / "val2014")                       # score reads no image (defect 2)
    paths = _answer_files(tmp_path / "answers", answers)
    for model in ("good", "blank"):
        assert main(["score", "--benchmark", "pope", "--predictions", paths[model], "--annotations",
                     str(tmp_path / "pope")]) == 0
    capsys.readouterr()
    reports = {m: json.load(open(tmp_path / "answers" / "pope_score" / m / "report.json")) for m in paths}
    assert reports["good"]["headline"] != reports["blank"]["headline"]


def test_official_rounding_of_relative_scores():
    """summarize_gpt_review.py: round(round(mean2, 3) / round(mean1, 3) * 100, 1). These three reviews'
    unrounded ratio is 43.75% -> 43.8; the official figure is 43.7 (2.333 / 5.333)."""
    tuples = [[5, 1], [5, 1], [6, 5]]
    reviews = [{"category": "llava_bench_detail", "tuple": t} for t in tuples]
    ref, model = sum(t[0] for t in tuples) / 3, sum(t[1] for t in tuples) / 3
    summary = llava_bench.summarize(reviews)["llava_bench_detail"]
    assert summary["relative"] == round(round(model, 3) / round(ref, 3) * 100, 1)
    assert summary["relative_unrounded"] == pytest.approx(100 * model / ref)
    assert summary["relative"] == 43.7 and round(summary["relative_unrounded"], 1) == 43.8   # as the issue met


def test_mm_vet_without_capabilities_says_so(tmp_path):
    from vflan_jax.eval import mm_vet
    from vflan_jax.eval.judge import make_judge
    answers = _write_mm_vet(tmp_path / "data")
    stripped = {k: {f: v for f, v in entry.items() if f != "capability"} for k, entry in MMVET.items()}
    (tmp_path / "data" / "mm-vet.json").write_text(json.dumps(stripped))
    with fake_judge(_mmvet_reply) as server:
        result = mm_vet.evaluate(answers, str(tmp_path / "data"), str(tmp_path / "out"),
                                 make_judge(write_config(tmp_path / "j.json", server.base_url)))
    assert result.metrics["capabilities"] == {} and result.metrics["n_without_capability"] == 3
    assert any("no 'capability'" in n and "cannot be computed" in n for n in result.notes)
