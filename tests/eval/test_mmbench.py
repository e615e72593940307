"""MMBench CircularEval scoring, prompt building and submission file (docs/REFERENCE.md §5.3)."""
import csv

import pytest

from vflan_jax.eval import mmbench

MC = "Answer with the option's letter from the given choices directly."
COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "source", "l2-category",
           "comment", "split"]


def _row(index, question, options, answer, hint="nan", category="cat1"):
    opts = dict(zip("ABCD", options + [""] * (4 - len(options)), strict=True))
    return {"index": index, "question": question, "hint": hint, **opts, "answer": answer, "category": category,
            "source": "s", "l2-category": "l2", "comment": "", "split": "dev"}


def _rotations(base, question, options, answer_index, **kw):
    """The TSV's CircularEval copies: rotation k shifts the options by k."""
    rows = []
    for k in range(len(options)):
        rotated = options[k:] + options[:k]
        rows.append(_row(base + k * 1_000_000, question, rotated, "ABCD"[rotated.index(options[answer_index])], **kw))
    return rows


def _write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, delimiter="\t")
        w.writeheader()
        w.writerows(rows)


ROWS = (_rotations(0, "Which animal?", ["cat", "dog", "cow", "pig"], 1)            # dog
        + _rotations(1, "Is it red?", ["yes", "no"], 0, category="cat2")            # yes
        + _rotations(2, "Which colour?", ["red", "green", "blue"], 2)               # blue
        + _rotations(3, "How many?", ["one", "two"], 1, hint="Count the dots."))    # two
# answer letter per row index: what each rotation's correct letter is
CORRECT = {int(r["index"]): r["answer"] for r in ROWS}


def _answers():
    by = {int(r["index"]): r for r in ROWS}
    texts = {0: "B.", 1_000_000: "The answer is A", 2_000_000: "D", 3_000_000: "(C) dog",   # base 0: all right
             1: "A", 1_000_001: "A",                                    # base 1: rotation 1 wrong (should be B)
             2: "C", 1_000_002: "B",                                    # base 2: rotation 2 missing
             3: "B", 1_000_003: "A"}                                    # base 3: right
    return [{"question_id": i, "prompt": mmbench.build_prompt(by[i]), "text": t} for i, t in texts.items()]


def test_prompt_format(tmp_path):
    _write(tmp_path / "mmbench_dev_20230712.tsv", ROWS)
    qs = {q.question_id: q for q in mmbench.load_questions(str(tmp_path))}
    assert qs[1].prompt == "Is it red?\nA. yes\nB. no\n" + MC                  # stops at the first empty option
    assert qs[3].prompt == "Count the dots.\nHow many?\nA. one\nB. two\n" + MC
    assert qs[3].logged_prompt == "Count the dots.\nHow many?\nA. one\nB. two"
    order = [q.question_id for q in mmbench.load_questions(str(tmp_path))]
    assert order[:4] == [0, 1_000_000, 2_000_000, 3_000_000]                # rotations kept together


def test_circular_accuracy_missing_rotations_wrong(tmp_path):
    _write(tmp_path / "mmbench_dev_20230712.tsv", ROWS)
    result = mmbench.evaluate(_answers(), str(tmp_path), str(tmp_path / "out"))
    assert result.headline == pytest.approx(100 * 2 / 4)                     # bases 0 and 3 of 4
    assert result.metrics["n_base_complete"] == 3
    assert result.metrics["circular_acc_answered"] == pytest.approx(100 * 2 / 3)
    assert result.metrics["categories"] == {"cat1": pytest.approx(100 * 2 / 3), "cat2": 0.0}
    assert any("count as wrong" in n for n in result.notes)


def test_submission_columns(tmp_path):
    _write(tmp_path / "mmbench_dev_20230712.tsv", ROWS)
    result = mmbench.evaluate(_answers(), str(tmp_path), str(tmp_path / "out"))
    path = result.files["submission"]
    if path.endswith(".tsv"):
        rows = list(csv.reader(open(path), delimiter="\t"))
        assert rows[0] == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
        assert rows[1][6] == "B."
        assert any("openpyxl" in n for n in result.notes)
    else:
        import openpyxl
        sheet = openpyxl.load_workbook(path).active
        assert [c.value for c in sheet[1]] == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]


@pytest.mark.parametrize("text,letter", [("B.", "B"), ("The answer is C", "C"), ("D", "D"), ("(A)", "A"),
                                         ("C. cow", "C"), ("the answer: b", "B"), ("I choose C", "C"),
                                         ("A dog is shown", "B"), ("A cat sat", "A"), ("something else", None),
                                         ("E", None)])
def test_letter_extraction(text, letter):
    assert mmbench.extract_letter(text, ["cat", "dog", "cow", "pig"]) == letter
