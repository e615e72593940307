"""Give LLaVA's out-of-vocabulary image placeholder a vocabulary entry, as llava-hf does.

vflan_jax (like original LLaVA) marks image slots with id -200, which is no vocabulary entry
(docs/REFERENCE.md §1.4). transformers' LLaVA needs a real token instead (docs/REFERENCE.md §6.3, following
transformers' convert_llava_weights_to_hf.py):
  * "<image>" is added to the tokenizer as a special token (id = old vocab size) and "<pad>"
    as the pad token (id = old vocab size + 1);
  * embed_tokens and lm_head grow to the next multiple of 64 rows (32000 -> 32064);
  * the new rows are sampled from N(mu, 1e-5 * Sigma) of the matrix's old rows (seeded).
    transformers' script samples lm_head's new rows from the *embedding's* statistics; here each
    matrix uses its own, so the new tokens' logits sit on the scale of the existing ones. The
    rows never matter for the image slots (their embeddings are overwritten by image features).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from vflan_jax.constants import IMAGE_TOKEN

PAD_TOKEN = "<pad>"
PAD_TO_MULTIPLE = 64
NOISE_SCALE = 1e-5
_CHUNK_ROWS = 4096  # statistics over the rows in chunks: float64 copies stay small for any vocab


@dataclasses.dataclass(frozen=True)
class VocabExtension:
    old_vocab: int
    new_vocab: int
    image_token_id: int
    pad_token_id: int


def add_image_tokens(tokenizer, vocab_size: int) -> VocabExtension:
    """Adds the tokens to `tokenizer` in place (when given) and says where they landed."""
    if tokenizer is None:
        image_id, pad_id = vocab_size, vocab_size + 1
    else:
        from tokenizers import AddedToken
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        image_id, pad_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    needed = max(vocab_size, image_id + 1, pad_id + 1)
    new_vocab = -(-needed // PAD_TO_MULTIPLE) * PAD_TO_MULTIPLE
    return VocabExtension(vocab_size, new_vocab, image_id, pad_id)


def sample_new_rows(old: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` rows ~ N(mean, 1e-5 * cov) of `old` [rows, dim], float32. Sigma is factored with
    eigh (not Cholesky): it is singular whenever rows <= dim, as in small test models."""
    rows, dim = old.shape
    mean = np.zeros(dim, np.float64)
    for start in range(0, rows, _CHUNK_ROWS):
        mean += np.asarray(old[start:start + _CHUNK_ROWS], np.float64).sum(0)
    mean /= rows
    cov = np.zeros((dim, dim), np.float64)
    for start in range(0, rows, _CHUNK_ROWS):
        centred = np.asarray(old[start:start + _CHUNK_ROWS], np.float64) - mean
        cov += centred.T @ centred
    cov *= NOISE_SCALE / rows
    eigvals, eigvecs = np.linalg.eigh(cov)
    factor = eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))
    z = np.random.default_rng(seed).standard_normal((count, dim))
    return (mean + z @ factor.T).astype(np.float32)
