"""LLaVA-Bench and MM-Vet through a fake local judge: request format, score parsing, the API key
only in the header, resumable reviews, pending mode without a judge (docs/REFERENCE.md §5.4, §5.5)."""
import json
import os

import pytest
from PIL import Image

from tests.eval.fake_judge import fake_judge, write_config
from vflan_jax.eval import llava_bench, mm_vet
from vflan_jax.eval.__main__ import main
from vflan_jax.eval.judge import make_judge

SECRET = "sk-test-SECRET-42"
KEY_ENV = "VFLAN_TEST_JUDGE_KEY"


def _all_output_text(root):
    text = ""
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                text += f.read().decode("utf-8", errors="replace")
    return text


def _write_llava_bench(root):
    os.makedirs(root / "images")
    Image.new("RGB", (8, 8)).save(root / "images" / "001.jpg")
    Image.new("RGB", (8, 8)).save(root / "images" / "002.jpg")
    qs = [(0, "001.jpg", "What is this?", "conv"), (1, "001.jpg", "Describe it.", "detail"),
          (2, "002.jpg", "Why is it funny?", "complex"), (3, "002.jpg", "What colour?", "conv")]
    with open(root / "questions.jsonl", "w") as f:
        f.writelines(json.dumps({"question_id": q, "image": i, "text": t, "category": c}) + "\n" for q, i, t, c in qs)
    with open(root / "context.jsonl", "w") as f:
        f.write(json.dumps({"id": "001", "image": "001.jpg", "caption": ["A cat.", "On a mat."]}) + "\n")
        f.write(json.dumps({"id": "002", "image": "002.jpg", "caption": "A dog."}) + "\n")
    with open(root / "answers_gpt4.jsonl", "w") as f:
        f.writelines(json.dumps({"question_id": q, "text": f"reference {q}", "answer_id": f"ref{q}"}) + "\n"
                     for q, *_ in qs)
    return [{"question_id": q, "prompt": t, "text": f"model answer {q}", "answer_id": f"m{q}"} for q, _, t, _ in qs]


# judge output per question id: two scores on the first line; "Score: 7/10" cannot be parsed -> [-1, -1]
LB_REVIEWS = {"0": "8 6\nAssistant 1 is better.", "1": "9,9\nBoth fine.", "2": "Score: 7/10\nbad format",
              "3": "10 5\nok"}


def _lb_reply(body):
    content = body["messages"][1]["content"]
    qid = content.split("model answer ")[1].split("\n")[0]
    return LB_REVIEWS[qid]


def test_llava_bench_judge(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, SECRET)
    answers = _write_llava_bench(tmp_path / "data")
    with fake_judge(_lb_reply) as server:
        config = write_config(tmp_path / "judge.json", server.base_url, api_key_env=KEY_ENV)
        result = llava_bench.evaluate(answers, str(tmp_path / "data"), str(tmp_path / "out"), make_judge(config))
        first = len(server.requests)
        again = llava_bench.evaluate(answers, str(tmp_path / "data"), str(tmp_path / "out"), make_judge(config))
        assert len(server.requests) == first == 4                   # the review log makes re-scoring free
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert req["body"]["model"] == "judge-model" and req["body"]["temperature"] == 0.2
    assert req["body"]["messages"][0] == {"role": "system", "content": llava_bench.SYSTEM}
    expected = ("[Context]\nA cat.\nOn a mat.\n\n[Question]\nWhat is this?\n\n[Assistant 1]\nreference 0\n\n"
                "[End of Assistant 1]\n\n[Assistant 2]\nmodel answer 0\n\n[End of Assistant 2]\n\n[System]\n"
                + llava_bench.RULE_PROMPT + "\n\n")
    assert req["body"]["messages"][1] == {"role": "user", "content": expected}
    # ratio of means, the unparseable review counted as [-1, -1]; summarize_gpt_review.py rounds each
    # mean to 3 decimals, then the ratio to 1
    ref, model = (8 + 9 - 1 + 10) / 4, (6 + 9 - 1 + 5) / 4
    assert result.headline == round(round(model, 3) / round(ref, 3) * 100, 1) == 73.1
    assert result.metrics["summary"]["all"]["relative_unrounded"] == pytest.approx(100 * model / ref)
    assert result.metrics["summary"]["llava_bench_conv"]["relative"] == round(100 * (6 + 5) / (8 + 10), 1)
    assert result.metrics["n_parse_failures"] == 1 and again.headline == result.headline
    reviews = [json.loads(line) for line in open(tmp_path / "out" / "llava_bench_reviews.jsonl")]
    assert {r["question_id"]: r["tuple"] for r in reviews}[2] == [-1, -1] and len(reviews) == 4
    assert result.metrics["judge"]["reviews_requested"] == 4 and again.metrics["judge"]["reviews_reused"] == 4
    assert SECRET not in _all_output_text(tmp_path / "out")
    assert SECRET not in capsys.readouterr().out


