"""`Generator`: batched KV-cache generation for vflan_jax LLaVA models (the library behind
`python -m vflan_jax.generate`, `vflan_jax.eval` and the exported-model checks).

Prompts are rendered like LLaVA-1.5 eval (docs/REFERENCE.md §3.1, §5.0): with conv_template vicuna_v1,
"{SYS} USER: <image>\\n{question} ASSISTANT:"; output text = decode(skip_special_tokens).strip().
Inputs are grouped by length, left-padded into bucketed shapes (inference/batching.py) and run
through two compiled programs (inference/decode.py), so a long evaluation compiles a handful
of times, not once per prompt.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from vflan_jax.constants import IMAGE_PLACEHOLDER, IMAGE_TOKEN
from vflan_jax.data.conversation import TEMPLATES, render_prompt
from vflan_jax.data.image import load_pixels, pixels_from_image, to_rgb
from vflan_jax.data.tokenize import tokenizer_image_token
from vflan_jax.inference import batching, stopping
from vflan_jax.inference.decode import CompiledDecoder, eos_array
from vflan_jax.inference.sampling import SamplingParams
from vflan_jax.models.config import ModelConfig
from vflan_jax.parallel import DEFAULT_RULES

CONV_TEMPLATES = tuple(TEMPLATES) + ("none",)
STOP_CHECK_INTERVAL = 8  # tokens between host-side stop-string checks (only when stop strings are set)


@dataclasses.dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0   # 0 = greedy (LLaVA eval)
    top_p: float = 1.0
    top_k: int = 0             # 0 = no top-k filter
    stop_strings: tuple[str, ...] = ()
    seed: int = 0


@dataclasses.dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids only, up to and including EOS / the stop-string token


class Generator:
    def __init__(self, params, model_config: ModelConfig, tokenizer, *, image_size: int | None = None,
                 image_aspect: str = "pad", conv_template: str = "vicuna_v1", batch_size: int = 16, mesh=None,
                 rules=DEFAULT_RULES, prompt_buckets: Sequence[int] = batching.PROMPT_BUCKETS):
        if conv_template not in CONV_TEMPLATES:
            raise ValueError(f"conv_template {conv_template!r}: use one of {CONV_TEMPLATES}")
        if image_size not in (None, model_config.vision.image_size):
            raise ValueError(f"image_size={image_size} but the vision tower takes {model_config.vision.image_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.config, self.tokenizer = model_config, tokenizer
        self.image_size = model_config.vision.image_size
        self.image_aspect, self.conv_template, self.batch_size = image_aspect, conv_template, batch_size
        self.mesh, self.rules, self.prompt_buckets = mesh, rules, tuple(prompt_buckets)
        eos = {model_config.text.eos_token_id}
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = tuple(sorted(eos))
        self._eos_array = eos_array(self.eos_ids)
        self.decoder = CompiledDecoder.for_config(model_config)
        # On CPU a per-layer copy of the decoder weights (the caller's stacked params stay alive if kept).
        self.params = self.decoder.prepare_params(params)
        # Activations are batch-sharded over (data, fsdp) by the rules: pad batches to a multiple.
        self._batch_multiple = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]

    @classmethod
    def from_checkpoint(cls, path, *, mesh=None, dtype: str | None = None, **kw) -> "Generator":
        """A vflan_jax model checkpoint or a transformers LLaVA directory (checkpoint.load_any)."""
        from vflan_jax.checkpoint import load_any, load_tokenizer
        from vflan_jax.parallel import make_mesh
        mesh = mesh if mesh is not None else make_mesh()
        params, cfg, tok_dir = load_any(path, mesh, kw.get("rules", DEFAULT_RULES), dtype)
        return cls(params, cfg, load_tokenizer(tok_dir), mesh=mesh, **kw)

    @property
    def trace_counts(self):
        """{'prefill': n, 'decode': n}: how many times each program was traced (compiled); shared by
        all generators of the same model config."""
        return self.decoder.trace_counts

    # ------------------------------------------------------------------ public API
    def generate(self, prompts: list[str], images: list, config: GenerationConfig | None = None
                 ) -> list[GenerationResult]:
        """prompts: user messages (conv_template 'none': full prompts holding <image>); images:
        a path, PIL image or None per prompt."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} images (use None for no image)")
        texts = [self.render(p, img is not None) for p, img in zip(prompts, images, strict=True)]
        return self._generate_texts(texts, images, config)

    def generate_ids(self, input_ids: list[list[int]], pixel_values: list, config: GenerationConfig | None = None
                     ) -> list[GenerationResult]:
        """Token ids with ONE placeholder (-200 or the model's image token) per image; pixel_values:
        per row None, [3, H, W] or [K, 3, H, W] (K images in placeholder order)."""
        if len(input_ids) != len(pixel_values):
            raise ValueError(f"{len(input_ids)} id rows but {len(pixel_values)} pixel entries (use None for no image)")
        return self._run(input_ids, lambda i: _as_image_list(pixel_values[i]), config)

    def render(self, prompt: str, has_image: bool) -> str:
        """The exact text the model sees for one prompt."""
        if self.conv_template == "none":
            if has_image and IMAGE_TOKEN not in prompt:
                raise ValueError(f"conv_template='none' uses the prompt verbatim, but {prompt[:80]!r} has no "
                                 f"{IMAGE_TOKEN} placeholder for its image; put {IMAGE_TOKEN} where the image goes "
                                 "or use conv_template='vicuna_v1'")
            return prompt
        if not has_image and IMAGE_TOKEN in prompt:
            raise ValueError(f"prompt {prompt[:80]!r} contains {IMAGE_TOKEN} but no image was given")
        return render_prompt(prompt, self.conv_template, with_image=has_image)

    # ------------------------------------------------------------------ internals
    def _generate_texts(self, texts: list[str], images: list, config) -> list[GenerationResult]:
        """Already-rendered prompts (each <image> becomes one placeholder) + image sources."""
        if self.tokenizer is None:
            raise ValueError("this Generator has no tokenizer: pass one, or use generate_ids")
        for text, img in zip(texts, images, strict=True):
            found = text.count(IMAGE_TOKEN)
            if found != (img is not None):
                raise ValueError(f"prompt {text[:80]!r} has {found} {IMAGE_TOKEN} placeholder(s) but "
                                 f"{int(img is not None)} image(s) were given")
        ids = [tokenizer_image_token(t, self.tokenizer) for t in texts]
        return self._run(ids, lambda i: [] if images[i] is None else [self._load_image(images[i])], config)

    def _load_image(self, source) -> np.ndarray:
        if isinstance(source, np.ndarray):
            return source.astype(np.float32, copy=False)
        if isinstance(source, Image.Image):
            return pixels_from_image(to_rgb(source), image_size=self.image_size, aspect=self.image_aspect)
        return load_pixels(source, image_size=self.image_size, aspect=self.image_aspect)

    def _context(self):
        stack = contextlib.ExitStack()
        if self.mesh is not None:
            stack.enter_context(jax.set_mesh(self.mesh))
            stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def _run(self, input_ids: list[list[int]], images_of: Callable[[int], list[np.ndarray]], config
             ) -> list[GenerationResult]:
        config = config or GenerationConfig()
        sampling = SamplingParams.create(config.temperature, config.top_p, config.top_k)
        n = len(input_ids)
        if n == 0:
            return []
        if config.max_new_tokens <= 0:
            return [GenerationResult("", []) for _ in range(n)]
        # Similar lengths share a batch (less padding); results go back in input order.
        tpi = self.config.tokens_per_image
        length = [len(r) + sum(t == IMAGE_PLACEHOLDER or t == self.config.image_token_id for t in r) * (tpi - 1)
                  for r in input_ids]
        order = sorted(range(n), key=length.__getitem__)
        chunks = [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
        results: list[GenerationResult | None] = [None] * n

        def prepare(chunk):  # host work (image decode, padding), overlapped with the device
            images = [images_of(i) for i in chunk]
            rows = [batching.expand_image_placeholders(input_ids[i], len(im), self.config)
                    for i, im in zip(chunk, images, strict=True)]
            t = batching.round_up_to_bucket(max(len(r) for r in rows), self.prompt_buckets)
            b = batching.batch_bucket(len(chunk), self.batch_size, self._batch_multiple)
            return batching.assemble(rows, images, self.config, b, t)

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(prepare, chunks[0])
            for c, chunk in enumerate(tqdm(chunks, desc="generate", unit="batch", disable=len(chunks) < 2)):
                batch = pending.result()
                if c + 1 < len(chunks):
                    pending = pool.submit(prepare, chunks[c + 1])
                rows = self._generate_batch(batch, chunk, sampling, config)
                for i, ids in zip(chunk, rows, strict=True):
                    text, kept = stopping.finalize(self.tokenizer, ids, self.eos_ids, config.stop_strings)
                    results[i] = GenerationResult(text, kept)
        return results

    def _generate_batch(self, batch: batching.PromptBatch, global_rows: list[int], sampling, config
                        ) -> list[list[int]]:
        """Run prefill + decode for one padded batch; returns each real row's raw generated ids."""
        b = batch.input_ids.shape[0]
        num_new = batching.new_tokens_bucket(config.max_new_tokens)
        # Row i's random stream depends only on (seed, its index in the call): batch-invariant.
        index = np.asarray(list(global_rows) + [10**9 + r for r in range(b - batch.num_rows)], np.uint32)
        row_keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(config.seed), index)
        finished = np.arange(b) >= batch.num_rows
        with self._context():
            state = self.decoder.prefill(self.params, batch.input_ids, batch.pixel_values, batch.image_mask,
                                         batch.positions, batch.segment_ids, batch.prompt_lengths, finished,
                                         row_keys, sampling, self._eos_array, num_new=num_new)
            state = self._decode_until_done(state, batch.num_rows, sampling, config)
            tokens, step = jax.device_get((state.tokens, state.step))
        return [tokens[r, :int(step)].tolist() for r in range(batch.num_rows)]

    def _decode_until_done(self, state, num_rows: int, sampling, config):
        limit = config.max_new_tokens
        if not config.stop_strings:  # EOS is detected on device: one call, early exit inside
            return self._decode(state, limit, sampling) if limit > 1 else state
        while True:
            step, finished, tokens = jax.device_get((state.step, state.finished, state.tokens))
            finished = finished.copy()
            for r in range(num_rows):
                if not finished[r] and stopping.has_stop(self.tokenizer, tokens[r, :step], config.stop_strings):
                    finished[r] = True
            if finished.all() or step >= limit:
                return state
            state = state._replace(finished=jax.device_put(finished, state.finished.sharding))
            state = self._decode(state, min(step + STOP_CHECK_INTERVAL, limit), sampling)

    def _decode(self, state, limit: int, sampling):
        return self.decoder.decode(self.params, state, jnp.int32(limit), sampling, self._eos_array)


def _as_image_list(pixels) -> list[np.ndarray]:
    if pixels is None:
        return []
    arr = np.asarray(pixels, np.float32)
    if arr.ndim == 3:
        return [arr]
    if arr.ndim == 4:
        return list(arr)
    raise ValueError(f"pixel values must be [3, H, W] or [K, 3, H, W], got shape {arr.shape}")
