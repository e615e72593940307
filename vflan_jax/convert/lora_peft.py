"""LoRA adapters <-> PEFT adapter directories for transformers' LlavaForConditionalGeneration.

    convert export-hf --checkpoint C --out D --adapter_only   # D: adapter_config.json + adapter_model.safetensors
    peft.PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(BASE), D)
    convert import-hf --hf_dir BASE --adapter D --out C       # the adapter back onto its base

Names and layout are PEFT's own (peft 0.21 save_pretrained): `base_model.model.<module>.lora_A.weight`
[rank, in] and `lora_B.weight` [out, rank] per projection and layer, the adapter name dropped; the
projector, trained in full as in LLaVA's LoRA recipe, travels as `modules_to_save`
(`base_model.model.model.multi_modal_projector.linear_1.weight`, ...). BASE is the model the
adapters were trained on, exported with `convert export-hf` (or the transformers model it came
from); for QLoRA that is the unquantized original (adapters trained on its quantized copy).
"""
from __future__ import annotations

import json
import pathlib
import re

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from vflan_jax.convert import layout as L
from vflan_jax.convert.errors import ConversionError
from vflan_jax.convert.tensors import flatten
from vflan_jax.models import lora_params
from vflan_jax.models.config import ModelConfig
from vflan_jax.models.lora import PARENT, PROJECTIONS, LoraConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^model\.language_model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def _module_key(layer: int, name: str) -> str:
    return f"model.language_model.layers.{layer}.{PARENT[name]}.{name}"


def adapter_config(lora: LoraConfig, base: str | None) -> dict:
    """PEFT's LoraConfig fields that matter to a plain LoRA (the rest take PEFT's defaults)."""
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base, "inference_mode": True,
            "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "target_modules": rf".*language_model.*\.({'|'.join(lora.targets)})",
            "modules_to_save": ["multi_modal_projector"], "rank_pattern": {}, "alpha_pattern": {},
            "auto_mapping": {"base_model_class": "LlavaForConditionalGeneration",
                             "parent_library": "transformers.models.llava.modeling_llava"}}


def export_adapter(params: dict, cfg: ModelConfig, out_dir, base: str | None = None, dtype=np.float32) -> dict:
    """Write the PEFT adapter directory; returns its adapter_config."""
    lora = cfg.text.lora
    if lora is None:
        raise ConversionError("--adapter_only: the checkpoint has no LoRA adapters (trained without a lora block)")
    tensors = {}
    for path, array in lora_params.adapter_leaves(params).items():
        _, name, leaf = path.split("/")
        for i, layer in enumerate(array):
            tensors[f"{PEFT_PREFIX}{_module_key(i, name)}.lora_{leaf[-1].upper()}.weight"] = layer.T
    flat = flatten(params["multi_modal_projector"])
    for path, src in L.projector_layout(cfg).items():
        tensors[PEFT_PREFIX + src.keys[0]] = L.to_torch(np.asarray(jax.device_get(flat[path])), src.kind)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, dtype) for k, v in tensors.items()}, str(out / WEIGHTS_NAME),
              metadata={"format": "pt"})
    config = adapter_config(lora, base)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def _read_config(adapter_dir: pathlib.Path) -> dict:
    path = adapter_dir / CONFIG_NAME
    if not path.exists():
        raise ConversionError(f"--adapter {adapter_dir}: no {CONFIG_NAME} (not a PEFT adapter directory)")
    config = json.loads(path.read_text())
    unsupported = {"peft_type": config.get("peft_type") != "LORA", "use_dora": config.get("use_dora"),
                   "use_rslora": config.get("use_rslora"), "rank_pattern": config.get("rank_pattern"),
                   "alpha_pattern": config.get("alpha_pattern"), "fan_in_fan_out": config.get("fan_in_fan_out"),
                   "bias": config.get("bias", "none") != "none"}
    bad = [f"{k}={config.get(k)!r}" for k, v in unsupported.items() if v]
    if bad:
        raise ConversionError(f"--adapter {adapter_dir}: only plain LoRA adapters import; {', '.join(bad)}")
    return config


def import_adapter(adapter_dir, params: dict, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
    """A PEFT LoRA adapter applied onto the plain model (params, cfg): (LoRA params, LoRA config).
    Every key must be a decoder projection's lora_A/B or the projector; anything else is named."""
    adapter_dir = pathlib.Path(adapter_dir)
    config = _read_config(adapter_dir)
    if cfg.text.lora is not None:
        raise ConversionError("--adapter: the base model already has adapters")
    weights = adapter_dir / WEIGHTS_NAME
    if not weights.exists():
        raise ConversionError(f"--adapter {adapter_dir}: no {WEIGHTS_NAME}")
    tensors = {L.canonical_key(k.removeprefix(PEFT_PREFIX)): v for k, v in load_file(str(weights)).items()}
    n_layers = cfg.text.num_layers
    found: dict[str, dict[str, list]] = {}
    projector = {src.keys[0]: (path, src.kind) for path, src in L.projector_layout(cfg).items()}
    new_projector = {}
    for key, value in tensors.items():
        m = _LORA_KEY.match(key)
        if m and m.group(3) in PROJECTIONS and int(m.group(1)) < n_layers:
            slot = found.setdefault(m.group(3), {"A": [None] * n_layers, "B": [None] * n_layers})
            slot[m.group(4)][int(m.group(1))] = value
        elif key in projector:
            path, kind = projector[key]
            new_projector[path] = L.to_flax(value, kind)
        else:
            raise ConversionError(f"--adapter {adapter_dir}: tensor {key!r} is neither a decoder projection's "
                                  "lora_A/lora_B nor the projector; it cannot be imported")
    if not found:
        raise ConversionError(f"--adapter {adapter_dir}: no lora_A/lora_B tensors")
    for name, slot in found.items():
        missing = [f"{part}{i}" for part in "AB" for i, t in enumerate(slot[part]) if t is None]
        if missing:
            raise ConversionError(f"--adapter {adapter_dir}: {name} lacks lora tensors for layers {missing[:5]}")
    rank = int(config["r"])
    lora = LoraConfig(rank, float(config["lora_alpha"]), float(config.get("lora_dropout") or 0.0),
                      tuple(n for n in PROJECTIONS if n in found))
    lora_cfg = cfg.replace(**{"text.lora": lora})
    out = lora_params.with_adapters(params, lora_cfg)
    layers = out["language_model"]["layers"]
    for name, slot in found.items():
        module = layers[PARENT[name]][name]
        a = np.stack([t.T for t in slot["A"]]).astype(np.float32)
        b = np.stack([t.T for t in slot["B"]]).astype(np.float32)
        if a.shape != module["lora_a"].shape or b.shape != module["lora_b"].shape:
            raise ConversionError(f"--adapter {adapter_dir}: {name} adapters have shapes {a.shape}/{b.shape}, "
                                  f"the model needs {module['lora_a'].shape}/{module['lora_b'].shape}")
        module["lora_a"], module["lora_b"] = a, b
    for path, value in new_projector.items():
        node = out["multi_modal_projector"]
        for k in path[:-1]:
            node = node[k]
        if node[path[-1]].shape != value.shape:
            raise ConversionError(f"--adapter {adapter_dir}: projector {'/'.join(path)} has shape {value.shape}")
        node[path[-1]] = value.astype(np.dtype(cfg.param_dtype))
    return out, lora_cfg
