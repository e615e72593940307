"""`python -m vflan_jax.convert`: relative paths as typed, the exit-status scheme of vflan_jax/cli.py,
and atomic checkpoint writes (in-process main(); tests/convert/test_cli.py runs the subprocesses)."""
import json
import shutil

import pytest
from safetensors.numpy import load_file, save_file

from vflan_jax import checkpoint
from vflan_jax.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_VERIFY_MISMATCH
from vflan_jax.convert.__main__ import main


@pytest.fixture
def imported(tmp_path, monkeypatch, llava_hf_dir):
    """import-hf with a relative --out from a working directory (Orbax refuses relative paths)."""
    hf_dir, _ = llava_hf_dir
    monkeypatch.chdir(tmp_path)
    assert main(["import-hf", "--hf_dir", str(hf_dir), "--out", "ckpt/model"]) == EXIT_OK
    return tmp_path, hf_dir


def test_relative_out_is_written_whole_and_nothing_else(imported):
    root, _ = imported
    assert checkpoint.is_model_checkpoint(root / "ckpt/model")
    assert sorted(p.name for p in (root / "ckpt").iterdir()) == ["model"]  # no .partial, no orbax tmp
    assert not list((root / "ckpt/model").glob("*orbax-checkpoint-tmp*"))


def test_existing_out_is_bad_input_and_left_intact(imported, capsys):
    root, hf_dir = imported
    before = sorted(str(p) for p in (root / "ckpt/model").rglob("*"))
    assert main(["import-hf", "--hf_dir", str(hf_dir), "--out", "ckpt/model"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(root / "ckpt/model") in err[0]
    assert sorted(str(p) for p in (root / "ckpt/model").rglob("*")) == before


def test_export_of_a_missing_checkpoint_is_one_line_status_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["export-hf", "--checkpoint", "runs/none/model", "--out", "hf"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "runs/none/model") in err[0], err
    assert not (tmp_path / "hf").exists()


def test_verify_mismatch_is_status_3(imported, capsys):
    root, hf_dir = imported
    changed = root / "hf_changed"
    shutil.copytree(hf_dir, changed)
    weights = sorted(changed.glob("*.safetensors"))[0]
    tensors = load_file(weights)
    name = next(k for k in tensors if "lm_head" in k or "embed_tokens" in k)
    tensors[name] = tensors[name][::-1].copy()  # rows permuted: same statistics, different logits
    save_file(tensors, weights, metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["verify", "--checkpoint", "ckpt/model", "--hf_dir", "hf_changed"]) == EXIT_VERIFY_MISMATCH
    assert json.loads(capsys.readouterr().out)["passed"] is False
    assert main(["verify", "--checkpoint", "ckpt/model", "--hf_dir", str(hf_dir)]) == EXIT_OK


def test_a_failed_save_leaves_neither_the_model_nor_a_partial(tmp_path, monkeypatch, llava_hf_dir):
    hf_dir, _ = llava_hf_dir
    real_save = checkpoint.save_model

    def save_then_fail(path, *a, **k):  # fails after the params are on disk, before the rename
        real_save(path, *a, **k)
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint, "save_model", save_then_fail)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError, match="disk full"):
        main(["import-hf", "--hf_dir", str(hf_dir), "--out", "ckpt"])
    assert list(tmp_path.iterdir()) == []


def test_library_save_and_load_take_relative_paths(imported):
    """vflan_jax.checkpoint itself never hands Orbax a relative path (the cwd is tmp_path here)."""
    import jax
    import numpy as np
    params, cfg = checkpoint.load_model("ckpt/model")
    checkpoint.save_model("again", params, cfg)
    again, _ = checkpoint.load_model("again")
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True))
