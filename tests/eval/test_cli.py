"""`python -m vflan_jax.eval` rejects bad input with exit 2 and one line before any model is loaded
(issue 11 item 8, issue 16 item 7); the POPE and forgetting reports (issue 16 item 9)."""
import os

import pytest

from tests.eval.test_pope import _write as write_pope
from vflan_jax.data.image import ASPECTS
from vflan_jax.eval import pope
from vflan_jax.eval.__main__ import _parser, main
from vflan_jax.eval.benchmark import Result
from vflan_jax.eval.report import bar_chart


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if anything tries to load a model."""
    import vflan_jax.inference.generator

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(vflan_jax.inference.generator.Generator, "from_checkpoint", classmethod(refuse))


def _run(data, out, *extra):
    return main(["run", "--benchmark", "pope", "--checkpoint", str(out / "ckpt"), "--data_dir", str(data),
                 "--out", str(out / "results"), *extra])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_missing_annotation_file_stops_before_the_model(tmp_path, capsys, no_model):
    write_pope(tmp_path / "pope")
    os.makedirs(tmp_path / "ckpt")
    os.remove(tmp_path / "pope" / "coco" / "coco_pope_random.json")
    assert _run(tmp_path / "pope", tmp_path) == 2
    assert "coco_pope_random.json" in _one_error_line(capsys)
    assert not os.path.exists(tmp_path / "results" / "answers.jsonl")


def test_missing_checkpoint_stops_before_the_model(tmp_path, capsys, no_model):
    write_pope(tmp_path / "pope")
    assert _run(tmp_path / "pope", tmp_path) == 2
    assert "checkpoint" in _one_error_line(capsys)


def test_unknown_benchmark_is_bad_input(tmp_path, capsys):
    assert main(["score", "--benchmark", "vqa9", "--predictions", "x", "--annotations", "y"]) == 2
    assert "unknown benchmark 'vqa9'" in _one_error_line(capsys)


def test_image_aspect_choices_come_from_the_image_code(tmp_path, capsys, no_model):
    action = next(a for a in _parser()._subparsers._group_actions[0].choices["run"]._actions
                  if a.dest == "image_aspect")
    assert tuple(action.choices) == ASPECTS
    with pytest.raises(SystemExit) as exit_:
        _run(tmp_path, tmp_path, "--image_aspect", "resize")
    assert exit_.value.code == 2 and "invalid choice: 'resize'" in capsys.readouterr().err


def test_pope_report_shows_the_yes_ratio(tmp_path):
    answers = write_pope(tmp_path)
    result = pope.evaluate(answers, str(tmp_path), str(tmp_path / "out"))
    from vflan_jax.eval.report import write_report
    paths = write_report(result, str(tmp_path / "out"))
    md = open(paths["md"]).read()
    # adversarial 2 of 4 yes, popular 2 of 4, random 2 of 2 (tests/eval/test_pope.py's cases)
    expected = (50 + 50 + 100) / 3
    assert result.metrics["yes_ratio_avg"] == pytest.approx(expected)
    assert f"yes-ratio {expected:.2f}%" in md and "| random yes_ratio | 100.00 |" in md


def test_bar_chart_has_no_negative_ticks_when_all_scores_are_zero(tmp_path):
    result = Result("forgetting", "CF", 0.0, {}, {"cifar10": 0.0, "mnist": 0.0}, "accuracy (%)")
    ticks = bar_chart(result, str(tmp_path / "zero.png"))
    assert ticks and min(ticks) == 0.0 and os.path.getsize(tmp_path / "zero.png") > 0
    ticks = bar_chart(Result("forgetting", "CF", 40.0, {}, {"cifar10": 30.0, "mnist": 50.0}), str(tmp_path / "b.png"))
    assert min(ticks) == 0.0 and max(ticks) >= 50.0
