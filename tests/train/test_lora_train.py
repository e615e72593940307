"""The demo with LoRA over an int8-stored base (`configs/demo.py:lora=1,quantize=int8`), as users
run it: the loss falls, only adapters and the projector move, and a resume is bit-exact."""
import json
import shutil

import jax
import numpy as np
import pytest

from tests.train.cli import REPO, run, train_args
from vflan_jax.checkpoint import load_model
from vflan_jax.parallel import init_params, make_mesh


def lora_args(workdir, suite):
    args = train_args(workdir, suite, steps=8, checkpoint_every_steps=4, eval_max_examples=0)
    return [f"{REPO / 'configs/demo.py'}:lora=1,quantize=int8" if a == str(REPO / "configs/demo.py") else a
            for a in args]


def step_losses(workdir) -> list[tuple[int, float]]:
    with open(workdir / "metrics.jsonl") as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


@pytest.mark.slow   # runs the trainer in subprocesses
def test_lora_demo_learns_and_resumes_bit_exact(tmp_path):
    workdir, suite = tmp_path / "run", tmp_path / "synthetic"
    run(lora_args(workdir, suite))
    first = dict(step_losses(workdir))
    assert sorted(first) == list(range(1, 9))
    assert np.mean([first[s] for s in (6, 7, 8)]) < first[1] - 0.5, first

    params, cfg = load_model(workdir / "model")
    assert cfg.text.lora.quantize == "int8" and cfg.text.lora.rank == 64
    assert cfg.text.lora.dropout == 0.05   # LLaVA's, drawn in training: the resume below is bit-exact with it
    q_proj = params["language_model"]["layers"]["self_attn"]["q_proj"]
    assert q_proj["kernel"].dtype == np.int8 and np.abs(np.asarray(q_proj["lora_b"])).max() > 0   # B left zero
    # The frozen base is bit-identical to the initial one (seed 0); the projector moved.
    initial, _ = init_params(cfg, make_mesh((1, 1, 1), jax.devices()[:1]), seed=0)
    for name, now, then in (("q_proj", q_proj, initial["language_model"]["layers"]["self_attn"]["q_proj"]),
                            ("embed", params["language_model"]["embed_tokens"],
                             initial["language_model"]["embed_tokens"])):
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
        assert (c.lora.rank, c.lora.alpha, c.lora.dropout, c.optim.learning_rate, c.optim.projector_learning_rate) == (
            128, 256.0, 0.05, 2e-4, 2e-5)
        lora = model_config(c).text.lora
        assert lora.quantize == "nf4" and len(lora.targets) == 7 and lora.scale == 2.0
        assert model_config(load(name, "size=13b")).text.lora is None   # full fine-tuning stays the default
        with pytest.raises(ValueError, match="quantize"):
            load(name, "size=13b,quantize=nf4")   # quantizing without adapters would freeze nothing useful


def test_dropout_changes_the_training_loss_with_one_key_per_step_and_micro_batch():
    """The train step draws LoRA dropout from (state.rng, state.step, micro-batch): the loss differs from
    the dropout-free model's, is reproducible from the state, and accumulated micro-batches get distinct masks."""
    import flax.linen as nn
    import jax.numpy as jnp

    from tests.models.hf_oracle import nano_config
    from tests.train.batches import random_train_batch
    from vflan_jax.models.llava import LlavaForConditionalGeneration
    from vflan_jax.models.lora import LoraConfig
    from vflan_jax.train import optim
    from vflan_jax.train.step import TrainState, make_train_step

    def config(dropout):
        return nano_config(**{"text.lora": LoraConfig(4, 8.0, dropout=dropout)})

    cfg = config(0.3)
    b, t = 2, 12
    batch = random_train_batch(cfg, b, t)
    twice = {k: np.repeat(v, 2, axis=0) for k, v in batch.items()}   # both micro-batches of 2 are `batch`
    twice["task_ids"] = np.tile([[0], [1]], (b, t)).astype(np.int32)  # micro-batch j is task j (row i*2+j)

    model = LlavaForConditionalGeneration(cfg)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch["input_ids"], batch["pixel_values"])["params"])
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map_with_path(   # nonzero B: with B = 0 dropout could not show in the loss
        lambda p, x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32) if p[-1].key == "lora_b" else x, params)
    mask = optim.trainable_mask(params, ("projector", "llm"))
    tx, _ = optim.make_optimizer(optim.default_optim_config(), optim.split(params, mask)[0], total_steps=10)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(optim.split(params, mask)[0]),
                       jax.random.key_data(jax.random.key(0)))

    def per_micro_batch(c):   # the step's loss sums of micro-batch 0 and 1
        step = jax.jit(make_train_step(LlavaForConditionalGeneration(c), tx, lambda p: optim.split(p, mask),
                                       num_tasks=2, grad_accum_steps=2))
        return lambda s: np.asarray(step(s, twice)[1]["task_loss_sum"])
    dropped, plain = per_micro_batch(cfg), per_micro_batch(config(0.0))
    first, second = dropped(state)
    np.testing.assert_array_equal(dropped(state), [first, second])   # a function of the state: resumes exactly
    assert abs(first - plain(state)[0]) > 1e-4      # dropout acts in training
    assert abs(second - first) > 1e-4               # each micro-batch draws its own masks
    assert abs(first - dropped(state._replace(step=state.step + 1))[0]) > 1e-4               # each step ...
    assert abs(first - dropped(state._replace(rng=jax.random.key_data(jax.random.key(1))))[0]) > 1e-4  # ... and seed


