"""What an import reads: the model config and, for every Flax parameter, which tensor(s) of
which checkpoint file(s) it is built from. Planning reads only config.json files and
safetensors headers, and checks everything (missing, unexpected and mis-shaped tensors)
before a single weight is read.

Two kinds of source (docs/REFERENCE.md §6.2-6.3):
  * a transformers LlavaForConditionalGeneration directory, any key layout (layout.canonical_key);
  * a composition: CLIP (CLIPModel or CLIPVisionModel dir) + LLaMA/Vicuna (LlamaForCausalLM) or an
    original LLaVA LlavaLlamaForCausalLM dir (LLM + mm_projector) + optionally LLaVA's stage-1
    projector file. Without a projector anywhere, it is freshly initialised.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Mapping, Protocol

import flax.linen as nn
import numpy as np

from vflan_jax.constants import IMAGE_PLACEHOLDER
from vflan_jax.convert import layout as L
from vflan_jax.convert.errors import ConversionError
from vflan_jax.convert.hf_config import model_config_from_hf, text_config_from_hf, vision_config_from_hf
from vflan_jax.convert.projector_file import open_projector_file
from vflan_jax.convert.safetensors_reader import CheckpointFiles
from vflan_jax.convert.tensors import flatten
from vflan_jax.models.config import ModelConfig
from vflan_jax.models.projector import parse_projector_type

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")
_INV_FREQ = r"\.inv_freq$"  # RoPE buffers some old checkpoints saved; recomputed, never read
_CLIP_NOT_VISION = (r"^(text_model\.|visual_projection\.|text_projection\.|logit_scale$"
                    r"|vision_model\.embeddings\.position_ids$)")
# transformers 5.x saves CLIPVisionModel without the `vision_model.` prefix that CLIPModel and 4.x use
_BARE_CLIP = re.compile(r"^(embeddings|encoder|pre_layrnorm|post_layernorm)\.")
# LLaVA's mm_vision_select_feature -> HF vision_feature_select_strategy
_SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}


class TensorSource(Protocol):
    def __contains__(self, key: str) -> bool: ...
    def keys(self): ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> np.dtype: ...
    def read(self, key: str, rows: slice | None = None) -> np.ndarray: ...
    def describe(self, key: str) -> str: ...


@dataclasses.dataclass(frozen=True)
class Entry:
    source: L.ParamSource
    tensors: TensorSource


@dataclasses.dataclass
class ImportPlan:
    config: ModelConfig
    entries: dict[tuple[str, ...], Entry]          # full Flax path -> where it is read from
    fresh: tuple[str, ...] = ()                   # top-level groups initialised instead of read
    tokenizer_dir: pathlib.Path | None = None
    config_files: tuple[str, ...] = ()            # named in shape errors
    ignorable: tuple[tuple[TensorSource, str], ...] = ()  # (source, regex of keys that may go unused)


def read_config_json(directory: pathlib.Path) -> dict:
    path = pathlib.Path(directory) / "config.json"
    if not path.exists():
        raise ConversionError(f"{directory}: no config.json (is this a transformers checkpoint directory?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def find_tokenizer_dir(directory: pathlib.Path) -> pathlib.Path | None:
    directory = pathlib.Path(directory)
    return directory if any((directory / name).exists() for name in TOKENIZER_FILES[:3]) else None


def _prefixed(top: str, part: Mapping, tensors: TensorSource) -> dict:
    return {(top,) + path: Entry(src, tensors) for path, src in part.items()}


def plan_llava_hf(hf_dir: str | pathlib.Path, param_dtype: str = "float32") -> ImportPlan:
    hf_dir = pathlib.Path(hf_dir)
    raw = read_config_json(hf_dir)
    try:
        cfg = model_config_from_hf(raw, param_dtype=param_dtype)
    except ConversionError as e:
        raise type(e)(f"{hf_dir / 'config.json'}: {e}") from None
    files = CheckpointFiles(hf_dir, rename=L.canonical_key)
    entries = {path: Entry(src, files) for path, src in L.llava_layout(cfg).items()}
    return ImportPlan(cfg, entries, tokenizer_dir=find_tokenizer_dir(hf_dir),
                      config_files=(str(hf_dir / "config.json"),), ignorable=((files, _INV_FREQ),))


def _llava_projector_layout(cfg: ModelConfig, prefix: str = "model.mm_projector") -> dict:
    """LLaVA's own projector: nn.Sequential (Linear, GELU, Linear, ...) -> keys .0, .2, ...;
    the 'linear' type is a bare nn.Linear -> keys model.mm_projector.{weight,bias}."""
    depth = parse_projector_type(cfg.projector_type)
    if cfg.projector_type == "linear":
        return L.projector_layout(cfg, prefix, ("",))
    return L.projector_layout(cfg, prefix + ".", tuple(str(2 * i) for i in range(depth)))


def plan_composed(vision_tower: str | pathlib.Path, llm: str | pathlib.Path,
                  projector: str | pathlib.Path | None = None, param_dtype: str = "float32",
                  projector_type: str = "mlp2x_gelu",
                  vision_feature_layer: int = -2, vision_feature_select_strategy: str = "default") -> ImportPlan:
    """The projector/feature options apply only when the LLM is a plain LLaMA; an original LLaVA
    config.json (model_type llava_llama) carries its own mm_* fields, which win."""
    clip_dir, llm_dir = pathlib.Path(vision_tower), pathlib.Path(llm)
    clip_raw, llm_raw = read_config_json(clip_dir), read_config_json(llm_dir)
    try:
        vision = vision_config_from_hf(clip_raw)
    except ConversionError as e:
        raise type(e)(f"{clip_dir / 'config.json'}: {e} (expected a CLIPModel or CLIPVisionModel checkpoint)") from None
    llm_type = llm_raw.get("model_type")
    if llm_type not in ("llama", "llava_llama", "llava"):
        raise ConversionError(f"{llm_dir / 'config.json'}: model_type {llm_type!r} (architectures "
                              f"{llm_raw.get('architectures')}) is neither LLaMA ('llama') nor original LLaVA "
                              "('llava_llama')")
    if llm_type == "llava":
        raise ConversionError(f"{llm_dir / 'config.json'}: a transformers LLaVA checkpoint is a whole model; "
                              "import it with --hf_dir instead of --llm")
    is_llava = llm_type == "llava_llama"
    try:
        text = text_config_from_hf({**llm_raw, "model_type": "llama"})
    except ConversionError as e:
        raise type(e)(f"{llm_dir / 'config.json'}: {e}") from None
    if is_llava:
        projector_type = llm_raw.get("mm_projector_type", "linear")  # LLaVA builder's default
        vision_feature_layer = llm_raw.get("mm_vision_select_layer", -2)
        feature = llm_raw.get("mm_vision_select_feature", "patch")
        if feature not in _SELECT_FEATURE:
            raise ConversionError(f"{llm_dir / 'config.json'}: mm_vision_select_feature {feature!r} is not 'patch' "
                                  "or 'cls_patch'")
        vision_feature_select_strategy = _SELECT_FEATURE[feature]
        mm_hidden = llm_raw.get("mm_hidden_size")
        if mm_hidden is not None and mm_hidden != vision.hidden_size:
            raise ConversionError(f"{llm_dir / 'config.json'}: mm_hidden_size {mm_hidden} differs from the CLIP "
                                  f"hidden_size {vision.hidden_size} in {clip_dir / 'config.json'}")
    try:
        cfg = ModelConfig(vision=vision, text=text, projector_type=projector_type,
                          vision_feature_layer=vision_feature_layer,
                          vision_feature_select_strategy=vision_feature_select_strategy,
                          image_token_id=IMAGE_PLACEHOLDER, param_dtype=param_dtype).validate()
    except ValueError as e:
        raise ConversionError(f"{clip_dir / 'config.json'} + {llm_dir / 'config.json'}: {e}") from None

    clip_files = CheckpointFiles(clip_dir, rename=lambda k: "vision_model." + k if _BARE_CLIP.match(k) else k)
    llm_files = CheckpointFiles(llm_dir)
    entries = _prefixed("vision_tower", L.vision_tower_layout(cfg, "vision_model."), clip_files)
    entries.update(_prefixed("language_model", L.language_model_layout(cfg, "model.", "lm_head.weight"), llm_files))
    ignorable = [(clip_files, _CLIP_NOT_VISION), (llm_files, _INV_FREQ),
                 (llm_files, r"^model\.vision_tower\.")]  # a tower saved inside LLaVA: CLIP dir is the source
    fresh: tuple[str, ...] = ()
    if projector is not None:
        proj_files = open_projector_file(projector)
        entries.update(_prefixed("multi_modal_projector", _llava_projector_layout(cfg), proj_files))
        ignorable.append((llm_files, r"^model\.mm_projector\."))  # the explicit file wins
    elif is_llava:
        entries.update(_prefixed("multi_modal_projector", _llava_projector_layout(cfg), llm_files))
    else:
        fresh = ("multi_modal_projector",)
    return ImportPlan(cfg, entries, fresh=fresh, tokenizer_dir=find_tokenizer_dir(llm_dir),
                      config_files=(str(clip_dir / "config.json"), str(llm_dir / "config.json")),
                      ignorable=tuple(ignorable))


def expected_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    from vflan_jax.parallel import abstract_params
    return {path: tuple(x.shape) for path, x in flatten(nn.unbox(abstract_params(cfg))).items()}


def torch_shape(flax_shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    return tuple(L.to_torch(np.empty(flax_shape, np.bool_), kind).shape) if flax_shape else ()


def check_plan(plan: ImportPlan, shapes: Mapping[tuple[str, ...], tuple[int, ...]]) -> None:
    """Every parameter has its tensors with the right shapes, and no tensor goes unused."""
    planned = set(plan.entries) | {p for p in shapes if p[0] in plan.fresh}
    if set(shapes) != planned:  # a bug in the layout table, not in the user's files
        raise AssertionError(f"layout and model disagree on {sorted(set(shapes) ^ planned)[:5]}")
    used: dict[int, set[str]] = {}
    where = " / ".join(plan.config_files)
    for path, entry in plan.entries.items():
        src, tensors = entry.source, entry.tensors
        want = torch_shape(shapes[path][1:] if src.stacked else shapes[path], src.kind)
        for key in src.keys:
            if key not in tensors:
                origin = getattr(tensors, "path", "?")
                raise ConversionError(f"tensor {key!r} (for parameter {L.flax_path_name(path)}) "
                                      f"is missing from {origin}")
            got = tuple(tensors.shape(key))
            if got != want:
                raise ConversionError(f"{tensors.describe(key)} has shape {list(got)}, "
                                      f"but {where} implies {list(want)}")
            if not np.issubdtype(tensors.dtype(key), np.floating) and tensors.dtype(key).kind != "V":
                raise ConversionError(f"{tensors.describe(key)} has dtype {tensors.dtype(key)}, "
                                      "expected floating point")
            used.setdefault(id(tensors), set()).add(key)
    sources = {id(e.tensors): e.tensors for e in plan.entries.values()}
    for sid, tensors in sources.items():
        patterns = [pat for src, pat in plan.ignorable if src is tensors]
        for key in tensors.keys():
            if key not in used[sid] and not any(re.search(pat, key) for pat in patterns):
                raise ConversionError(f"unexpected {tensors.describe(key)}: no vflan_jax parameter reads it "
                                      f"(config {where})")
