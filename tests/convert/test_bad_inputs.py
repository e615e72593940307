"""Every bad input fails with a ConversionError that names the file and the tensor at fault,
before any weight is converted."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.convert.checkpoints import projector_state, write_clip, write_llama
from vflan_jax.convert.errors import ConversionError
from vflan_jax.convert.hf_import import import_composed, import_llava_hf


@pytest.fixture
def hf_copy(tmp_path, llava_hf_dir):
    src, _ = llava_hf_dir
    dst = tmp_path / "hf"
    shutil.copytree(src, dst)
    return dst


def rewrite(path, change):
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def fails(*match, call):
    with pytest.raises(ConversionError) as err:
        call()
    for text in match:
        assert str(text) in str(err.value), str(err.value)
    return str(err.value)


def test_missing_tensor(hf_copy):
    rewrite(hf_copy / "model.safetensors", lambda t: t.pop("language_model.model.layers.1.mlp.up_proj.weight"))
    fails("model.language_model.layers.1.mlp.up_proj.weight", "missing", hf_copy,
          call=lambda: import_llava_hf(hf_copy, progress=False))


def test_extra_tensor(hf_copy):
    extra = {"language_model.model.layers.0.extra.weight": torch.ones(2)}
    rewrite(hf_copy / "model.safetensors", lambda t: t.update(extra))
    fails("language_model.model.layers.0.extra.weight", "unexpected", hf_copy / "model.safetensors",
          call=lambda: import_llava_hf(hf_copy, progress=False))


def test_shape_disagrees_with_config(hf_copy):
    config = json.loads((hf_copy / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 48
    (hf_copy / "config.json").write_text(json.dumps(config))
    msg = fails("mlp.gate_proj.weight", hf_copy / "model.safetensors", hf_copy / "config.json", "[64, 32]", "[48, 32]",
                call=lambda: import_llava_hf(hf_copy, progress=False))
    assert "layers.0." in msg


@pytest.mark.parametrize("where,model_type", [("top", "gpt2"), ("text", "mistral"), ("vision", "siglip_vision_model")])
def test_unknown_architecture_in_hf_dir(hf_copy, where, model_type):
    config = json.loads((hf_copy / "config.json").read_text())
    {"top": config, "text": config["text_config"], "vision": config["vision_config"]}[where]["model_type"] = model_type
    (hf_copy / "config.json").write_text(json.dumps(config))
    fails(model_type, hf_copy / "config.json", call=lambda: import_llava_hf(hf_copy, progress=False))


def test_unknown_architecture_in_composed_sources(tmp_path, nano_cfg):
    write_clip(tmp_path / "clip", nano_cfg)
    write_llama(tmp_path / "llm", nano_cfg)
    config = json.loads((tmp_path / "llm" / "config.json").read_text())
    (tmp_path / "llm" / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    fails("qwen2", tmp_path / "llm" / "config.json",
          call=lambda: import_composed(tmp_path / "clip", tmp_path / "llm", progress=False))
    (tmp_path / "llm" / "config.json").write_text(json.dumps(config))
    config = json.loads((tmp_path / "clip" / "config.json").read_text())
    (tmp_path / "clip" / "config.json").write_text(json.dumps({**config, "model_type": "siglip"}))
    fails("siglip", tmp_path / "clip" / "config.json",
          call=lambda: import_composed(tmp_path / "clip", tmp_path / "llm", progress=False))


def test_directory_without_weights(hf_copy):
    (hf_copy / "model.safetensors").unlink()
    fails("no weights", hf_copy, call=lambda: import_llava_hf(hf_copy, progress=False))
    (hf_copy / "pytorch_model.bin").write_bytes(b"")
    fails("pytorch_model.bin", "safetensors", call=lambda: import_llava_hf(hf_copy, progress=False))


def test_truncated_and_corrupt_safetensors(hf_copy):
    path = hf_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    fails(path, "truncated", "vision_tower.pre_layrnorm.weight",  # the last tensor in the file, by offset
          call=lambda: import_llava_hf(hf_copy, progress=False))
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + data[24:])
    fails(path, "corrupt", call=lambda: import_llava_hf(hf_copy, progress=False))
    path.write_bytes(data[:5])
    fails(path, "truncated", call=lambda: import_llava_hf(hf_copy, progress=False))


def test_index_names_a_missing_shard(hf_copy):
    (hf_copy / "model.safetensors").rename(hf_copy / "model-00001-of-00002.safetensors")
    weight_map = {"language_model.model.norm.weight": "model-00002-of-00002.safetensors"}
    (hf_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    fails("model-00002-of-00002.safetensors", "language_model.model.norm.weight",
          call=lambda: import_llava_hf(hf_copy, progress=False))


def test_bad_projector_files(tmp_path, nano_cfg):
    write_clip(tmp_path / "clip", nano_cfg)
    write_llama(tmp_path / "llm", nano_cfg)
    def run(projector):
        return import_composed(tmp_path / "clip", tmp_path / "llm", projector, progress=False)

    corrupt = tmp_path / "mm_projector.bin"
    corrupt.write_bytes(b"PK\x03\x04 truncated zip")
    fails(corrupt, call=lambda: run(corrupt))
    state = projector_state(nano_cfg)
    state["model.mm_projector.2.weight"] = torch.zeros(5, 5)
    torch.save(state, corrupt)
    fails("model.mm_projector.2.weight", corrupt, "[5, 5]", call=lambda: run(corrupt))
