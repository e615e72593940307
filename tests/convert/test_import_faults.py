"""import-hf over an existing --out, and a model checkpoint whose model_config.json was edited
so that it no longer describes the stored tensors (issue 11 item 12)."""
import json

import numpy as np
import pytest

from vflan_jax import checkpoint
from vflan_jax.cli import EXIT_BAD_INPUT, EXIT_OK
from vflan_jax.convert.__main__ import main
from vflan_jax.convert.errors import ConversionError


def test_an_existing_out_needs_overwrite(tmp_path, llava_hf_dir, capsys):
    hf_dir, _ = llava_hf_dir
    out = tmp_path / "ckpt"
    assert main(["import-hf", "--hf_dir", str(hf_dir), "--out", str(out)]) == EXIT_OK
    before = checkpoint.load_model(out)[0]
    capsys.readouterr()
    assert main(["import-hf", "--hf_dir", str(hf_dir), "--out", str(out)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --out {out} exists, use --overwrite to replace it"]
    assert main(["import-hf", "--hf_dir", str(hf_dir), "--out", str(out), "--overwrite"]) == EXIT_OK
    after = checkpoint.load_model(out)[0]
    np.testing.assert_array_equal(np.asarray(after["multi_modal_projector"]["linear_1"]["kernel"]),
                                  np.asarray(before["multi_modal_projector"]["linear_1"]["kernel"]))


def test_an_edited_model_config_names_the_parameter_and_both_shapes(tmp_path, llava_hf_dir, nano_cfg, capsys):
    hf_dir, _ = llava_hf_dir
    out = tmp_path / "ckpt"
    assert main(["import-hf", "--hf_dir", str(hf_dir), "--out", str(out)]) == EXIT_OK
    config = json.loads((out / "model_config.json").read_text())
    config["text"]["intermediate_size"] += 8   # the stored MLP kernels keep the old width
    (out / "model_config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError) as info:
        checkpoint.load_model(out)
    message = str(info.value)
    width = nano_cfg.text.intermediate_size
    assert "model_config.json disagrees with the tensors" in message
    assert "language_model/" in message and "mlp" in message
    assert "config implies" in message and str(width + 8) in message and str(width) in message
    capsys.readouterr()
    assert main(["export-hf", "--checkpoint", str(out), "--out", str(tmp_path / "hf")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disagrees with the tensors" in err[0]
