"""Run a vflan_jax model checkpoint (JAX) and a transformers LLaVA directory (PyTorch, CPU)
on the same seeded random batch and compare their logits.

Each model gets ids with its own image token: when the HF directory is an export of the
checkpoint, ours uses LLaVA's -200 and HF the added "<image>" id (convert/image_token.py).
Text ids are drawn below both vocabularies, and logits are compared over the shared
vocabulary columns (an export's extra rows only exist on the HF side).
"""
from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from vflan_jax.checkpoint import load_model
from vflan_jax.convert.errors import ConversionError
from vflan_jax.convert.hf_config import model_config_from_hf
from vflan_jax.models.llava import LlavaForConditionalGeneration


def random_batch(tokens_per_image: int, image_size: int, text_vocab: int, excluded: set[int], batch: int,
                 seq_len: int, seed: int):
    """(ids with -1 at image slots, pixels [B, 1, 3, H, W]); one image per row at a random offset."""
    if seq_len < tokens_per_image + 2:
        raise ValueError(f"seq_len {seq_len} leaves no room for {tokens_per_image} image tokens and text")
    rng = np.random.default_rng(seed)
    allowed = np.setdiff1d(np.arange(3, text_vocab), sorted(excluded))
    ids = rng.choice(allowed, size=(batch, seq_len)).astype(np.int64)
    ids[:, 0] = 1
    for row in range(batch):
        start = int(rng.integers(1, seq_len - tokens_per_image + 1))
        ids[row, start:start + tokens_per_image] = -1
    pixels = rng.standard_normal((batch, 1, 3, image_size, image_size)).astype(np.float32)
    return ids, pixels


def compare(ours: np.ndarray, ref: np.ndarray) -> dict:
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    return {"max_abs_diff": float(diff.max()),
            "rel_l2": float(np.linalg.norm(ours - ref.astype(np.float64)) / np.linalg.norm(ref.astype(np.float64))),
            "argmax_agreement": float((ours.argmax(-1) == ref.argmax(-1)).mean())}


def verify(checkpoint, hf_dir, tolerance: float = 1e-4, batch: int = 2, seq_len: int | None = None,
           seed: int = 0) -> dict:
    import torch
    from transformers import LlavaForConditionalGeneration as HFLlava

    hf_dir = pathlib.Path(hf_dir)
    params, cfg = load_model(checkpoint, dtype="float32")
    cfg = cfg.replace(dtype="float32")
    hf_cfg = model_config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    for field in ("tokens_per_image", "vision_layers_used"):
        if getattr(cfg, field) != getattr(hf_cfg, field):
            raise ConversionError(f"{checkpoint} and {hf_dir} differ in {field}: "
                                  f"{getattr(cfg, field)} vs {getattr(hf_cfg, field)}")
    n = cfg.tokens_per_image
    shared_vocab = min(cfg.text.vocab_size, hf_cfg.text.vocab_size)
    ids, pixels = random_batch(n, cfg.vision.image_size, shared_vocab, {cfg.image_token_id, hf_cfg.image_token_id},
                               batch, seq_len or n + 16, seed)
    ours_ids = np.where(ids < 0, cfg.image_token_id, ids)
    hf_ids = np.where(ids < 0, hf_cfg.image_token_id, ids)

    model = LlavaForConditionalGeneration(cfg)
    forward = jax.jit(lambda p, ids, px: model.apply({"params": p}, ids, px))  # one compile, not op-by-op
    ours = np.asarray(forward(params, jnp.asarray(ours_ids, jnp.int32), jnp.asarray(pixels)), np.float64)
    hf = HFLlava.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(hf_ids), pixel_values=torch.from_numpy(pixels[:, 0])).logits.numpy()
    result = compare(ours[..., :shared_vocab], ref[..., :shared_vocab])
    result.update(tolerance=tolerance, passed=result["rel_l2"] <= tolerance, logits_shape=list(ours.shape),
                  hf_logits_shape=list(ref.shape), compared_vocab=shared_vocab,
                  image_token_id={"checkpoint": cfg.image_token_id, "hf": hf_cfg.image_token_id},
                  checkpoint=str(checkpoint), hf_dir=str(hf_dir), seed=seed)
    return result
