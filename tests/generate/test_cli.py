"""`python -m vflan_jax.generate` on a tiny saved checkpoint with a real (offline) tokenizer.

The subprocesses inherit the 8 simulated CPU devices from conftest, so from_checkpoint loads
the parameters FSDP-sharded and generation runs on a mesh (batch padded to 8)."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

from vflan_jax.checkpoint import save_model
from vflan_jax.data import synthetic
from vflan_jax.inference.generator import GenerationConfig, Generator
from vflan_jax.models.config import get_preset
from vflan_jax.parallel import abstract_params

pytestmark = pytest.mark.slow   # the CLI runs in subprocesses

QUESTION = "What colour is the square?"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate_cli")
    tok_dir = synthetic.build_tokenizer(root / "tok", ["What colour is the square?", "It is red.",
                                                         "Is there a circle in the image?"] * 20, vocab_size=300)
    cfg = get_preset("nano", **{"text.vocab_size": 320})
    rng = np.random.default_rng(0)  # random weights straight from the shapes: no init compile
    params = jax.tree.map(lambda s: rng.normal(0, 0.5, s.shape).astype(np.float32), nn.unbox(abstract_params(cfg)))
    save_model(root / "ckpt", params, cfg, tokenizer_dir=tok_dir)
    image = root / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), np.uint8)).save(image)
    return dict(ckpt=str(root / "ckpt"), image=str(image), tokenizer=AutoTokenizer.from_pretrained(tok_dir),
                cache=str(root / "jax_cache"), params=params, config=cfg)


def _run(checkpoint, *args):
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=checkpoint["cache"],  # reruns reuse the programs
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    cmd = [sys.executable, "-m", "vflan_jax.generate", "--checkpoint", checkpoint["ckpt"], "--image",
           checkpoint["image"], "--max_new_tokens", "6", "--json", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _check(out, tokenizer):
    ids = out["token_ids"]
    assert 1 <= len(ids) <= 6 and all(isinstance(t, int) for t in ids)
    assert tokenizer.eos_token_id not in ids[:-1]  # nothing after EOS
    assert out["text"] == tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_cli_json_equals_the_api_unsharded(checkpoint):
    (out,) = _run(checkpoint, "--prompt", QUESTION)
    _check(out, checkpoint["tokenizer"])
    gen = Generator(checkpoint["params"], checkpoint["config"], checkpoint["tokenizer"], batch_size=1)
    (expect,) = gen.generate([QUESTION], [checkpoint["image"]], GenerationConfig(max_new_tokens=6))
    assert out == {"text": expect.text, "token_ids": expect.token_ids}

