"""Tiny random checkpoints on disk, in every layout the converter accepts, written with
transformers/safetensors/torch (never with the code under test), plus a tiny tokenizer."""
from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from tests.models.hf_oracle import build_hf_model
from vflan_jax.convert.hf_config import model_config_to_hf, text_config_to_hf, vision_config_to_hf
from vflan_jax.models.config import ModelConfig

# transformers >= 4.52 in-memory names -> the hub llava-hf (<= 4.51) names
HUB_RENAMES = ((r"^model\.language_model\.", "language_model.model."), (r"^lm_head\.", "language_model.lm_head."),
               (r"^model\.vision_tower\.", "vision_tower.vision_model."),
               (r"^model\.multi_modal_projector\.", "multi_modal_projector."))


def hub_name(key: str) -> str:
    for pattern, replacement in HUB_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def save_tensors(out: pathlib.Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> None:
    """One model.safetensors, or `shards` files + model.safetensors.index.json (as transformers writes)."""
    out.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        save_file({k: tensors[k].contiguous() for k in names}, out / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, part in enumerate(np.array_split(np.arange(len(names)), shards)):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({names[j]: tensors[names[j]].contiguous() for j in part}, out / fname, metadata={"format": "pt"})
        weight_map.update({names[j]: fname for j in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_llava_hf(out: pathlib.Path, cfg: ModelConfig, layout: str = "disk", shards: int = 1, seed: int = 0):
    """A transformers LLaVA directory. layout: 'disk' (what 5.x save_pretrained writes),
    'memory' (>= 4.52 in-memory names), 'hub' (llava-hf <= 4.51 names). Returns the torch model."""
    model = build_hf_model(cfg, seed)
    if layout == "disk" and shards == 1:
        model.save_pretrained(out)
        return model
    state = model.state_dict()
    def disk_name(k):  # 5.x on-disk = hub names without vision_model.
        return hub_name(k).replace("vision_tower.vision_model.", "vision_tower.")

    rename = {"hub": hub_name, "disk": disk_name}.get(layout, lambda k: k)
    save_tensors(out, {rename(k): v for k, v in state.items()}, shards)
    (out / "config.json").write_text(json.dumps(model_config_to_hf(cfg)))
    return model


def write_clip(out: pathlib.Path, cfg: ModelConfig, full: bool = True, seed: int = 0):
    """CLIPModel (text tower, projections, logit_scale included) or a CLIPVisionModel directory."""
    torch.manual_seed(seed)
    vision = {k: v for k, v in vision_config_to_hf(cfg.vision).items() if k != "model_type"}
    if full:
        model = CLIPModel(CLIPConfig(vision_config=vision, projection_dim=16, text_config=dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50,
            bos_token_id=0, eos_token_id=1, pad_token_id=1)))
    else:
        model = CLIPVisionModel(CLIPVisionConfig(**vision))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    return getattr(model, "vision_model", model)  # 5.x CLIPVisionModel is the transformer itself


def llama_model(cfg: ModelConfig, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    tc = {k: v for k, v in text_config_to_hf(cfg.text).items() if k != "model_type"}
    model = LlamaForCausalLM(LlamaConfig(**tc)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def projector_state(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """LLaVA's nn.Sequential(Linear, GELU, Linear) keys."""
    g = torch.Generator().manual_seed(seed)
    v, h = cfg.vision.hidden_size, cfg.text.hidden_size
    return {"model.mm_projector.0.weight": torch.randn(h, v, generator=g) * 0.2,
            "model.mm_projector.0.bias": torch.randn(h, generator=g) * 0.2,
            "model.mm_projector.2.weight": torch.randn(h, h, generator=g) * 0.2,
            "model.mm_projector.2.bias": torch.randn(h, generator=g) * 0.2}


def write_llama(out: pathlib.Path, cfg: ModelConfig, seed: int = 0) -> LlamaForCausalLM:
    model = llama_model(cfg, seed)
    model.save_pretrained(out)
    return model


def write_original_llava(out: pathlib.Path, cfg: ModelConfig, seed: int = 0, with_tower: dict | None = None):
    """LlavaLlamaForCausalLM as liuhaotian/llava-v1.5-* store it: LLaMA keys + model.mm_projector.{0,2}
    (+ model.vision_tower.vision_tower.vision_model.* when the tower was loaded before saving)."""
    model = llama_model(cfg, seed)
    proj = projector_state(cfg, seed + 1)
    tensors = {**model.state_dict(), **proj}
    for k, v in (with_tower or {}).items():
        tensors["model.vision_tower.vision_tower.vision_model." + k] = v
    save_tensors(out, tensors)
    config = {**text_config_to_hf(cfg.text), "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
              "mm_projector_type": cfg.projector_type, "mm_vision_select_layer": cfg.vision_feature_layer,
              "mm_vision_select_feature": "patch" if cfg.vision_feature_select_strategy == "default" else "cls_patch",
              "mm_hidden_size": cfg.vision.hidden_size, "mm_vision_tower": "openai/clip-vit-large-patch14-336",
              "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "image_aspect_ratio": "pad"}
    (out / "config.json").write_text(json.dumps(config))
    return model, proj


def write_tokenizer(out: pathlib.Path, vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with exactly vocab_size entries (<unk>=0, <s>=1, </s>=2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)
    return fast
