"""Model configuration: the shapes of the LLaVA-1.5 parts and the named presets.

Frozen dataclasses rather than ConfigDicts: a model config is hashable (it is a Flax module
attribute), round-trips through JSON next to every checkpoint, and is validated once here.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from vflan_jax.constants import IMAGE_PLACEHOLDER


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """CLIP vision transformer (docs/REFERENCE.md §1.1)."""
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """LLaMA-2 / Vicuna decoder (docs/REFERENCE.md §1.3)."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None  # None: hidden_size // num_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    # LoRA adapters on the projections (models/lora.py LoraConfig); None = plain Dense layers.
    lora: Any = None

    def __post_init__(self):
        if isinstance(self.lora, dict):   # from JSON
            from vflan_jax.models.lora import LoraConfig
            object.__setattr__(self, "lora", LoraConfig(**self.lora))

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The whole VLM plus how it is computed (dtypes, remat, attention kernel)."""
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    projector_type: str = "mlp2x_gelu"
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"  # "default" drops CLS, "full" keeps it
    # LLaVA's own placeholder by default: no vocabulary entry, so vocab stays 32000; HF llava-hf
    # checkpoints use id 32000 in a 32064-row vocabulary instead.
    image_token_id: int = IMAGE_PLACEHOLDER
    # Computation, not architecture: safe to change between training and inference.
    dtype: str = "float32"         # activations / matmul inputs
    param_dtype: str = "float32"   # stored (master) parameters
    remat_policy: str = "none"     # see models/scan.py REMAT_POLICIES
    attention_impl: str = "auto"   # models/attention.py: auto|xla|splash|cudnn|blockwise
    loss_chunk_size: int = 1024    # tokens per lm_head + cross-entropy chunk in training; 0 = full logits

    @property
    def tokens_per_image(self) -> int:
        extra = 1 if self.vision_feature_select_strategy == "full" else 0
        return self.vision.num_patches + extra

    @property
    def vision_layers_used(self) -> int:
        """How many encoder layers produce the selected hidden state (HF hidden_states index)."""
        n = self.vision.num_layers
        layer = self.vision_feature_layer
        return layer if layer >= 0 else n + 1 + layer

    def validate(self) -> "ModelConfig":
        v, t = self.vision, self.text
        problems = []
        if v.image_size % v.patch_size:
            problems.append(f"vision.image_size={v.image_size} is not divisible by vision.patch_size={v.patch_size}")
        if v.hidden_size % v.num_heads:
            problems.append(f"vision.hidden_size={v.hidden_size} is not divisible by vision.num_heads={v.num_heads}")
        if t.num_heads % t.num_kv_heads:
            problems.append(f"text.num_heads={t.num_heads} is not divisible by text.num_kv_heads={t.num_kv_heads}")
        if t.head_dim is None and t.hidden_size % t.num_heads:
            problems.append(f"text.hidden_size={t.hidden_size} is not divisible by text.num_heads={t.num_heads}")
        if t.resolved_head_dim % 2:
            problems.append(f"text head_dim={t.resolved_head_dim} must be even for RoPE")
        if not 0 <= self.vision_layers_used <= v.num_layers:
            problems.append(f"vision_feature_layer={self.vision_feature_layer} is outside a {v.num_layers}-layer tower")
        if self.vision_feature_select_strategy not in ("default", "full"):
            problems.append(f"vision_feature_select_strategy={self.vision_feature_select_strategy!r}: "
                            "use 'default' or 'full'")
        if v.hidden_act not in ("quick_gelu", "gelu"):
            problems.append(f"vision.hidden_act={v.hidden_act!r}: use 'quick_gelu' or 'gelu'")
        from vflan_jax.models.projector import parse_projector_type
        from vflan_jax.models.scan import REMAT_POLICIES
        try:
            parse_projector_type(self.projector_type)
        except ValueError as e:
            problems.append(str(e))
        if self.remat_policy not in REMAT_POLICIES:
            problems.append(f"remat_policy={self.remat_policy!r}: use one of {sorted(REMAT_POLICIES)}")
        from vflan_jax.models.attention import IMPLEMENTATIONS
        if self.attention_impl not in (*IMPLEMENTATIONS, None):
            problems.append(f"attention_impl={self.attention_impl!r}: use one of {', '.join(IMPLEMENTATIONS)}")
        if not isinstance(self.loss_chunk_size, int) or self.loss_chunk_size < 0:
            problems.append(f"loss_chunk_size={self.loss_chunk_size!r}: use a token count >= 1, or 0 for full logits")
        if 0 <= self.image_token_id < t.vocab_size and self.image_token_id in (t.bos_token_id, t.eos_token_id):
            problems.append(f"image_token_id={self.image_token_id} collides with BOS/EOS")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))
        return self

    def replace(self, **kw: Any) -> "ModelConfig":
        """dataclasses.replace that also accepts dotted keys: replace(**{'text.num_layers': 2})."""
        top, nested = {}, {"vision": {}, "text": {}}
        for key, value in kw.items():
            head, _, rest = key.partition(".")
            if rest:
                if head not in nested:
                    raise ValueError(f"unknown model config field {key!r}")
                nested[head][rest] = value
            else:
                top[key] = value
        for part, fields in nested.items():
            if fields:
                top[part] = dataclasses.replace(top.get(part, getattr(self, part)), **fields)
        return dataclasses.replace(self, **top).validate()

    # --- serialisation (stored beside every checkpoint) ---
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config fields {sorted(unknown)}")
        vision = VisionConfig(**d.pop("vision", {}))
        text = TextConfig(**d.pop("text", {}))
        return cls(vision=vision, text=text, **d).validate()


CLIP_L_336 = VisionConfig()
VICUNA_7B = TextConfig()
VICUNA_13B = TextConfig(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40)

PRESETS: dict[str, ModelConfig] = {
    # LLaVA-1.5 (docs/REFERENCE.md §1): CLIP ViT-L/14-336 + mlp2x_gelu + Vicuna v1.5.
    "7b": ModelConfig(vision=CLIP_L_336, text=VICUNA_7B),
    "13b": ModelConfig(vision=CLIP_L_336, text=VICUNA_13B),
    # CPU benchmarks: same structure, small enough for a laptop, realistic vocabulary.
    "small": ModelConfig(
        vision=VisionConfig(hidden_size=384, intermediate_size=1536, num_layers=6, num_heads=6,
                            image_size=224, patch_size=14),
        text=TextConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=6,
                        num_heads=8, num_kv_heads=8)),
    # Demo and tests: trains in minutes on 2 cores with the offline task suite (vocab 1024).
    "tiny": ModelConfig(
        vision=VisionConfig(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                            image_size=56, patch_size=14),
        text=TextConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_layers=2,
                        num_heads=4, num_kv_heads=2, max_position_embeddings=2048)),
    # Unit tests: the smallest shapes that still exercise GQA, scan and the image splice.
    "nano": ModelConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                            image_size=28, patch_size=14),
        text=TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                        num_heads=4, num_kv_heads=2, max_position_embeddings=256)),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]
    return cfg.replace(**overrides) if overrides else cfg.validate()
