"""MME scoring against hand-worked numbers (docs/REFERENCE.md §5.1; official calculation.py rules)."""
import json
import os

import pytest

from vflan_jax.eval import mme
from vflan_jax.eval.benchmark import BenchmarkError

SUFFIX = "Answer the question using a single word or phrase."
# subtask -> layout, {image stem: [(official question, gt, prediction), (...)]}
DATA = {
    "existence": ("flat", {
        "e1": [("Is there a cat in this image? Please answer yes or no.", "Yes", "Yes."),
               ("Is there a dog in this image? Please answer yes or no.", "No", "no")],
        "e2": [("Is there a car in this image? Please answer yes or no.", "Yes", "Yes, there is"),
               ("Is there a bus in this image? Please answer yes or no.", "No", "Not sure")],   # "not " -> no
        "e3": [("Is there a cow in this image? Please answer yes or no.", "Yes", "There is a cow"),  # other
               ("Is there a pig in this image? Please answer yes or no.", "No", "nope")]}),
    "artwork": ("nested", {
        "a1": [("Is this artwork by Monet? Please answer yes or no.", "Yes", "YES"),
               ("Is this artwork by Dali?  Please answer yes or no.", "No", "yes")],   # official double space
        "a2": [("Is this a painting? Please answer yes or no.", "No", "No"),
               ("Is this a sculpture? Please answer yes or no.", "Yes", "I think yes")]}),  # "i th" -> other
    "code_reasoning": ("flat", {
        "c1": [("Does the code print 3? Please answer yes or no.", "Yes", "yes"),
               ("Does the code print 4? Please answer yes or no.", "No", "no")]}),
}


def _write_release(root):
    from PIL import Image
    release = os.path.join(root, mme.RELEASE)
    for subtask, (layout, images) in DATA.items():
        base = os.path.join(release, subtask)
        image_dir = os.path.join(base, "images") if layout == "nested" else base
        qa_dir = os.path.join(base, "questions_answers_YN") if layout == "nested" else base
        os.makedirs(image_dir, exist_ok=True)
        os.makedirs(qa_dir, exist_ok=True)
        for stem, qas in images.items():
            Image.new("RGB", (8, 8)).save(os.path.join(image_dir, stem + ".png"))
            with open(os.path.join(qa_dir, stem + ".txt"), "w") as f:
                f.writelines(f"{q}\t{gt}\n" for q, gt, _ in qas)
    return release


def _llava_prompt(official):
    return official.replace("Please answer yes or no.", "").strip() + "\n" + SUFFIX


def _answers():
    out = []
    for subtask, (layout, images) in DATA.items():
        for stem, qas in images.items():
            qid = f"{subtask}/images/{stem}.png" if layout == "nested" else f"{subtask}/{stem}.png"
            out += [{"question_id": qid, "prompt": _llava_prompt(q), "text": pred} for q, _, pred in qas]
    return out


EXISTENCE = 100 * 5 / 6 + 100 * 2 / 3      # 5 of 6 right; e1, e2 both right, e3 not
ARTWORK = 100 * 2 / 4 + 0.0                 # a1 q2 wrong, a2 q2 "other"
CODE = 100 + 100


@pytest.mark.parametrize("with_question_file", [False, True])
def test_scores_match_hand_computation(tmp_path, with_question_file):
    _write_release(tmp_path)
    if with_question_file:    # LLaVA's llava_mme.jsonl: same ids and texts as built from the folders
        with open(tmp_path / mme.QUESTION_FILE, "w") as f:
            for a in _answers():
                f.write(json.dumps({"question_id": a["question_id"], "image": a["question_id"], "text": a["prompt"],
                                    "category": "default"}) + "\n")
    questions = mme.load_questions(str(tmp_path))
    assert len(questions) == 12 and all(q.prompt.endswith("\n" + SUFFIX) for q in questions)
    result = mme.evaluate(_answers(), str(tmp_path), str(tmp_path / "out"), None)
    sub = result.metrics["subtasks"]
    assert sub["existence"]["score"] == pytest.approx(EXISTENCE)
    assert sub["existence"]["n_other"] == 1
    assert sub["artwork"]["acc"] == pytest.approx(50) and sub["artwork"]["acc_plus"] == 0
    assert result.headline == pytest.approx(EXISTENCE + ARTWORK)
    assert result.metrics["cognition"] == pytest.approx(CODE)
    assert any("only 2 of 10" in n for n in result.notes)

    # The official-format result files, as LLaVA's convert_answer_to_mme.py writes them.
    lines = open(tmp_path / "out" / "mme_results" / "artwork.txt").read().splitlines()
    assert lines[1] == "a1.txt\tIs this artwork by Dali?  Please answer yes or no.\tNo\tyes"
    rescored = mme.score_result_dir(str(tmp_path / "out" / "mme_results"))
    assert rescored.headline == pytest.approx(EXISTENCE + ARTWORK)


def test_parse_pred_follows_calculation_py():
    assert [mme.parse_pred(p) for p in ("Yes", "no", "Yes, there is", "Not sure", "Noo", "maybe", "it is yes")] \
        == ["yes", "no", "yes", "no", "no", "other", "other"]


def test_missing_files_name_what_is_expected(tmp_path):
    with pytest.raises(BenchmarkError, match="MME: expected .*MME_Benchmark_release_version"):
        mme.load_questions(str(tmp_path))
