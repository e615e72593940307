"""`python -m vflan_jax.data.inspect`: relative paths as typed; a missing input is one line, exit status 2."""
import pytest

from vflan_jax.cli import EXIT_BAD_INPUT
from vflan_jax.data.inspect import main

ARGS = ["--data", "d.json", "--image_folder", "images", "--tokenizer", "tok", "--out", "o.jsonl"]


@pytest.mark.parametrize("missing, culprit", [
    ("d.json", "--data {}/d.json: file not found"),
    ("images", "--image_folder {}/images: no such directory"),
    ("tok", "--tokenizer {}/tok: no such directory (an HF tokenizer directory is expected)")])
def test_missing_input_is_named_in_one_line(tmp_path, monkeypatch, capsys, missing, culprit):
    monkeypatch.chdir(tmp_path)
    if missing != "d.json":
        (tmp_path / "d.json").write_text("[]")
    for folder in {"images", "tok"} - {missing}:
        (tmp_path / folder).mkdir()
    assert main(ARGS) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {culprit.format(tmp_path)}"]
    assert not (tmp_path / "o.jsonl").exists()
