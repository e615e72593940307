"""Tiny random transformers LLaVA models as the numerical oracle, and the batch plumbing
between HF's flat image layout and vflan_jax's [batch, slots] layout."""
from __future__ import annotations

import numpy as np
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from vflan_jax.convert.hf_config import model_config_to_hf
from vflan_jax.convert.layout import canonical_key, llava_layout
from vflan_jax.convert.tensors import params_from_tensors
from vflan_jax.models.config import ModelConfig, get_preset


def nano_config(**overrides) -> ModelConfig:
    """The nano preset with an in-vocabulary image token, as HF requires."""
    base = get_preset("nano")
    return base.replace(image_token_id=base.text.vocab_size - 1, **overrides)


def build_hf_model(cfg: ModelConfig, seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(LlavaConfig(**model_config_to_hf(cfg))).eval()
    with torch.no_grad():  # norms start at exactly 1/0 in HF; perturb so they are tested too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_state_numpy(model) -> dict[str, np.ndarray]:
    return {canonical_key(k): v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}


def flax_params_from_hf(cfg: ModelConfig, model) -> dict:
    state = hf_state_numpy(model)
    return params_from_tensors(llava_layout(cfg), state.__getitem__)


def random_batch(cfg: ModelConfig, images_per_row: list[int], seq_len: int, seed: int,
                 pad_right: list[int] | None = None):
    """ids with image tokens spliced at random places, pixels, mask; HF and vflan_jax views."""
    rng = np.random.default_rng(seed)
    n = cfg.tokens_per_image
    b, k = len(images_per_row), max(max(images_per_row), 1)
    pad_right = pad_right or [0] * b
    ids = rng.integers(3, cfg.text.vocab_size - 1, size=(b, seq_len)).astype(np.int64)
    ids[:, 0] = cfg.text.bos_token_id
    for r, count in enumerate(images_per_row):
        start = 1
        for _ in range(count):
            start += int(rng.integers(0, 3))
            ids[r, start:start + n] = cfg.image_token_id
            start += n
        assert start <= seq_len - pad_right[r]
    attention = np.ones((b, seq_len), np.int64)
    for r, p in enumerate(pad_right):
        if p:
            ids[r, -p:] = cfg.text.pad_token_id
            attention[r, -p:] = 0
    size = cfg.vision.image_size
    pixels = np.zeros((b, k, 3, size, size), np.float32)
    mask = np.zeros((b, k), bool)
    flat = []
    for r, count in enumerate(images_per_row):
        for j in range(count):
            pixels[r, j] = rng.standard_normal((3, size, size))
            mask[r, j] = True
            flat.append(pixels[r, j])
    return dict(ids=ids, attention=attention, pixels=pixels, image_mask=mask, hf_pixels=np.stack(flat))


def hf_logits(model, batch) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(batch["ids"]), pixel_values=torch.from_numpy(batch["hf_pixels"]),
                    attention_mask=torch.from_numpy(batch["attention"]))
    return out.logits.float().numpy()


def rel_l2(a, b, where=None) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if where is not None:
        a, b = a[where], b[where]
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
