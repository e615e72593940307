"""Host-side batch assembly for decoding: image placeholders expanded to the model's image
slots, rows LEFT-padded into bucketed shapes so one compiled program serves many lengths.

Left padding keeps every row's last prompt token in the same column, so all rows write
their generated tokens to the same cache slot. Pads get segment id 0 (attend to nothing
real), and positions = cumsum(mask) - 1 so each row's real tokens start at position 0,
exactly as LLaVA / transformers do for left-padded batched inference.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from vflan_jax.constants import IMAGE_PLACEHOLDER
from vflan_jax.models.config import ModelConfig
from vflan_jax.models.llava import check_image_slots

# Steps of 64 tokens up to 1024, then 256: prefill cost grows with the padded length, and an
# evaluation's prompts cluster in one or two buckets (LLaVA-1.5 eval prompts: 576 image tokens
# + ~60-80 text tokens -> 640/704), so finer steps cost few extra compilations. With ~1.5x steps
# a 300-token prompt padded to 384, and batch-16 prefill took 2.90 s vs 2.3-2.5 s at 320
# (docs/PERFORMANCE.md).
PROMPT_BUCKETS = tuple(range(64, 1024 + 1, 64)) + (1280, 1536, 1792, 2048)


def round_up_to_bucket(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n; past the last one, the next multiple of the last one."""
    for b in buckets:
        if n <= b:
            return b
    last = buckets[-1]
    return -(-n // last) * last


def batch_bucket(n: int, batch_size: int, multiple: int = 1) -> int:
    """Powers of two up to batch_size (so a short last chunk compiles at most log2 shapes),
    rounded up to `multiple` (the mesh's batch-sharding degree)."""
    b = 1
    while b < n:
        b *= 2
    b = max(min(b, batch_size), n)
    return -(-b // multiple) * multiple


def new_tokens_bucket(max_new_tokens: int) -> int:
    """Generated-token buffer (and cache tail) size: a power of two >= max_new_tokens, >= 16."""
    b = 16
    while b < max_new_tokens:
        b *= 2
    return b


def expand_image_placeholders(ids: Sequence[int], num_images: int, config: ModelConfig) -> list[int]:
    """One placeholder (-200 or config.image_token_id) per image -> tokens_per_image copies of
    config.image_token_id. Raises if the placeholder count differs from the image count."""
    marks = {IMAGE_PLACEHOLDER, config.image_token_id}
    found = sum(1 for t in ids if t in marks)
    if found != num_images:
        hint = ""
        if found > num_images and config.image_token_id in ids and num_images:
            hint = " (ids must hold ONE placeholder per image; do not pre-expand the image tokens)"
        raise ValueError(f"prompt has {found} image placeholder(s) ({IMAGE_PLACEHOLDER} or {config.image_token_id}) "
                         f"but {num_images} image(s) were given{hint}")
    out: list[int] = []
    for t in ids:
        out.extend([config.image_token_id] * config.tokens_per_image if t in marks else [int(t)])
    return out


@dataclasses.dataclass
class PromptBatch:
    input_ids: np.ndarray      # int32 [B, T], left-padded with pad_token_id
    positions: np.ndarray      # int32 [B, T]
    segment_ids: np.ndarray    # int32 [B, T], 1 real / 0 pad
    prompt_lengths: np.ndarray  # int32 [B], real (expanded) tokens per row; 0 for batch-padding rows
    pixel_values: np.ndarray | None  # float32 [B, K, 3, H, W]; None when no row has an image
    image_mask: np.ndarray | None    # bool [B, K]
    num_rows: int              # real rows (the rest pad the batch up to its bucket)


def assemble(rows: Sequence[Sequence[int]], images: Sequence[Sequence[np.ndarray]], config: ModelConfig,
             batch: int, length: int) -> PromptBatch:
    """rows: expanded ids per row; images: each row's pixel arrays [3, H, W] in order of appearance."""
    n = len(rows)
    pad = config.text.pad_token_id
    ids = np.full((batch, length), pad, np.int32)
    segs = np.zeros((batch, length), np.int32)
    lengths = np.zeros(batch, np.int32)
    for r, row in enumerate(rows):
        if len(row) > length:
            raise ValueError(f"row {r} has {len(row)} tokens, more than the bucket length {length}")
        if row:
            ids[r, length - len(row):] = row
            segs[r, length - len(row):] = 1
        lengths[r] = len(row)
    positions = np.maximum(np.cumsum(segs, axis=1) - 1, 0).astype(np.int32)
    k = max((len(x) for x in images), default=0)
    if k == 0:
        return PromptBatch(ids, positions, segs, lengths, None, None, n)
    size = config.vision.image_size
    pixels = np.zeros((batch, k, 3, size, size), np.float32)
    mask = np.zeros((batch, k), bool)
    for r, row_images in enumerate(images):
        for j, img in enumerate(row_images):
            if img.shape != (3, size, size):
                raise ValueError(f"image {j} of row {r} has shape {img.shape}; the model expects (3, {size}, {size})")
            pixels[r, j], mask[r, j] = img, True
    check_image_slots(ids, mask, config.tokens_per_image, config.image_token_id)
    return PromptBatch(ids, positions, segs, lengths, pixels, mask, n)
