"""Shared fixtures: one tiny model written once per session in the layouts tests need."""
import pathlib

import pytest

from tests.convert.checkpoints import write_llava_hf, write_tokenizer
from tests.models.hf_oracle import nano_config
from vflan_jax.checkpoint import save_model
from vflan_jax.convert.hf_import import import_llava_hf


@pytest.fixture(scope="session")
def nano_cfg():
    return nano_config()


@pytest.fixture(scope="session")
def llava_hf_dir(tmp_path_factory, nano_cfg):
    """(dir, torch model): a transformers 5.x save_pretrained directory with a tokenizer."""
    d = tmp_path_factory.mktemp("llava_hf")
    model = write_llava_hf(d, nano_cfg, "disk", seed=11)
    write_tokenizer(d, nano_cfg.text.vocab_size)
    return d, model


@pytest.fixture(scope="session")
def placeholder_checkpoint(tmp_path_factory, llava_hf_dir):
    """A model checkpoint that uses LLaVA's -200 image placeholder (what training produces), with a
    tokenizer of exactly vocab_size entries: the case export-hf must extend."""
    hf_dir, model = llava_hf_dir
    params, cfg, _ = import_llava_hf(hf_dir, progress=False)
    cfg = cfg.replace(image_token_id=-200)
    out = pathlib.Path(tmp_path_factory.mktemp("ckpt")) / "c"
    save_model(out, params, cfg, tokenizer_dir=hf_dir)
    return out, model
