"""Decode throughput of vflan_jax.generate vs transformers' generate, same weights, same inputs.

    .venv/bin/python benchmarks/generate_throughput.py                  # batch 1 and 16, 64 new tokens
    .venv/bin/python benchmarks/generate_throughput.py --pope 320       # + POPE-sized run estimate

Model: PRESETS["small"] (CLIP 6x384 @224 -> 256 image tokens, LLaMA 6x512, vocab 32000), random
weights built in transformers and mapped with the converter's layout table. Prompt: one image
+ BOS + 43 text tokens = 300 positions. EOS is disabled on both sides so every row makes exactly
--new_tokens tokens. Timings: best of --repeats interleaved rounds after one warm-up (compilation) run.
  decode tok/s   = batch * (new_tokens - 1) / (t(new_tokens) - t(1))   (prefill subtracted)
  end-to-end     = batch * new_tokens / t(new_tokens)
POPE estimate: --pope N synthetic 640x480 JPEG questions through Generator.generate (real image
loading, vicuna_v1 prompt, synthetic tokenizer), 4 new tokens (~3-token answer + EOS), batch 16,
then extrapolated linearly to 8,910 questions.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
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
POPE_QUESTIONS = 8910


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


def pope_estimate(params, cfg, questions: int) -> dict:
    from PIL import Image

    from vflan_jax.data import synthetic
    objects = ("dog", "car", "person", "dining table", "traffic light", "bicycle")
    with tempfile.TemporaryDirectory() as tmp:
        prompts = [f"Is there a {objects[i % len(objects)]} in the image?\nAnswer the question using a single word "
                   "or phrase." for i in range(questions)]
        tok_dir = synthetic.build_tokenizer(os.path.join(tmp, "tok"), prompts[:len(objects)] * 30, vocab_size=1024)
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        rng = np.random.default_rng(0)
        images = []
        for i in range(min(questions, 64)):  # POPE asks ~6 questions per COCO image
            path = os.path.join(tmp, f"{i}.jpg")
            Image.fromarray(rng.integers(0, 255, (480, 640, 3), np.uint8)).save(path, quality=90)
            images.append(path)
        images = [images[i % len(images)] for i in range(questions)]
        gen = Generator(params, cfg, tokenizer, batch_size=16)
        config = GenerationConfig(max_new_tokens=4)
        gen.generate(prompts[:16], images[:16], config)  # compile
        t = time.perf_counter()
        out = gen.generate(prompts, images, config)
        elapsed = time.perf_counter() - t
    prompt_len = len(gen.render(prompts[0], True))
    return {"questions_measured": questions, "seconds": elapsed, "questions_per_s": questions / elapsed,
            "estimated_pope_minutes": POPE_QUESTIONS / (questions / elapsed) / 60,
            "mean_new_tokens": float(np.mean([len(r.token_ids) for r in out])), "prompt_chars": prompt_len}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,16")
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--torch_threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--pope", type=int, default=0, help="questions to time for the POPE estimate (0: skip)")
    args = p.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    hf, hf_cfg, params, cfg = build_models()
    print(json.dumps({"devices": [str(d) for d in jax.devices()], "torch_threads": torch.get_num_threads()}))
    for b in (int(x) for x in args.batches.split(",") if x):
        print(json.dumps(throughput(hf, hf_cfg, params, cfg, b, args.new_tokens, args.repeats)), flush=True)
    if args.pope:
        print(json.dumps({"pope": pope_estimate(params, cfg, args.pope)}), flush=True)


if __name__ == "__main__":
    main()
