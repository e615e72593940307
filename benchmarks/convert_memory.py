"""Peak host memory of `convert import-hf` / `export-hf` against the model's size.

Writes a random ~1.2B-parameter transformers LLaVA checkpoint (CLIP ViT-B/14-224 + a
TinyLlama-1.1B-shaped LLaMA, float32, llava-hf key names, sharded safetensors + index) into a
temporary directory, then runs each CLI command in its own process and reads that process's
peak resident set size (os.wait4 -> ru_maxrss). A baseline process that only imports the
same libraries and starts the JAX backend gives the fixed cost. Results go to stdout as JSON.

    python benchmarks/convert_memory.py [--workdir /big/tmp] [--keep]

Takes ~3-5 minutes and ~15 GB of disk on a 2-core CPU machine.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from vflan_jax.convert import layout as L
from vflan_jax.convert.hf_config import model_config_to_hf
from vflan_jax.convert.hf_export import llava_hf_key
from vflan_jax.convert.import_plan import expected_shapes, torch_shape
from vflan_jax.convert.safetensors_writer import write_safetensors
from vflan_jax.models.config import ModelConfig, TextConfig, VisionConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]

CONFIG = ModelConfig(
    vision=VisionConfig(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, image_size=224,
                        patch_size=14),
    text=TextConfig(vocab_size=32064, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
                    num_kv_heads=4, max_position_embeddings=2048),
    image_token_id=32000)


def write_random_checkpoint(out: pathlib.Path, cfg: ModelConfig, seed: int = 0) -> tuple[int, int]:
    """(parameters, bytes). Streams tensor by tensor, so this process stays small too."""
    shapes = expected_shapes(cfg)
    specs = []
    for path, src in L.llava_layout(cfg).items():
        per_layer = shapes[path][1:] if src.stacked else shapes[path]
        specs += [(llava_hf_key(k), torch_shape(per_layer, src.kind), np.dtype(np.float32)) for k in src.keys]
    rng = np.random.default_rng(seed)
    write_safetensors(out, specs, lambda i: rng.standard_normal(specs[i][1], np.float32) * 0.02,
                      max_shard_bytes=2 * 10**9)
    (out / "config.json").write_text(json.dumps(model_config_to_hf(cfg)))
    count = sum(int(np.prod(s)) for _, s, _ in specs)
    return count, count * 4


def peak_rss(args: list[str]) -> dict:
    """Run a command; its own peak RSS (ru_maxrss is in KiB on Linux) and wall time."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("XLA_FLAGS", None)
    start = time.time()
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{args} failed with {os.waitstatus_to_exitcode(status)}")
    return {"peak_rss_bytes": usage.ru_maxrss * 1024, "wall_s": round(time.time() - start, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=None, help="where the ~15 GB of checkpoints go (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = p.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="convert_memory_", dir=args.workdir))
    try:
        t = time.time()
        params, nbytes = write_random_checkpoint(work / "hf", CONFIG)
        print(f"wrote {params / 1e9:.3f}B params ({nbytes / 1e9:.2f} GB) in {time.time() - t:.0f}s", file=sys.stderr)
        py = [sys.executable]
        results = {"model_params": params, "model_bytes": nbytes, "dtype": "float32",
                   "baseline": peak_rss(py + ["-c", "import jax, orbax.checkpoint, vflan_jax.convert.hf_import, "
                                                    "vflan_jax.convert.hf_export; jax.devices()"]),
                   "import-hf": peak_rss(py + ["-m", "vflan_jax.convert", "import-hf", "--hf_dir", str(work / "hf"),
                                               "--out", str(work / "ckpt")]),
                   "export-hf": peak_rss(py + ["-m", "vflan_jax.convert", "export-hf", "--checkpoint",
                                               str(work / "ckpt"), "--out", str(work / "export")])}
        base = results["baseline"]["peak_rss_bytes"]
        for name in ("import-hf", "export-hf"):
            r = results[name]
            r["peak_rss_over_model"] = round(r["peak_rss_bytes"] / nbytes, 3)
            r["peak_rss_minus_baseline_over_model"] = round((r["peak_rss_bytes"] - base) / nbytes, 3)
        print(json.dumps(results, indent=2))
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
