"""`python -m vflan_jax.convert` end to end, as a user runs it (subprocesses)."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from tests.convert.checkpoints import projector_state, write_clip, write_llama
from vflan_jax.checkpoint import load_model, load_model_config
from vflan_jax.convert.__main__ import main
from vflan_jax.convert.hf_import import import_composed

ROOT = pathlib.Path(__file__).resolve().parents[2]


def cli(*args):
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "vflan_jax.convert", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_import_export_verify(tmp_path, llava_hf_dir, nano_cfg):
    hf_dir, _ = llava_hf_dir
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    r = cli("import-hf", "--hf_dir", hf_dir, "--out", ckpt)
    assert r.returncode == 0, r.stderr
    assert load_model_config(ckpt) == nano_cfg and (ckpt / "tokenizer" / "tokenizer.json").exists()
    r = cli("export-hf", "--checkpoint", ckpt, "--out", out, "--max_shard_size", "20KB")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["image_token_id"] == nano_cfg.image_token_id  # already in vocabulary: kept
    assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer.json").exists()
    r = cli("verify", "--checkpoint", ckpt, "--hf_dir", out, "--tolerance", "1e-5")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["passed"] and result["argmax_agreement"] == 1.0 and result["rel_l2"] <= 1e-5


def test_composed_import_and_errors(tmp_path, nano_cfg, capsys):
    """In-process main() (the subprocess path is covered above; this saves two interpreter starts)."""
    write_clip(tmp_path / "clip", nano_cfg, seed=1)
    write_llama(tmp_path / "llm", nano_cfg, seed=2)
    torch.save(projector_state(nano_cfg), tmp_path / "mm_projector.bin")
    assert main(["import-hf", "--vision_tower", str(tmp_path / "clip"), "--llm", str(tmp_path / "llm"),
                 "--projector", str(tmp_path / "mm_projector.bin"), "--out", str(tmp_path / "ckpt")]) == 0
    params, cfg = load_model(tmp_path / "ckpt")
    ref, ref_cfg, _ = import_composed(tmp_path / "clip", tmp_path / "llm", tmp_path / "mm_projector.bin",
                                      progress=False)
    assert cfg == ref_cfg and cfg.image_token_id == -200
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref), strict=True))

    (tmp_path / "llm" / "model.safetensors").unlink()
    capsys.readouterr()
    assert main(["import-hf", "--vision_tower", str(tmp_path / "clip"), "--llm", str(tmp_path / "llm"),
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no weights" in err and str(tmp_path / "llm") in err
    assert not (tmp_path / "x").exists()
