"""MMMU (docs/REFERENCE.md §5.6): prompts as MMMU's configs/llava1.5.yaml, parsing and scoring worked out by
hand from MMMU's utils/eval_utils.py rules, tiny parquet files built here, MMMU's own output format."""
import io
import json
import os
import random

import pytest
from PIL import Image

from vflan_jax.eval import mmmu
from vflan_jax.eval.__main__ import main
from vflan_jax.eval.benchmark import BenchmarkError
from vflan_jax.eval.mmmu_rules import parse_multi_choice_response, parse_open_response
from vflan_jax.eval.runner import run_questions

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

ABCD = ["A", "B", "C", "D"]
NAMES = {"A": "Aurelia", "B": "Matilda", "C": "Hermione", "D": "Juno"}


def _mc(response, rng=None):
    return parse_multi_choice_response(response, ABCD, NAMES, rng or random.Random(0))


@pytest.mark.parametrize("response,letter", [
    ("(B)", "B"),
    ("The answer is C.", "C"),                                  # ' C ' after the full stop is stripped
    ("(A) is wrong, (D) is right", "D"),                        # several bracketed: the last one named
    ("B or maybe A", "A"),                                       # several bare letters: the last one
    ("I am quite sure the painting shows Matilda here", "B"),    # > 5 words: the option's text
    ("Hermione and later Juno, says the long caption", "D"),     # several texts: the last one
])
def test_multiple_choice_parsing(response, letter):
    assert _mc(response) == (letter, False)


def test_multiple_choice_random_fallback_is_seeded():
    """Nothing names an option ("Matilda" alone is too short for the text match): a draw from the
    seeded generator, in order, as MMMU's module-global random seeded 42."""
    rng, reference = random.Random(42), random.Random(42)
    for response in ("Matilda", "no idea", "E"):
        assert _mc(response, rng) == (reference.choice(ABCD), True)


@pytest.mark.parametrize("response,expected", [
    ("The answer is 3.14159.", {3.14}),                          # 'is ' -> '3.14159', rounded to 2 decimals
    ("1,234", {1234.0, 234.0}),             # commas dropped; MMMU's simple-number regex also finds "234"
    ("so x = 5 and thus y", {" y", "y "}),     # the shortest tail after an indicator; one letter padded
    ("Paris", {"paris"}),
])
def test_open_parsing(response, expected):
    assert set(parse_open_response(response)) == expected


def _png(colour):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


# subject -> (id suffix, question_type, options, answer, model response, right?)
SAMPLES = {
    "Art": [(1, "multiple-choice", ["Aurelia", "Matilda"], "B", "(B)", True),
            (2, "multiple-choice", ["red", "blue", "green"], "A", "C", False),
            (3, "short-answer", [], "42", "The answer is 42.", True)],
    "Math": [(1, "multiple-choice", ["1", "2"], "A", "I cannot tell", None),     # random fallback
             (2, "short-answer", [], "0.5", "It is 0.25", False),
             (3, "multiple-choice", ["<img='a.png'>", "<img='b.png'>"], "A", None, None)],  # option images
    "Economics": [(1, "short-answer", [], "tax", "a tax", True)],
}


def _write_parquet(root):
    for subject, rows in SAMPLES.items():
        os.makedirs(root / subject)
        table = pa.table({
            "id": [f"validation_{subject}_{i}" for i, *_ in rows],
            "question": [f"Question {i} of {subject} <image 1>?" for i, *_ in rows],
            "options": [str(opts) for _, _, opts, *_ in rows],
            "answer": [a for *_, a, _, _ in rows],
            "question_type": [t for _, t, *_ in rows],
            "image_1": [{"bytes": _png((i * 40, 0, 0)), "path": f"{i}.png"} for i, *_ in rows],
            "image_2": [None for _ in rows],
        })
        pq.write_table(table, root / subject / "validation-00000-of-00001.parquet")


def test_prompts_and_images_as_mmmu(tmp_path):
    _write_parquet(tmp_path)
    qs = {q.question_id: q for q in mmmu.load_questions(str(tmp_path))}
    assert list(qs)[:3] == ["validation_Art_1", "validation_Art_2", "validation_Art_3"]       # MMMU's order
    assert qs["validation_Art_1"].prompt == ("Question 1 of Art <image 1>?\n(A) Aurelia\n(B) Matilda\n\n"
                                             "Answer with the option's letter from the given choices directly.")
    assert qs["validation_Art_3"].prompt == ("Question 3 of Art <image 1>?\n"
                                             "Answer the question using a single word or phrase.")
    assert qs["validation_Art_2"].load_image().getpixel((0, 0)) == (80, 0, 0)              # image_1
    assert qs["validation_Math_3"].fixed_answer == mmmu.NO_IMAGE_ANSWER                     # not asked
    asked = []
    answers = run_questions(list(qs.values()), str(tmp_path / "a.jsonl"),
                            lambda prompts, images: asked.extend(prompts) or ["x"] * len(prompts),
                            batch_size=4, model_id="m")
    assert len(answers) == len(qs) and len(asked) == len(qs) - 1


