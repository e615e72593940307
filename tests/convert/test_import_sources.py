"""The three import sources each give the logits of the equivalent transformers model:
a llava-hf directory, CLIP + LLaMA (+ LLaVA projector file), and an original LLaVA checkpoint."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import LlavaConfig, LlavaForConditionalGeneration

from tests.convert.checkpoints import projector_state, write_clip, write_llama, write_original_llava
from tests.models.hf_oracle import hf_logits, random_batch, rel_l2
from vflan_jax.checkpoint import load_any
from vflan_jax.convert.hf_config import model_config_to_hf
from vflan_jax.convert.hf_import import import_composed
from vflan_jax.models.llava import LlavaForConditionalGeneration as FlaxLlava

TOL = 1e-5


def flax_logits(cfg, params, batch, image_token_id):
    ids = np.where(batch["ids"] == batch["hf_image_token"], image_token_id, batch["ids"])
    forward = jax.jit(FlaxLlava(cfg).apply)  # compiled once: much faster than op-by-op on CPU
    return np.asarray(forward({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(batch["pixels"]),
                              jnp.asarray(batch["image_mask"])))


def assembled_reference(cfg, clip_vision, llama, proj: dict):
    """transformers' LLaVA built from the parts (what LLaVA's builder assembles at load time).
    HF needs an in-vocabulary image id; the last vocabulary entry stands in for -200."""
    hf_cfg = cfg.replace(image_token_id=cfg.text.vocab_size - 1)
    model = LlavaForConditionalGeneration(LlavaConfig(**model_config_to_hf(hf_cfg))).eval()
    model.model.vision_tower.load_state_dict(clip_vision.state_dict())
    model.model.language_model.load_state_dict(llama.model.state_dict())
    model.lm_head.load_state_dict(llama.lm_head.state_dict())
    names = sorted({k.rsplit(".", 2)[-2] for k in proj})
    with torch.no_grad():
        for hf_name, src in zip(("linear_1", "linear_2"), names, strict=True):
            layer = getattr(model.model.multi_modal_projector, hf_name)
            layer.weight.copy_(proj[f"model.mm_projector.{src}.weight"])
            layer.bias.copy_(proj[f"model.mm_projector.{src}.bias"])
    return model, hf_cfg


def check_logits(cfg, params, reference, hf_cfg):
    batch = random_batch(hf_cfg, [1, 1], cfg.tokens_per_image + 8, seed=9)
    batch["hf_image_token"] = hf_cfg.image_token_id
    ours = flax_logits(cfg, params, batch, cfg.image_token_id)
    assert rel_l2(ours, hf_logits(reference, batch)) <= TOL


def test_llava_hf_dir_via_load_any(llava_hf_dir, nano_cfg):
    hf_dir, model = llava_hf_dir
    params, cfg, tok_dir = load_any(hf_dir)
    assert cfg == nano_cfg and tok_dir == hf_dir
    batch = random_batch(cfg, [1, 1], cfg.tokens_per_image + 8, seed=9)
    batch["hf_image_token"] = cfg.image_token_id
    assert rel_l2(flax_logits(cfg, params, batch, cfg.image_token_id), hf_logits(model, batch)) <= TOL


@pytest.mark.parametrize("clip_kind,projector_kind", [("full", "bin"), ("vision", "safetensors")])
def test_clip_plus_llama_plus_projector_file(tmp_path, nano_cfg, clip_kind, projector_kind):
    clip = write_clip(tmp_path / "clip", nano_cfg, full=clip_kind == "full", seed=1)
    llama = write_llama(tmp_path / "llm", nano_cfg, seed=2)
    proj = projector_state(nano_cfg, seed=3)
    proj_file = tmp_path / f"mm_projector.{projector_kind}"
    torch.save(proj, proj_file) if projector_kind == "bin" else save_file(proj, proj_file)

    params, cfg, _ = import_composed(tmp_path / "clip", tmp_path / "llm", proj_file, progress=False)
    assert cfg.image_token_id == -200 and cfg.text.vocab_size == nano_cfg.text.vocab_size  # no vocab change
    assert cfg.vision == nano_cfg.vision and cfg.text == nano_cfg.text
    reference, hf_cfg = assembled_reference(cfg, clip, llama, proj)
    check_logits(cfg, params, reference, hf_cfg)


def test_original_llava_checkpoint_as_llm(tmp_path, nano_cfg):
    clip = write_clip(tmp_path / "clip", nano_cfg, seed=4)
    # Its own copy of a (different) tower is ignored: the CLIP directory is the source.
    decoy = {k: torch.zeros_like(v) for k, v in clip.state_dict().items()}
    llama, proj = write_original_llava(tmp_path / "llava", nano_cfg, seed=5, with_tower=decoy)
    params, cfg, _ = import_composed(tmp_path / "clip", tmp_path / "llava", progress=False)
    assert cfg.projector_type == "mlp2x_gelu" and cfg.vision_feature_layer == nano_cfg.vision_feature_layer
    reference, hf_cfg = assembled_reference(cfg, clip, llama, proj)
    check_logits(cfg, params, reference, hf_cfg)


def test_original_llava_feature_options_come_from_its_config(tmp_path, nano_cfg):
    cfg_in = nano_cfg.replace(vision_feature_layer=-1, vision_feature_select_strategy="full")
    write_clip(tmp_path / "clip", cfg_in, seed=4)
    write_original_llava(tmp_path / "llava", cfg_in, seed=5)
    _, cfg, _ = import_composed(tmp_path / "clip", tmp_path / "llava", progress=False)
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (-1, "full")


def test_without_projector_it_is_freshly_initialised(tmp_path, nano_cfg):
    clip = write_clip(tmp_path / "clip", nano_cfg, seed=6)
    llama = write_llama(tmp_path / "llm", nano_cfg, seed=7)
    params, cfg, _ = import_composed(tmp_path / "clip", tmp_path / "llm", progress=False, seed=3)
    p = jax.tree.map(np.asarray, params["multi_modal_projector"])
    v, h = cfg.vision.hidden_size, cfg.text.hidden_size
    assert p["linear_1"]["kernel"].shape == (v, h) and p["linear_2"]["kernel"].shape == (h, h)
    for name, fan_in in (("linear_1", v), ("linear_2", h)):  # PyTorch Linear default: U(+-1/sqrt(fan_in))
        for leaf in p[name].values():
            assert np.abs(leaf).max() <= fan_in ** -0.5 and leaf.std() > 0.3 * fan_in ** -0.5
    again, _, _ = import_composed(tmp_path / "clip", tmp_path / "llm", progress=False, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True))
    # The rest is the checkpoints' (logits match with the fresh projector copied into HF).
    proj = {"model.mm_projector.0.weight": torch.from_numpy(p["linear_1"]["kernel"].T.copy()),
            "model.mm_projector.0.bias": torch.from_numpy(p["linear_1"]["bias"].copy()),
            "model.mm_projector.2.weight": torch.from_numpy(p["linear_2"]["kernel"].T.copy()),
            "model.mm_projector.2.bias": torch.from_numpy(p["linear_2"]["bias"].copy())}
    reference, hf_cfg = assembled_reference(cfg, clip, llama, proj)
    check_logits(cfg, params, reference, hf_cfg)