def test_llava_bench_without_judge_is_pending(tmp_path):
    answers = _write_llava_bench(tmp_path / "data")
    result = llava_bench.evaluate(answers, str(tmp_path / "data"), str(tmp_path / "out"), None)
    assert result.headline is None and any("pending" in n for n in result.notes)
    lines = [json.loads(line) for line in open(result.files["judge_requests"])]
    assert len(lines) == 4 and lines[0]["messages"][0]["role"] == "system"


MMVET = {"v1_0": {"question": "What is x?", "answer": "-1<AND>-5", "capability": ["math", "ocr"]},
         "v1_1": {"question": "What animal?", "answer": "cat", "capability": ["rec"]},
         "v1_2": {"question": "Explain.", "answer": "funny", "capability": ["rec", "gen"]}}
GRADES = {"What is x?": ["0.8"], "What animal?": ["1.0 because"], "Explain.": ["great"] * 5}


def _write_mm_vet(root):
    os.makedirs(root / "images")
    with open(root / "llava-mm-vet.jsonl", "w") as f:
        for k, v in MMVET.items():
            Image.new("RGB", (8, 8)).save(root / "images" / f"{k}.png")
            f.write(json.dumps({"question_id": int(k[3:]), "image": f"{k}.png", "text": v["question"]}) + "\n")
    with open(root / "mm-vet.json", "w") as f:
        json.dump(MMVET, f)
    return [{"question_id": int(k[3:]), "prompt": v["question"], "text": f"pred {k}"} for k, v in MMVET.items()]


def test_mm_vet_judge(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    answers = _write_mm_vet(tmp_path / "data")

    def reply(body):
        question = body["messages"][0]["content"].split("\n")[-1].split(" | ")[0]
        if question.startswith("Predict"):                      # a retry: the question is one line up
            question = body["messages"][0]["content"].split("\n")[-2].split(" | ")[0]
        return GRADES[question][0]

    with fake_judge(reply) as server:
        config = write_config(tmp_path / "judge.json", server.base_url, api_key_env=KEY_ENV)
        result = mm_vet.evaluate(answers, str(tmp_path / "data"), str(tmp_path / "out"), make_judge(config))
    bodies = [r["body"] for r in server.requests]
    assert len(bodies) == 1 + 1 + 5                                # 5 tries for the ungradeable one
    assert bodies[0]["max_tokens"] == 3 and bodies[0]["temperature"] == 0.0
    assert bodies[0]["messages"][0]["content"] == mm_vet.FEW_SHOT + "\nWhat is x? | -1 <AND> -5 | pred v1_0 | "
    assert [b["temperature"] for b in bodies[2:]] == [0.0, 0.0, 0.5, 1.0, 1.5]
    assert bodies[3]["messages"][0]["content"].endswith(mm_vet.RETRY_SUFFIX)
    assert result.headline == pytest.approx(100 * (0.8 + 1.0 + 0.0) / 3)
    assert result.metrics["capabilities"] == {"rec": pytest.approx(50), "ocr": pytest.approx(80),
                                              "math": pytest.approx(80), "gen": 0.0}
    assert result.metrics["n_ungradeable"] == 1
    assert json.load(open(tmp_path / "out" / "mm-vet_results.json")) == {k: f"pred {k}" for k in MMVET}
    assert SECRET not in _all_output_text(tmp_path / "out")


def test_score_cli_reads_official_results_json_and_pending(tmp_path, capsys):
    answers = _write_mm_vet(tmp_path / "data")
    results = tmp_path / "results.json"
    results.write_text(json.dumps({f"v1_{a['question_id']}": a["text"] for a in answers}))
    rc = main(["score", "--benchmark", "mm-vet", "--predictions", str(results), "--annotations",
               str(tmp_path / "data"), "--out", str(tmp_path / "s"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["headline"] is None and out["n_answered"] == 3
    assert os.path.exists(tmp_path / "s" / "report.png") and "pending" in open(tmp_path / "s" / "report.md").read()


def test_missing_key_variable_is_named_not_leaked(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    config = write_config(tmp_path / "judge.json", "http://127.0.0.1:9/v1", api_key_env=KEY_ENV)
    with pytest.raises(Exception, match=KEY_ENV):
        make_judge(config)
