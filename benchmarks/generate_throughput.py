"""Decode throughput of vflan_jax.generate vs transformers' generate, same weights, same inputs.

    .venv/bin/python benchmarks/generate_throughput.py                  # CPU: batch 1 and 16, 64 new tokens
    python benchmarks/generate_throughput.py --preset 7b --text_layers 4 --dtype bfloat16   # GPU, 7B-wide

Model: PRESETS["small"] by default (CLIP 6x384 @224 -> 256 image tokens, LLaMA 6x512, vocab 32000),
random weights built in transformers and mapped with the converter's layout table. Prompt: one
image + BOS + text = 300 positions (or the image's tokens + 44 when an image needs more, e.g. 620
for CLIP-L/336). EOS is disabled on both sides so every row makes exactly --new_tokens tokens.
On a GPU torch runs on cuda and both sides run in --dtype (weights cast, no autocast).
Timings: best of --repeats interleaved rounds after one warm-up (compilation) run.
  decode tok/s   = batch * (new_tokens - 1) / (t(new_tokens) - t(1))   (prefill subtracted)
  end-to-end     = batch * new_tokens / t(new_tokens)
Floor: the roofline of a decode step on this machine (see decode_floor), the bound on any speed-up.
A full POPE-sized evaluation is timed by benchmarks/pope_wall_time.py.
"""
from __future__ import annotations

import argparse
import json

import jax
import numpy as np
import torch
from timing import best_time, interleaved_best
from transformers import LlavaConfig, LlavaForConditionalGeneration

from vflan_jax.constants import IMAGE_PLACEHOLDER
from vflan_jax.convert.hf_config import model_config_to_hf
from vflan_jax.convert.layout import canonical_key, llava_layout
from vflan_jax.convert.tensors import params_from_tensors
from vflan_jax.inference.generator import GenerationConfig, Generator
from vflan_jax.models.config import get_preset

PROMPT_POSITIONS = 300
PROMPT_TEXT_TOKENS = 43  # after BOS and the image: 1 + 256 + 43 = 300 for `small`
TORCH_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def prompt_positions(cfg) -> int:
    return max(PROMPT_POSITIONS, 1 + cfg.tokens_per_image + PROMPT_TEXT_TOKENS)


def _sync():
    if TORCH_DEVICE == "cuda":
        torch.cuda.synchronize()


def build_models(preset: str = "small", text_layers: int | None = None, dtype: str = "float32", seed: int = 0):
    base = get_preset(preset)
    if text_layers:
        base = base.replace(**{"text.num_layers": text_layers})
    hf_cfg = base.replace(image_token_id=base.text.vocab_size - 1)
    torch.manual_seed(seed)
    hf = LlavaForConditionalGeneration(LlavaConfig(**model_config_to_hf(hf_cfg))).eval()
    hf.generation_config.eos_token_id = None  # fixed-length generation
    state = {canonical_key(k): v.detach().float().numpy() for k, v in hf.state_dict().items()}
    params = params_from_tensors(llava_layout(hf_cfg), state.__getitem__)
    del state
    params = jax.tree.map(lambda x: jax.numpy.asarray(x, dtype), params)
    hf = hf.to(device=TORCH_DEVICE, dtype=getattr(torch, dtype))
    # LLaVA's -200 placeholder; EOS off
    ours = base.replace(dtype=dtype, param_dtype=dtype, **{"text.eos_token_id": -1})
    return hf, hf_cfg, params, ours