def documented_lora_demo() -> list[list[str]]:
    """The two commands of configs/demo.py's docstring (a brief full-tuning base, then LoRA on it), as written."""
    import ast
    import shlex
    doc = ast.get_docstring(ast.parse((REPO / "configs/demo.py").read_text()))
    lines = doc.split("\n\n    python -m vflan_jax.train --config configs/demo.py --workdir runs/demo-base", 1)[1]
    text = "python -m vflan_jax.train --config configs/demo.py --workdir runs/demo-base" + lines.split("\n\n")[0]
    commands = [shlex.split(c) for c in text.replace("\\\n", " ").splitlines() if c.strip()]
    assert len(commands) == 2 and "configs/demo.py:lora=1" in commands[1], commands
    return commands


@pytest.mark.slow   # two trainer runs in subprocesses, ~2 min
def test_the_documented_lora_demo_learns_the_heldout_tasks_and_exports_to_peft(tmp_path):
    """LoRA on a base trained only briefly (at chance on the held-out tasks) lifts held-out exact match well
    above chance, and prints it; its merged and PEFT exports load in transformers (+ peft) with its logits.
    Run from a folder holding configs/ with the documented relative paths; only the evaluation is made smaller."""
    import subprocess
    import sys

    from tests.train.cli import env
    (tmp_path / "configs").symlink_to(REPO / "configs")
    outputs = []
    for command in documented_lora_demo():
        assert command[:3] == ["python", "-m", "vflan_jax.train"]
        proc = subprocess.run([sys.executable, *command[1:], "--config.eval_max_examples=96"], cwd=tmp_path,
                              env=env(), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        outputs.append(proc.stdout)
    base, lora = (json.loads((tmp_path / "runs" / w / "summary.json").read_text()) for w in ("demo-base", "demo-lora"))
    chance = lora["eval"]["heldout_chance"]
    assert base["eval"]["heldout_accuracy"] < chance + 0.1, base["eval"]     # the base has not learned them
    assert lora["eval"]["heldout_accuracy"] > max(chance, base["eval"]["heldout_accuracy"]) + 0.15, lora["eval"]
    assert lora["final_loss"] < lora["first_loss"], lora
    assert "heldout tasks: exact-match accuracy" in outputs[1] and "trained 300 steps: loss" in outputs[1]
    params, cfg = load_model(tmp_path / "runs/demo-lora/model")
    assert cfg.text.lora is not None and "lora_a" in params["language_model"]["layers"]["self_attn"]["q_proj"]

    # Its exports: merged weights, and a PEFT adapter over the exported base, give this model's logits.
    import torch
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration as HFLlava

    from tests.models.hf_oracle import hf_logits, random_batch, rel_l2
    from vflan_jax.convert.__main__ import main as convert
    from vflan_jax.models.llava import LlavaForConditionalGeneration
    runs = tmp_path / "runs"
    for checkpoint, out, extra in (("demo-base", "hf-base", []), ("demo-lora", "hf-merged", []),
                                   ("demo-lora", "adapter", ["--adapter_only"])):
        assert convert(["export-hf", "--checkpoint", str(runs / checkpoint / "model"), "--out", str(tmp_path / out),
                        *extra]) == 0
    batch = random_batch(cfg, [1, 1], cfg.tokens_per_image + 12, seed=7)
    ours = np.asarray(LlavaForConditionalGeneration(cfg).apply(
        {"params": params}, batch["ids"].astype(np.int32), batch["pixels"], batch["image_mask"]))
    merged = HFLlava.from_pretrained(tmp_path / "hf-merged", dtype=torch.float32).eval()
    # The demo's model marks images with LLaVA's -200; the export adds an <image> token to the vocabulary.
    hf_batch = {**batch, "ids": np.where(batch["ids"] == cfg.image_token_id, merged.config.image_token_id,
                                         batch["ids"])}
    hf_vocab = merged.config.text_config.vocab_size
    ours = ours[..., :cfg.text.vocab_size]
    assert rel_l2(hf_logits(merged, hf_batch)[..., :cfg.text.vocab_size], ours) <= 1e-5 and hf_vocab >= ours.shape[-1]
    base_model = HFLlava.from_pretrained(tmp_path / "hf-base", dtype=torch.float32).eval()
    before = hf_logits(base_model, hf_batch)[..., :cfg.text.vocab_size]
    with_adapter = PeftModel.from_pretrained(base_model, tmp_path / "adapter").eval()
    assert rel_l2(hf_logits(with_adapter, hf_batch)[..., :cfg.text.vocab_size], ours) <= 1e-5
    assert rel_l2(before, ours) > 1e-3   # the adapter (and projector) carry what LoRA learned
