"""The demo with LoRA over an int8-stored base (`configs/demo.py:lora=1,quantize=int8`), as users
run it: the loss falls, only adapters and the projector move, and a resume is bit-exact."""
import json
import shutil

import jax
import numpy as np

from tests.train.cli import REPO, run, train_args
from vflan_jax.model_checkpoint import load_model
from vflan_jax.parallel import init_params, make_mesh


def lora_args(workdir, suite):
    args = train_args(workdir, suite, steps=8, checkpoint_every_steps=4, eval_max_examples=0)
    return [f"{REPO / 'configs/demo.py'}:lora=1,quantize=int8" if a == str(REPO / "configs/demo.py") else a
            for a in args]


def step_losses(workdir) -> list[tuple[int, float]]:
    with open(workdir / "metrics.jsonl") as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def test_lora_demo_learns_and_resumes_bit_exact(tmp_path):
    workdir, suite = tmp_path / "run", tmp_path / "synthetic"
    run(lora_args(workdir, suite))
    first = dict(step_losses(workdir))
    assert sorted(first) == list(range(1, 9))
    assert np.mean([first[s] for s in (6, 7, 8)]) < first[1] - 0.5, first

    params, cfg = load_model(workdir / "model")
    assert cfg.text.lora.quantize == "int8" and cfg.text.lora.rank == 64
    q_proj = params["language_model"]["layers"]["self_attn"]["q_proj"]
    assert q_proj["kernel"].dtype == np.int8 and np.abs(np.asarray(q_proj["lora_b"])).max() > 0   # B left zero
    # The frozen base is bit-identical to the initial one (seed 0); the projector moved.
    initial, _ = init_params(cfg, make_mesh((1, 1, 1), jax.devices()[:1]), seed=0)
    for name, now, then in (("q_proj", q_proj, initial["language_model"]["layers"]["self_attn"]["q_proj"]),
                            ("embed", params["language_model"]["embed_tokens"], initial["language_model"]["embed_tokens"])):
        for leaf in set(now) - {"lora_a", "lora_b"}:
            np.testing.assert_array_equal(np.asarray(now[leaf]), np.asarray(then[leaf]), err_msg=f"{name}/{leaf}")
    assert not np.array_equal(np.asarray(params["multi_modal_projector"]["linear_1"]["kernel"]),
                              np.asarray(initial["multi_modal_projector"]["linear_1"]["kernel"]))

    # Resume from step 4: drop what steps 5-8 left, rerun the same command.
    shutil.rmtree(workdir / "checkpoints" / "8")
    shutil.rmtree(workdir / "model")
    (workdir / "summary.json").unlink()
    run(lora_args(workdir, suite))
    assert "resumed from step 4" in (workdir / "train.log").read_text()
    rerun = step_losses(workdir)   # the trainer rewinds metrics.jsonl to the resumed step
    assert [s for s, _ in rerun] == list(range(1, 9))
    assert dict(rerun) == first   # steps 5-8 recomputed bit-exact, not approximately
    resumed, _ = load_model(workdir / "model")
    np.testing.assert_array_equal(np.asarray(resumed["language_model"]["layers"]["mlp"]["up_proj"]["lora_a"]),
                                  np.asarray(params["language_model"]["layers"]["mlp"]["up_proj"]["lora_a"]))


def test_stage_configs_take_llavas_lora_recipe():
    import importlib.util

    import pytest

    from vflan_jax.train.config import model_config

    def load(name, arg):
        spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(arg)

    for name in ("vflan_stage1", "vflan_stage2"):
        c = load(name, "size=13b,lora=1,quantize=nf4")
        assert (c.lora.rank, c.lora.alpha, c.optim.learning_rate, c.optim.projector_learning_rate) == (128, 256.0, 2e-4, 2e-5)
        lora = model_config(c).text.lora
        assert lora.quantize == "nf4" and len(lora.targets) == 7 and lora.scale == 2.0
        assert model_config(load(name, "size=13b")).text.lora is None   # full fine-tuning stays the default
        with pytest.raises(ValueError, match="quantize"):
            load(name, "size=13b,quantize=nf4")   # quantizing without adapters would freeze nothing useful