def _answers(questions):
    responses = {f"validation_{s}_{i}": r for s, rows in SAMPLES.items() for i, *_, r, _ in rows}
    return [{"question_id": q.question_id, "prompt": q.prompt,
             "text": responses[q.question_id] if responses[q.question_id] is not None else mmmu.NO_IMAGE_ANSWER}
            for q in questions]


def _expected():
    """MMMU's rules by hand. The random draws come in subject order (Economics before Math): Math_1
    first, then Math_3 (whose response names no option either)."""
    rng = random.Random(42)
    math1 = rng.choice(["A", "B"]) == "A"
    math3 = rng.choice(["A", "B"]) == "A"
    art, math, econ = 2 / 3, (math1 + math3) / 3, 1.0
    return {"Art": art, "Math": math, "Economics": econ, "Overall": (2 + math1 + math3 + 1) / 7}


def test_scores_per_subject_discipline_and_overall(tmp_path):
    _write_parquet(tmp_path / "data")
    questions = mmmu.load_questions(str(tmp_path / "data"))
    result = mmmu.evaluate(_answers(questions), str(tmp_path / "data"), str(tmp_path / "out"))
    expected, table = _expected(), result.metrics["table"]
    assert table["Art"] == {"num": 3, "acc": round(expected["Art"], 3)}
    assert table["Math"] == {"num": 3, "acc": round(expected["Math"], 3)}
    assert table["Overall-Art and Design"] == table["Art"] | {}                  # the only Art and Design subject
    assert table["Overall-Business"] == {"num": 1, "acc": 1.0}
    assert table["Overall-Science"] == table["Math"] and table["Overall-Health and Medicine"] == {"num": 0, "acc": 0}
    assert table["Overall"] == {"num": 7, "acc": round(expected["Overall"], 3)}
    assert result.headline == round(100 * round(expected["Overall"], 3), 1)
    assert result.metrics["n_random_picks"] == 2 and any("seeded random" in n for n in result.notes)
    written = json.load(open(tmp_path / "out" / "mmmu_outputs" / "Art" / "output.json"))
    assert written[0] == {"id": "validation_Art_1", "question_type": "multiple-choice", "answer": "B",
                          "all_choices": ["A", "B"], "index2ans": {"A": "Aurelia", "B": "Matilda"}, "response": "(B)"}


def test_score_reads_mmmus_own_output_folder(tmp_path, capsys):
    _write_parquet(tmp_path / "data")
    run = mmmu.evaluate(_answers(mmmu.load_questions(str(tmp_path / "data"))), str(tmp_path / "data"),
                        str(tmp_path / "out"))
    assert main(["score", "--benchmark", "mmmu", "--predictions", str(tmp_path / "out" / "mmmu_outputs"),
                 "--out", str(tmp_path / "rescored"), "--json"]) == 0
    rescored = json.loads(capsys.readouterr().out)
    assert rescored["metrics"]["table"] == run.metrics["table"] and rescored["headline"] == run.headline


def test_missing_files_are_named(tmp_path):
    with pytest.raises(BenchmarkError, match="validation-\\*.parquet"):
        mmmu.load_questions(str(tmp_path))
    with pytest.raises(BenchmarkError, match="output.json"):
        mmmu.score_result_dir(str(tmp_path))


def test_run_cli_asks_with_image_1_and_scores(tmp_path, monkeypatch, capsys):
    """`eval run --benchmark mmmu` end to end with a stand-in model (the real one is covered by
    tests/eval/test_end_to_end.py): every asked question comes with its image_1, the one with
    option images is answered without the model, the report has MMMU's table."""
    import vflan_jax.eval.__main__ as cli
    _write_parquet(tmp_path / "data")
    os.makedirs(tmp_path / "ckpt")
    seen = []

    def fake_generate_fn(args, max_new_tokens):
        assert max_new_tokens == mmmu.MAX_NEW_TOKENS

        def generate(prompts, images):
            seen.extend(zip(prompts, [im.getpixel((0, 0)) for im in images], strict=True))
            return ["(A)" if "(A)" in p else "42" for p in prompts]
        return generate
    monkeypatch.setattr(cli, "_generate_fn", fake_generate_fn)
    assert main(["run", "--benchmark", "mmmu", "--checkpoint", str(tmp_path / "ckpt"), "--data_dir",
                 str(tmp_path / "data"), "--out", str(tmp_path / "out")]) == 0
    assert len(seen) == 6 and ("Question 2 of Art <image 1>?\n(A) red\n(B) blue\n(C) green\n\n"
                               "Answer with the option's letter from the given choices directly.", (80, 0, 0)) in seen
    report = json.load(open(tmp_path / "out" / "report.json"))
    # right: Art_2 and Math_1 ("(A)", gold A), Art_3 ("42"); wrong: Art_1 (gold B), Math_2 and Economics
    # ("42" vs 0.5 and "tax"); Math_3 (not asked) is the first seeded draw
    rng = random.Random(42)
    math3 = rng.choice(["A", "B"]) == "A"
    assert report["metrics"]["table"]["Overall"] == {"num": 7, "acc": round((3 + math3) / 7, 3)}
    assert "mmmu: accuracy" in capsys.readouterr().out
