"""Logits parity with transformers' LlavaForConditionalGeneration (float32, rel L2 <= 1e-5)."""
import jax.numpy as jnp
import numpy as np
import pytest

from tests.models.hf_oracle import build_hf_model, flax_params_from_hf, hf_logits, nano_config, random_batch, rel_l2
from vflan_jax.models.llava import LlavaForConditionalGeneration

TOL = 1e-5


def _flax_logits(cfg, params, batch):
    model = LlavaForConditionalGeneration(cfg)
    ids = jnp.asarray(batch["ids"], jnp.int32)
    segment_ids = jnp.asarray(batch["attention"], jnp.int32)
    return np.asarray(model.apply({"params": params}, ids, jnp.asarray(batch["pixels"]),
                                  jnp.asarray(batch["image_mask"]), None, segment_ids))


@pytest.mark.parametrize("overrides", [
    dict(),                                                     # GQA (4 heads / 2 kv), layer -2, drop CLS
    {"text.num_kv_heads": 4},                                   # MHA
    dict(vision_feature_layer=-1),
    dict(vision_feature_select_strategy="full"),
    dict(vision_feature_layer=1, vision_feature_select_strategy="full"),
], ids=["gqa", "mha", "layer-1", "full", "layer1-full"])
def test_logits_match_transformers(overrides):
    cfg = nano_config(**overrides)
    hf = build_hf_model(cfg, seed=1)
    params = flax_params_from_hf(cfg, hf)
    n = cfg.tokens_per_image
    batch = random_batch(cfg, images_per_row=[1, 1], seq_len=n + 12, seed=2)
    ours, ref = _flax_logits(cfg, params, batch), hf_logits(hf, batch)
    assert ours.shape == ref.shape
    assert rel_l2(ours, ref) <= TOL


def test_right_padded_batch_and_uneven_images_match():
    """Row 0: two images and no padding; row 1: one image, an unused slot and right padding."""
    cfg = nano_config()
    hf = build_hf_model(cfg, seed=3)
    params = flax_params_from_hf(cfg, hf)
    n = cfg.tokens_per_image
    batch = random_batch(cfg, images_per_row=[2, 1], seq_len=2 * n + 10, seed=4, pad_right=[0, 7])
    ours, ref = _flax_logits(cfg, params, batch), hf_logits(hf, batch)
    real = batch["attention"].astype(bool)
    assert rel_l2(ours, ref, where=real) <= TOL
    # The padding must not leak into the real tokens: changing pad ids leaves them unchanged.
    batch["ids"][1, -7:] = 5
    assert np.allclose(_flax_logits(cfg, params, batch)[real], ours[real], atol=1e-6)


def test_text_only_rows_match():
    cfg = nano_config()
    hf = build_hf_model(cfg, seed=5)
    params = flax_params_from_hf(cfg, hf)
    rng = np.random.default_rng(6)
    ids = rng.integers(3, cfg.text.vocab_size - 1, size=(2, 9))
    import torch
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids)).logits.numpy()
    ours = LlavaForConditionalGeneration(cfg).apply({"params": params}, jnp.asarray(ids, jnp.int32))
    assert rel_l2(ours, ref) <= TOL
