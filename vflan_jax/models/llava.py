"""LLaVA-1.5: frozen CLIP tower -> projector -> image features written into the token sequence
-> LLaMA decoder (docs/REFERENCE.md §1.4, HF's masked_scatter form).

Batch layout (what the data pipeline produces, one row may hold several packed examples):
  input_ids     int32 [B, T]        each image occupies `tokens_per_image` slots of image_token_id
  pixel_values  float [B, K, 3, H, W] the row's images in order of appearance (unused slots: zeros)
  image_mask    bool  [B, K]         used slots; used slots come first
  positions     int32 [B, T]         restart at 0 per packed example
  segment_ids   int32 [B, T]         1.. per example, 0 = padding
The j-th image-token position of a row receives the j-th feature vector of the row's images.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vflan_jax.models.attention import resolve_implementation
from vflan_jax.models.clip import CLIPVisionTower
from vflan_jax.models.config import ModelConfig
from vflan_jax.models.llama import KVCache, LlamaModel
from vflan_jax.models.projector import Projector


def check_image_slots(input_ids, image_mask, tokens_per_image: int, image_token_id: int) -> None:
    """Host-side guard against silent misalignment: every row must hold exactly
    tokens_per_image image tokens per used image slot, and used slots must come first."""
    ids, mask = np.asarray(input_ids), np.asarray(image_mask, dtype=bool)
    if mask.ndim != 2 or mask.shape[0] != ids.shape[0]:
        raise ValueError(f"image_mask must be [batch, slots] with batch {ids.shape[0]}, got shape {mask.shape}")
    found = (ids == image_token_id).sum(axis=1)
    expected = mask.sum(axis=1) * tokens_per_image
    bad = np.nonzero(found != expected)[0]
    if bad.size:
        r = int(bad[0])
        raise ValueError(
            f"image token count mismatch in {bad.size} row(s); row {r} has {int(found[r])} tokens with id "
            f"{image_token_id} but {int(mask[r].sum())} image(s) x {tokens_per_image} tokens = {int(expected[r])}")
    not_prefix = np.nonzero((np.cumsum(~mask, axis=1) > 0) & mask)[0]
    if not_prefix.size:
        raise ValueError(f"image_mask row {int(not_prefix[0])} has a used slot after an unused one: "
                         f"{mask[not_prefix[0]]}")


def splice_image_features(embeds, input_ids, image_features, image_token_id: int):
    """Write image features into the image-token positions, in order.

    embeds [B, T, D]; image_features [B, K, N, D] (used slots first)."""
    b, k, n, d = image_features.shape
    is_image = input_ids == image_token_id
    slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, k * n - 1)
    gathered = jnp.take_along_axis(image_features.reshape(b, k * n, d), slot[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered.astype(embeds.dtype), embeds)


def _is_concrete(x) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


class LlavaForConditionalGeneration(nn.Module):
    config: ModelConfig

    def setup(self):
        c = self.config
        dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        impl = resolve_implementation(c.attention_impl)
        # The tower's attention is unmasked and forward-only: XLA's, or jax's own choice (cuDNN
        # where it can) on GPU.
        tower_impl = None if impl == "cudnn" else "xla"
        self.vision_tower = CLIPVisionTower(c.vision, c.vision_layers_used, dtype, param_dtype,
                                            c.remat_policy, tower_impl)
        self.multi_modal_projector = Projector(c.projector_type, c.text.hidden_size, dtype, param_dtype)
        self.language_model = LlamaModel(c.text, dtype, param_dtype, c.remat_policy, impl)

    def image_features(self, pixel_values):
        """[N, 3, H, W] -> projected features [N, tokens_per_image, D]. The tower is frozen:
        no gradient flows into it (LLaVA runs it under torch.no_grad)."""
        feats = self.vision_tower(pixel_values)
        if self.config.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        feats = jax.lax.stop_gradient(feats)
        return self.multi_modal_projector(feats)

    def __call__(self, input_ids, pixel_values=None, image_mask=None, positions=None, segment_ids=None,
                 cache: KVCache | None = None, return_hidden: bool = False):
        """Returns logits [B, T, vocab], or (logits, cache) when a KV cache is given.
        return_hidden (training, no cache): (final hidden states [B, T, D], lm_head [D, vocab])
        instead of logits, so the loss can apply the lm_head in chunks (models/losses.py)."""
        c = self.config
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        embeds = self.language_model.embed(input_ids)
        if pixel_values is not None:
            if pixel_values.ndim != 5:
                raise ValueError(f"pixel_values must be [batch, slots, 3, H, W], got shape {pixel_values.shape}")
            k = pixel_values.shape[1]
            if image_mask is None:
                image_mask = jnp.ones((b, k), bool)
            if _is_concrete(input_ids) and _is_concrete(image_mask):
                check_image_slots(input_ids, image_mask, c.tokens_per_image, c.image_token_id)
            feats = self.image_features(pixel_values.reshape(b * k, *pixel_values.shape[2:]))
            feats = feats.reshape(b, k, *feats.shape[1:])
            embeds = splice_image_features(embeds, input_ids, feats, c.image_token_id)
        elif self.is_initializing():
            raise ValueError("initialise the model with pixel_values so the vision tower gets parameters")
        logits, new_cache = self.language_model.decode(embeds, positions, segment_ids, cache, return_hidden)
        return logits if cache is None else (logits, new_cache)
