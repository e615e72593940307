"""`convert import-hf / export-hf --sharding_overrides NAME=AXES`: parameters are placed by the
overridden rules, and a bad override is one line with exit status 2 before any weight is read."""
import jax
import pytest
from jax.sharding import PartitionSpec as P

from vflan_jax import checkpoint
from vflan_jax.cli import EXIT_BAD_INPUT, EXIT_OK
from vflan_jax.convert import hf_export
from vflan_jax.convert.__main__ import main
from vflan_jax.parallel import rules_with


@pytest.fixture
def fake_checkpoint(tmp_path):
    """Enough of a model checkpoint for export-hf's first check; reading it would fail the test."""
    (tmp_path / "ckpt" / checkpoint.PARAMS).mkdir(parents=True)
    (tmp_path / "ckpt" / checkpoint.CONFIG).write_text("{}")
    return tmp_path / "ckpt"


@pytest.mark.parametrize("command", ["import-hf", "export-hf"])
def test_a_bad_override_is_one_line_and_status_2(command, tmp_path, fake_checkpoint, capsys):
    source = ["--hf_dir", str(tmp_path / "no_hf")] if command == "import-hf" else ["--checkpoint", str(fake_checkpoint)]
    args = [command, *source, "--out", str(tmp_path / "out"), "--sharding_overrides", "mlp=none", "heads=model"]
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --sharding_overrides heads: mesh axis 'model' is not one of ('data', 'fsdp', 'tensor') "
                   "(or 'none' for replicated)"]
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices; see tests/conftest.py")
def test_import_places_the_parameters_by_the_overrides(tmp_path, llava_hf_dir, monkeypatch):
    saved = {}
    monkeypatch.setattr(checkpoint, "save_model_atomically", lambda out, params, *a, **k: saved.update(params))
    args = ["import-hf", "--hf_dir", str(llava_hf_dir[0]), "--out", str(tmp_path / "out"), "--mesh", "2,2,2",
            "--sharding_overrides", "mlp=none"]
    assert main(args) == EXIT_OK
    layers = saved["language_model"]["layers"]
    assert layers["mlp"]["gate_proj"]["kernel"].sharding.spec == P(None, "fsdp", None)       # mlp: replicated
    assert layers["self_attn"]["q_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")  # untouched


def test_export_reads_the_checkpoint_with_the_overrides(tmp_path, fake_checkpoint, monkeypatch):
    seen = {}

    def record(*args, **kw):
        seen.update(kw)
        return {"image_token_id": 0, "text_config": {"vocab_size": 1}, "dtype": "float32"}
    monkeypatch.setattr(hf_export, "export_hf", record)
    args = ["export-hf", "--checkpoint", str(fake_checkpoint), "--out", str(tmp_path / "hf"),
            "--sharding_overrides", "mlp=fsdp,tensor", "embed=none"]
    assert main(args) == EXIT_OK
    assert seen["rules"] == rules_with({"mlp": ("fsdp", "tensor"), "embed": None})


def test_overrides_that_clash_on_a_parameter_are_one_line_and_status_2(tmp_path, llava_hf_dir, capsys):
    """mlp over fsdp too: embed already holds fsdp in the MLP kernels, found before any weight is read."""
    args = ["import-hf", "--hf_dir", str(llava_hf_dir[0]), "--out", str(tmp_path / "out"),
            "--sharding_overrides", "mlp=fsdp,tensor"]
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --sharding_overrides: parameter "), err
    assert "sharding rule mlp=('fsdp', 'tensor') cannot apply: mesh axis 'fsdp' is already taken by embed" in err[0]
    assert not (tmp_path / "out").exists()
