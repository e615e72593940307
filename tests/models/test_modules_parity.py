"""Module-level parity with transformers: vision tower hidden states, projector, one decoder layer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.models.hf_oracle import build_hf_model, flax_params_from_hf, nano_config, rel_l2
from vflan_jax.models.clip import CLIPVisionTower
from vflan_jax.models.llama import LlamaDecoderLayer
from vflan_jax.models.projector import Projector

TOL = 1e-5


@pytest.mark.parametrize("feature_layer", [-2, -1, 0, 2])
def test_vision_tower_hidden_state(feature_layer):
    cfg = nano_config(vision_feature_layer=feature_layer)
    hf = build_hf_model(cfg, seed=11)
    params = flax_params_from_hf(cfg, hf)["vision_tower"]
    pixels = np.random.default_rng(12).standard_normal((3, 3, 28, 28)).astype(np.float32)
    with torch.no_grad():
        ref = hf.model.vision_tower(torch.from_numpy(pixels), output_hidden_states=True).hidden_states[feature_layer]
    tower = CLIPVisionTower(cfg.vision, cfg.vision_layers_used)
    ours = tower.apply({"params": params}, jnp.asarray(pixels))
    assert rel_l2(ours, ref.numpy()) <= TOL


def test_projector_exact_gelu():
    cfg = nano_config()
    hf = build_hf_model(cfg, seed=13)
    params = flax_params_from_hf(cfg, hf)["multi_modal_projector"]
    feats = np.random.default_rng(14).standard_normal((2, 4, cfg.vision.hidden_size)).astype(np.float32) * 3
    with torch.no_grad():
        ref = hf.model.multi_modal_projector(torch.from_numpy(feats)).numpy()
    ours = Projector(cfg.projector_type, cfg.text.hidden_size).apply({"params": params}, jnp.asarray(feats))
    assert rel_l2(ours, ref) <= TOL


def test_one_decoder_layer_with_rope():
    cfg = nano_config(**{"text.rope_theta": 500.0})  # a non-default theta must be honoured
    hf = build_hf_model(cfg, seed=15)
    layer_params = jax.tree.map(lambda x: x[1], flax_params_from_hf(cfg, hf)["language_model"]["layers"])
    b, t, d = 2, 7, cfg.text.hidden_size
    rng = np.random.default_rng(16)
    h = rng.standard_normal((b, t, d)).astype(np.float32)
    positions = np.stack([np.arange(t), np.arange(t) + 5])  # an offset row checks positions are used
    lm = hf.model.language_model
    with torch.no_grad():
        cos_sin = lm.rotary_emb(torch.from_numpy(h), torch.from_numpy(positions))
        causal = torch.full((t, t), float("-inf")).triu(1)[None, None].expand(b, 1, t, t)
        ref = lm.layers[1](torch.from_numpy(h), attention_mask=causal, position_embeddings=cos_sin,
                           position_ids=torch.from_numpy(positions))
        ref = ref[0] if isinstance(ref, tuple) else ref
    seg = jnp.ones((b, t), jnp.int32)
    layer = LlamaDecoderLayer(cfg.text, jnp.float32, jnp.float32, "xla")
    ours, _ = layer.apply({"params": layer_params}, jnp.asarray(h), jnp.asarray(positions), seg)
    assert rel_l2(ours, ref.numpy()) <= TOL
