"""How one data config turns records into model inputs, for training and for evaluation alike.

The trainer's input pipeline and its held-out evaluators both build their `DecodeExample`
(tokenize, truncate, decode the image) and `BatchLayout` (shapes, ids) from these two functions,
so a config that sets e.g. `exif_transpose`, `max_pixels` or `strict` evaluates on images
decoded exactly as the ones it trains on.
"""
from __future__ import annotations

import ml_collections


def decode_kwargs(data_cfg: ml_collections.ConfigDict, tokenizer, *, tokens_per_image: int,
                  image_size: int) -> dict:
    """Every `DecodeExample` argument the data config decides (task ids and image folders are
    the caller's: they depend on which records it decodes)."""
    return dict(tokenizer=tokenizer, template=data_cfg.template, max_length=data_cfg.max_length,
                tokens_per_image=tokens_per_image, image_size=image_size, image_aspect=data_cfg.image_aspect,
                exif_transpose=data_cfg.exif_transpose, max_pixels=data_cfg.max_pixels, strict=data_cfg.strict)


def layout_kwargs(data_cfg: ml_collections.ConfigDict, tokenizer, *, image_token_id: int, tokens_per_image: int,
                  image_size: int) -> dict:
    """The `BatchLayout` arguments shared by training and evaluation batches (batch size,
    image slots and examples per row are the caller's)."""
    return dict(max_length=data_cfg.max_length, image_shape=(3, image_size, image_size),
                tokens_per_image=tokens_per_image, image_token_id=image_token_id,
                pad_id=tokenizer.pad_token_id or 0)
