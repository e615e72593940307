"""verify's JSON and exit codes: an export agrees with its checkpoint (despite the image id
shift), another model does not."""
import json

from tests.convert.checkpoints import write_llava_hf
from vflan_jax.cli import EXIT_VERIFY_MISMATCH
from vflan_jax.convert.__main__ import main
from vflan_jax.convert.hf_export import export_hf


def run_verify(capsys, *args):
    capsys.readouterr()
    code = main(["verify", *map(str, args)])
    return code, json.loads(capsys.readouterr().out)


def test_verify_export_passes_and_other_model_fails(tmp_path, placeholder_checkpoint, nano_cfg, capsys):
    ckpt, _ = placeholder_checkpoint
    export_hf(ckpt, tmp_path / "hf", progress=False)
    code, good = run_verify(capsys, "--checkpoint", ckpt, "--hf_dir", tmp_path / "hf", "--tolerance", "1e-5")
    assert code == 0 and good["passed"] and good["tolerance"] == 1e-5
    assert good["rel_l2"] <= 1e-5 and good["max_abs_diff"] < 1e-4 and good["argmax_agreement"] == 1.0
    assert good["image_token_id"] == {"checkpoint": -200, "hf": nano_cfg.text.vocab_size}
    assert good["compared_vocab"] == nano_cfg.text.vocab_size and good["hf_logits_shape"][-1] == 192

    write_llava_hf(tmp_path / "other", nano_cfg, seed=99)
    code, bad = run_verify(capsys, "--checkpoint", ckpt, "--hf_dir", tmp_path / "other")
    assert code == EXIT_VERIFY_MISMATCH == 3 and not bad["passed"]
    assert bad["rel_l2"] > 0.1 and bad["argmax_agreement"] < 0.9
