"""HF -> vflan_jax model checkpoint -> HF: every tensor comes back bit-identical, in every
input key layout, from single-file and sharded safetensors."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import LlavaForConditionalGeneration

from tests.convert.checkpoints import hub_name, write_llava_hf
from tests.models.hf_oracle import hf_logits, random_batch, rel_l2
from vflan_jax.checkpoint import save_model
from vflan_jax.convert.hf_export import export_hf
from vflan_jax.convert.hf_import import import_llava_hf
from vflan_jax.convert.layout import canonical_key


def read_all(directory):
    """{canonical key: (stored key, numpy array)} over every safetensors file in directory."""
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for key in st.keys():
                out[canonical_key(key)] = (key, st.get_tensor(key))
    return out


@pytest.mark.parametrize("layout,shards,out_shard", [("disk", 1, "5GB"), ("memory", 3, "20KB"), ("hub", 2, "5GB")])
def test_every_tensor_round_trips_bit_identical(tmp_path, nano_cfg, layout, shards, out_shard):
    src, ckpt, out = tmp_path / "src", tmp_path / "ckpt", tmp_path / "out"
    model = write_llava_hf(src, nano_cfg, layout, shards, seed=3)
    params, cfg, _ = import_llava_hf(src, progress=False)
    assert cfg == nano_cfg
    save_model(ckpt, params, cfg)
    export_hf(ckpt, out, max_shard_size=out_shard, progress=False)

    before, after = read_all(src), read_all(out)
    assert set(before) == set(after) and len(after) == len(model.state_dict())
    for key, (_, tensor) in before.items():
        stored, exported = after[key]
        assert stored == hub_name(key), "export writes the llava-hf hub names"
        assert exported.dtype == tensor.dtype and torch.equal(exported, tensor), key
    index = out / "model.safetensors.index.json"
    if out_shard == "20KB":
        weight_map = json.loads(index.read_text())["weight_map"]
        assert len(set(weight_map.values())) > 1 and set(weight_map) == {k for k, _ in after.values()}
    else:
        assert not index.exists() and (out / "model.safetensors").exists()

    # ... and transformers loads the export with the original logits.
    reloaded = LlavaForConditionalGeneration.from_pretrained(out).eval()
    batch = random_batch(cfg, [1, 1], cfg.tokens_per_image + 6, seed=5)
    assert np.array_equal(hf_logits(reloaded, batch), hf_logits(model, batch))


def test_bfloat16_export_is_the_rounded_checkpoint(tmp_path, llava_hf_dir):
    hf_dir, model = llava_hf_dir
    params, cfg, _ = import_llava_hf(hf_dir, progress=False)
    save_model(tmp_path / "c", params, cfg)
    export_hf(tmp_path / "c", tmp_path / "bf16", dtype="bfloat16", progress=False)
    after = read_all(tmp_path / "bf16")
    for key, tensor in model.state_dict().items():
        assert torch.equal(after[canonical_key(key)][1], tensor.to(torch.bfloat16)), key
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    batch = random_batch(cfg, [1], cfg.tokens_per_image + 4, seed=6)
    assert 0 < rel_l2(hf_logits(reloaded, batch), hf_logits(model, batch)) < 2e-2
