"""Decode throughput of vflan_jax.generate vs transformers' generate, same weights, same inputs.

    .venv/bin/python benchmarks/generate_throughput.py                  # batch 1 and 16, 64 new tokens

Model: PRESETS["small"] (CLIP 6x384 @224 -> 256 image tokens, LLaMA 6x512, vocab 32000), random
weights built in transformers and mapped with the converter's layout table. Prompt: one image
+ BOS + 43 text tokens = 300 positions. EOS is disabled on both sides so every row makes exactly
--new_tokens tokens. Timings: best of --repeats interleaved rounds after one warm-up (compilation) run.
  decode tok/s   = batch * (new_tokens - 1) / (t(new_tokens) - t(1))   (prefill subtracted)
  end-to-end     = batch * new_tokens / t(new_tokens)
Floor: the roofline of a decode step on this machine (see decode_floor), the bound on any speed-up.
A full POPE-sized evaluation is timed by benchmarks/pope_wall_time.py.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from vflan_jax.convert.hf_config import model_config_to_hf
from vflan_jax.convert.layout import canonical_key, llava_layout
from vflan_jax.convert.tensors import params_from_tensors
from vflan_jax.generate import GenerationConfig, Generator
from vflan_jax.models.config import get_preset

PROMPT_POSITIONS = 300


def build_models(seed: int = 0):
    base = get_preset("small")
    hf_cfg = base.replace(image_token_id=base.text.vocab_size - 1)
    torch.manual_seed(seed)
    hf = LlavaForConditionalGeneration(LlavaConfig(**model_config_to_hf(hf_cfg))).eval()
    hf.generation_config.eos_token_id = None  # fixed-length generation
    state = {canonical_key(k): v.detach().float().numpy() for k, v in hf.state_dict().items()}
    params = jax.tree.map(jax.numpy.asarray, params_from_tensors(llava_layout(hf_cfg), state.__getitem__))
    ours = base.replace(**{"text.eos_token_id": -1})  # LLaVA's -200 placeholder; EOS off
    return hf, hf_cfg, params, ours


def _interleaved_best(fns: dict, repeats: int) -> dict:
    """Best time per function over `repeats` rounds that alternate between them, so both systems
    see the same machine load (this CPU is shared; torch suffers most from oversubscription)."""
    for fn in fns.values():
        fn()  # warm-up: compilation (ours) / allocator warm-up (torch)
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def throughput(hf, hf_cfg, params, cfg, batch: int, new_tokens: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    text = rng.integers(3, 30000, size=PROMPT_POSITIONS - cfg.tokens_per_image - 1).tolist()
    ids = [1, -200] + text  # BOS + image (256 positions) + 43 text tokens = 300 positions
    pix = rng.standard_normal((3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
    gen = Generator(params, cfg, None, batch_size=batch)

    def ours(n):
        out = gen.generate_ids([ids] * batch, [pix] * batch, GenerationConfig(max_new_tokens=n))
        assert all(len(r.token_ids) == n for r in out)

    expanded = [1] + [hf_cfg.image_token_id] * cfg.tokens_per_image + text
    hf_ids = torch.tensor([expanded] * batch)
    assert hf_ids.shape[1] == PROMPT_POSITIONS
    hf_pix = torch.from_numpy(np.stack([pix] * batch))

    def theirs(n):
        with torch.no_grad():
            out = hf.generate(input_ids=hf_ids, pixel_values=hf_pix, attention_mask=torch.ones_like(hf_ids),
                              max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        assert out.shape[1] == PROMPT_POSITIONS + n

    t = _interleaved_best({(name, n): (lambda fn=fn, n=n: fn(n)) for name, fn in
                           (("vflan_jax", ours), ("transformers", theirs)) for n in (new_tokens, 1)}, repeats)
    row = {"batch": batch}
    for name in ("vflan_jax", "transformers"):
        t_full, t_prefill = t[(name, new_tokens)], t[(name, 1)]
        row[name] = {"decode_tok_s": batch * (new_tokens - 1) / (t_full - t_prefill),
                     "end_to_end_tok_s": batch * new_tokens / t_full, "t_total_s": t_full, "t_prefill_s": t_prefill}
    row["speedup_decode"] = row["vflan_jax"]["decode_tok_s"] / row["transformers"]["decode_tok_s"]
    row["speedup_end_to_end"] = row["vflan_jax"]["end_to_end_tok_s"] / row["transformers"]["end_to_end_tok_s"]
    return row


def _best_time(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def decode_floor(params, cfg, rows: list[dict], new_tokens: int) -> dict:
    """Roofline of one decode step on this machine, to read the speed-ups against: a step must at
    least stream every decoder and lm_head weight once plus each row's KV cache (at its mean length
    over the run, prompt + new_tokens / 2) from memory, and do 2 x batch x weights flops (/ the
    machine's f32 matmul peak). Both rates are measured here with torch (its default threads):
    peak = best 2048^3 matmul, bandwidth = best [1, 4096] @ [4096, 8192] matvec (128 MB, far
    beyond the caches). Attention flops and everything else are left out, so the floor is
    optimistic and `max_speedup` = transformers' step / floor is an upper bound."""
    lm = {k: v for k, v in params["language_model"].items() if k != "embed_tokens"}
    weights = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lm))
    a = torch.randn(2048, 2048)
    peak = 2 * 2048 ** 3 / _best_time(lambda: a @ a)
    x, w = torch.randn(1, 4096), torch.randn(4096, 8192)
    bandwidth = w.numel() * 4 / _best_time(lambda: x @ w, 20)
    t = cfg.text
    cache_per_row = t.num_layers * 2 * t.num_kv_heads * t.resolved_head_dim * (PROMPT_POSITIONS + new_tokens / 2)
    out = {"decode_weights": weights, "kv_cache_values_per_row": cache_per_row, "peak_gflop_s": peak / 1e9,
           "bandwidth_gb_s": bandwidth / 1e9, "batches": []}
    for row in rows:
        b = row["batch"]
        floor = max((weights + b * cache_per_row) * 4 / bandwidth, 2 * b * weights / peak)
        hf_step = b / row["transformers"]["decode_tok_s"]
        ours_step = b / row["vflan_jax"]["decode_tok_s"]
        out["batches"].append({"batch": b, "floor_ms": floor * 1e3, "vflan_jax_ms": ours_step * 1e3,
                               "transformers_ms": hf_step * 1e3, "max_speedup": hf_step / floor,
                               "vflan_jax_of_floor": floor / ours_step})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,16")
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--torch_threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = p.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    hf, hf_cfg, params, cfg = build_models()
    print(json.dumps({"devices": [str(d) for d in jax.devices()], "torch_threads": torch.get_num_threads()}))
    rows = []
    for b in (int(x) for x in args.batches.split(",") if x):
        rows.append(throughput(hf, hf_cfg, params, cfg, b, args.new_tokens, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"floor": decode_floor(params, cfg, rows, args.new_tokens)}), flush=True)


if __name__ == "__main__":
    main()
