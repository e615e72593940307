"""vflan_jax model checkpoint -> a directory that transformers loads:

    LlavaForConditionalGeneration.from_pretrained(D); AutoProcessor.from_pretrained(D)

Writes config.json, generation_config.json, safetensors (sharded with an index above
--max_shard_size), the tokenizer and the processor (image processor settings, image-token
expansion, chat template: convert/hf_processor.py). A model that uses LLaVA's image placeholder
-200 gets a real "<image>" token first (convert/image_token.py, docs/REFERENCE.md §6.3).

Tensor names: the llava-hf hub layout (`language_model.model.*`, `language_model.lm_head.weight`,
`vision_tower.vision_model.*`, `multi_modal_projector.*`). transformers 4.36-4.51 load it
natively and 4.52+/5.x map it onto their in-memory names (docs/REFERENCE.md §6.2); the >= 4.52 in-memory
names would not load in 4.51 and older, and the bare `vision_tower.*` names that 5.x itself
writes not in 4.x either.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

from vflan_jax.checkpoint import load_model, load_tokenizer, tokenizer_dir
from vflan_jax.convert import layout as L
from vflan_jax.convert.hf_config import model_config_to_hf
from vflan_jax.convert.hf_processor import build_processor
from vflan_jax.convert.image_token import VocabExtension, add_image_tokens, sample_new_rows
from vflan_jax.convert.import_plan import expected_shapes, torch_shape
from vflan_jax.convert.safetensors_writer import write_safetensors
from vflan_jax.convert.tensors import flatten
from vflan_jax.models.config import ModelConfig
from vflan_jax.models.lora_params import merged
from vflan_jax.parallel import DEFAULT_RULES

EXPORT_DTYPES = ("float32", "bfloat16", "float16")
_HUB_NAMES = (  # canonical (>= 4.52 in-memory) -> llava-hf hub names
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.vision_tower\.", "vision_tower.vision_model."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
)
_VOCAB_PARAMS = {("language_model", "embed_tokens", "embedding"), ("language_model", "lm_head", "kernel")}


def llava_hf_key(canonical: str) -> str:
    for pattern, replacement in _HUB_NAMES:
        canonical = re.sub(pattern, replacement, canonical)
    return canonical


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read size {text!r}; use e.g. 5GB, 500MB or a byte count")
    base = 1024 if match.group(3) else 1000
    return int(float(match.group(1)) * base ** " KMGT".index(match.group(2).upper() or " "))


def exported_config(cfg: ModelConfig, ext: VocabExtension | None) -> ModelConfig:
    if ext is None:
        return cfg
    return cfg.replace(image_token_id=ext.image_token_id,
                       text=dataclasses.replace(cfg.text, vocab_size=ext.new_vocab, pad_token_id=ext.pad_token_id))


def _torch_layout_param(params_flat, path, layer: int | None, kind: str) -> np.ndarray:
    array = params_flat[path]
    if layer is not None:
        array = array[layer]  # a gather of one layer's shards, not of the whole stack
    return L.to_torch(np.asarray(jax.device_get(array)), kind)


def export_hf(checkpoint, out_dir, dtype: str | None = None, max_shard_size: str | int = "5GB", seed: int = 0,
              mesh=None, progress: bool = True, image_aspect: str = "pad", rules=DEFAULT_RULES) -> dict:
    """Returns the written config.json dict. image_aspect: how the exported processor fits an
    image into the tower's square ("pad", LLaVA-1.5's finetuning/eval; "square", pretraining).
    mesh and rules: where the checkpoint's parameters are placed while they are read."""
    out_dir = pathlib.Path(out_dir)
    params, cfg = merged(*load_model(checkpoint, mesh, rules))   # LoRA adapters folded into their kernels
    dtype = dtype or cfg.param_dtype
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {EXPORT_DTYPES}")
    np_dtype = np.dtype(jnp.dtype(dtype))
    tokenizer = load_tokenizer(tokenizer_dir(checkpoint))
    in_vocab = 0 <= cfg.image_token_id < cfg.text.vocab_size
    ext = None if in_vocab else add_image_tokens(tokenizer, cfg.text.vocab_size)
    out_cfg = exported_config(cfg, ext)
    processor = None if tokenizer is None else build_processor(tokenizer, out_cfg, image_aspect)  # checks first

    flat = flatten(params)
    shapes = expected_shapes(out_cfg)
    specs, sources = [], []  # (hub name, torch shape, dtype), (flax path, layer or None, kind)
    for path, src in L.llava_layout(out_cfg).items():
        per_layer = shapes[path][1:] if src.stacked else shapes[path]
        for i, key in enumerate(src.keys):
            specs.append((llava_hf_key(key), torch_shape(per_layer, src.kind), np_dtype))
            sources.append((path, i if src.stacked else None, src.kind))

    def fetch(i: int) -> np.ndarray:
        path, layer, kind = sources[i]
        tensor = _torch_layout_param(flat, path, layer, kind)
        if ext is not None and path in _VOCAB_PARAMS:  # [vocab, hidden] in torch layout
            new = sample_new_rows(tensor, ext.new_vocab - ext.old_vocab, seed + (path[1] == "lm_head"))
            tensor = np.concatenate([tensor.astype(np.float32), new]).astype(tensor.dtype)
        return tensor

    write_safetensors(out_dir, specs, fetch, parse_size(max_shard_size), progress=progress)

    hf_config = model_config_to_hf(out_cfg)
    hf_config.update(pad_token_id=out_cfg.text.pad_token_id, dtype=dtype)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    t = out_cfg.text
    generation = {"_from_model_config": True, "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id,
                  "pad_token_id": t.pad_token_id}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
    if processor is not None:
        processor.save_pretrained(str(out_dir))  # the tokenizer (with the chat template) and the processor files
        processor.image_processor.save_pretrained(str(out_dir))  # preprocessor_config.json, as transformers 4.x reads
    elif tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return hf_config
