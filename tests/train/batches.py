"""A random labelled batch in the train step's layout (data/packing.py), for tests that call the step directly."""
from __future__ import annotations

import numpy as np


def random_train_batch(cfg, b: int = 2, t: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    """One image per row after BOS, next-token targets on the text after it, one example per row, task 0."""
    rng = np.random.default_rng(seed)
    n, size = cfg.tokens_per_image, cfg.vision.image_size
    ids = rng.integers(3, cfg.text.vocab_size - 1, size=(b, t)).astype(np.int32)
    ids[:, 1:1 + n] = cfg.image_token_id
    targets = np.roll(ids, -1, axis=1)
    targets[:, : 1 + n] = -100
    targets[:, -1] = -100
    return {"input_ids": ids, "targets": targets,
            "pixel_values": rng.standard_normal((b, 1, 3, size, size), np.float32),
            "image_mask": np.ones((b, 1), bool), "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
            "segment_ids": np.ones((b, t), np.int32), "task_ids": np.zeros((b, t), np.int32)}