def throughput(hf, hf_cfg, params, cfg, batch: int, new_tokens: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    positions = prompt_positions(cfg)
    text = rng.integers(3, min(30000, cfg.text.vocab_size - 1), size=positions - cfg.tokens_per_image - 1).tolist()
    ids = [1, IMAGE_PLACEHOLDER] + text  # BOS + image + text tokens
    pix = rng.standard_normal((3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
    gen = Generator(params, cfg, None, batch_size=batch)

    def ours(n):
        out = gen.generate_ids([ids] * batch, [pix] * batch, GenerationConfig(max_new_tokens=n))
        assert all(len(r.token_ids) == n for r in out)

    expanded = [1] + [hf_cfg.image_token_id] * cfg.tokens_per_image + text
    hf_ids = torch.tensor([expanded] * batch, device=TORCH_DEVICE)
    assert hf_ids.shape[1] == positions
    hf_pix = torch.from_numpy(np.stack([pix] * batch)).to(TORCH_DEVICE, next(hf.parameters()).dtype)

    def theirs(n):
        with torch.no_grad():
            out = hf.generate(input_ids=hf_ids, pixel_values=hf_pix, attention_mask=torch.ones_like(hf_ids),
                              max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            _sync()
        assert out.shape[1] == positions + n

    t = interleaved_best({(name, n): (lambda fn=fn, n=n: fn(n)) for name, fn in
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
    return best_time(lambda: (fn(), _sync()), repeats)


def decode_floor(params, cfg, rows: list[dict], new_tokens: int) -> dict:
    """Roofline of one decode step on this machine, to read the speed-ups against: a step must at
    least stream every decoder and lm_head weight once plus each row's KV cache (at its mean length
    over the run, prompt + new_tokens / 2) from memory, and do 2 x batch x weights flops (/ the
    machine's matmul peak in that dtype). Both rates are measured here with torch (its default
    threads, or cuda): peak = best n^3 matmul, bandwidth = best [1, n] @ [n, 2n] matvec (CPU:
    n = 2048 / 4096, 128 MB in f32, far beyond the caches; GPU: n = 8192 / 16384). Attention flops
    and everything else are left out, so the floor is optimistic and `max_speedup` =
    transformers' step / floor is an upper bound."""
    lm = {k: v for k, v in params["language_model"].items() if k != "embed_tokens"}
    weights = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lm))
    dtype = getattr(torch, cfg.param_dtype)
    item = torch.tensor([], dtype=dtype).element_size()
    n_mm, n_mv = (8192, 16384) if TORCH_DEVICE == "cuda" else (2048, 4096)
    a = torch.randn(n_mm, n_mm, device=TORCH_DEVICE, dtype=dtype)
    peak = 2 * n_mm ** 3 / _best_time(lambda: a @ a)
    x = torch.randn(1, n_mv, device=TORCH_DEVICE, dtype=dtype)
    w = torch.randn(n_mv, 2 * n_mv, device=TORCH_DEVICE, dtype=dtype)
    bandwidth = w.numel() * item / _best_time(lambda: x @ w, 20)
    t = cfg.text
    cache_per_row = t.num_layers * 2 * t.num_kv_heads * t.resolved_head_dim * (prompt_positions(cfg) + new_tokens / 2)
    out = {"decode_weights": weights, "kv_cache_values_per_row": cache_per_row, "peak_gflop_s": peak / 1e9,
           "bandwidth_gb_s": bandwidth / 1e9, "batches": []}
    for row in rows:
        b = row["batch"]
        floor = max((weights + b * cache_per_row) * item / bandwidth, 2 * b * weights / peak)
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
    p.add_argument("--preset", default="small")
    p.add_argument("--text_layers", type=int, default=None, help="fewer decoder layers (7B width on one GPU)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    hf, hf_cfg, params, cfg = build_models(args.preset, args.text_layers, args.dtype)
    print(json.dumps({"devices": [str(d) for d in jax.devices()], "torch_device": TORCH_DEVICE,
                      "torch_threads": torch.get_num_threads(), "preset": args.preset,
                      "text_layers": cfg.text.num_layers, "dtype": args.dtype,
                      "prompt_positions": prompt_positions(cfg)}))
    rows = []
    for b in (int(x) for x in args.batches.split(",") if x):
        rows.append(throughput(hf, hf_cfg, params, cfg, b, args.new_tokens, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"floor": decode_floor(params, cfg, rows, args.new_tokens)}), flush=True)


if __name__ == "__main__":
    main()
