"""LoRA checkpoints out to transformers (merged weights; a PEFT adapter on the base) and a PEFT
adapter trained in PyTorch back in, each checked by logits against the other side's model."""
import json

import jax
import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig, PeftModel, get_peft_model
from safetensors.numpy import load_file
from transformers import LlavaForConditionalGeneration as HFLlava

from tests.models.hf_oracle import hf_logits, random_batch, rel_l2
from vflan_jax.checkpoint import load_model, save_model
from vflan_jax.convert.__main__ import main as convert
from vflan_jax.convert.hf_import import import_llava_hf
from vflan_jax.models import lora_params
from vflan_jax.models.llava import LlavaForConditionalGeneration
from vflan_jax.models.lora import PROJECTIONS, LoraConfig


def our_logits(params, cfg, batch):
    return np.asarray(LlavaForConditionalGeneration(cfg).apply(
        {"params": params}, batch["ids"].astype(np.int32), batch["pixels"], batch["image_mask"]))


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory, llava_hf_dir):
    """A LoRA checkpoint on the HF fixture's weights, as training leaves it: adapters on every
    projection with nonzero B, and a projector that moved."""
    hf_dir, _ = llava_hf_dir
    params, cfg, _ = import_llava_hf(hf_dir, progress=False)
    cfg = cfg.replace(**{"text.lora": LoraConfig(4, 8.0, 0.05, PROJECTIONS)})
    params = lora_params.with_adapters(params, cfg, seed=1)
    rng = np.random.default_rng(2)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + rng.standard_normal(x.shape).astype(np.float32) * 0.05
        if p[-1].key == "lora_b" or p[0].key == "multi_modal_projector" else x, params)
    out = tmp_path_factory.mktemp("lora") / "ckpt"
    save_model(out, params, cfg, tokenizer_dir=hf_dir)
    return out, params, cfg


def test_merged_export_and_peft_adapter_give_the_lora_models_logits(lora_checkpoint, llava_hf_dir, tmp_path):
    ckpt, params, cfg = lora_checkpoint
    batch = random_batch(cfg, [1, 1], cfg.tokens_per_image + 10, seed=5)
    ours = our_logits(params, cfg, batch)
    plain = our_logits(lora_params.merged(params, cfg)[0], cfg.replace(**{"text.lora": None}), batch)
    assert rel_l2(plain, ours) <= 1e-5

    assert convert(["export-hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "merged")]) == 0
    merged = HFLlava.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert rel_l2(hf_logits(merged, batch), ours) <= 1e-5

    assert convert(["export-hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "adapter"), "--adapter_only"]) == 0
    written = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert written == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["lora_dropout"] == 0.05
    base = HFLlava.from_pretrained(llava_hf_dir[0], dtype=torch.float32).eval()
    before = hf_logits(base, batch)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert rel_l2(hf_logits(peft_model, batch), ours) <= 1e-5
    assert rel_l2(before, ours) > 1e-3   # the adapter (and projector) carried the difference


def test_adapter_trained_with_peft_imports_with_the_same_logits(llava_hf_dir, tmp_path):
    hf_dir, _ = llava_hf_dir
    torch.manual_seed(0)
    base = HFLlava.from_pretrained(hf_dir, dtype=torch.float32)
    peft_cfg = PeftLoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, modules_to_save=["multi_modal_projector"],
                              target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)")
    model = get_peft_model(base, peft_cfg)
    cfg = import_llava_hf(hf_dir, progress=False)[1]
    batch = random_batch(cfg, [1, 1], cfg.tokens_per_image + 10, seed=7)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.from_numpy(batch["ids"])
    for _ in range(3):   # train, so lora_B and the projector are no longer at their initial values
        out = model(input_ids=ids, pixel_values=torch.from_numpy(batch["hf_pixels"]), labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval().save_pretrained(tmp_path / "peft")
    expected = hf_logits(model, batch)

    assert convert(["import-hf", "--hf_dir", str(hf_dir), "--adapter", str(tmp_path / "peft"),
                    "--out", str(tmp_path / "ckpt")]) == 0
    params, got_cfg = load_model(tmp_path / "ckpt")
    assert got_cfg.text.lora.targets == ("q_proj", "v_proj", "down_proj") and got_cfg.text.lora.scale == 4.0
    assert got_cfg.text.lora.dropout == 0.1   # trained with dropout; evaluated (below) without, as peft's eval()
    assert rel_l2(our_logits(params, got_cfg, batch), expected) <= 1e-5


def test_bad_adapters_are_named(llava_hf_dir, tmp_path, capsys):
    hf_dir, _ = llava_hf_dir
    base = HFLlava.from_pretrained(hf_dir, dtype=torch.float32)
    # LoRA on the vision tower: no vflan_jax place for it, so the import refuses, naming the tensor.
    vision_lora = PeftLoraConfig(r=2, target_modules=r".*vision_tower.*\.q_proj")
    get_peft_model(base, vision_lora).save_pretrained(tmp_path / "v")
    assert convert(["import-hf", "--hf_dir", str(hf_dir), "--adapter", str(tmp_path / "v"),
                    "--out", str(tmp_path / "c1")]) == 2
    assert "vision_tower" in capsys.readouterr().err and not (tmp_path / "c1").exists()
    config = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    (tmp_path / "v" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    assert convert(["import-hf", "--hf_dir", str(hf_dir), "--adapter", str(tmp_path / "v"),
                    "--out", str(tmp_path / "c2")]) == 2
    assert "use_dora=True" in capsys.readouterr().err
    # A plain checkpoint has no adapter to export.
    params, cfg, _ = import_llava_hf(hf_dir, progress=False)
    save_model(tmp_path / "plain", params, cfg)
    assert convert(["export-hf", "--checkpoint", str(tmp_path / "plain"), "--out", str(tmp_path / "a"),
                    "--adapter_only"]) == 2
    assert "no LoRA adapters" in capsys.readouterr().err


def test_adapter_file_layout_is_peft_s(lora_checkpoint, tmp_path):
    """Shapes as PEFT stores them: lora_A [r, in], lora_B [out, r], per layer, adapter name dropped."""
    ckpt, params, cfg = lora_checkpoint
    assert convert(["export-hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "a"), "--adapter_only"]) == 0
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    t = cfg.text
    key = "base_model.model.model.language_model.layers.1.mlp.down_proj.lora_{}.weight"
    assert tensors[key.format("A")].shape == (4, t.intermediate_size)
    assert tensors[key.format("B")].shape == (t.hidden_size, 4)
    np.testing.assert_array_equal(tensors[key.format("B")],
                                  np.asarray(params["language_model"]["layers"]["mlp"]["down_proj"]["lora_b"][1]).T)
    assert len([k for k in tensors if "lora_A" in k]) == len(PROJECTIONS) * t.num_layers
