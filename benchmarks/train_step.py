"""Train-step throughput: vflan_jax vs transformers' LlavaForConditionalGeneration + torch AdamW,
same model shapes, same batch, measured alternately in one run.

    python benchmarks/train_step.py                       # CPU: `small` preset, seq 1024, batch 4
    python benchmarks/train_step.py --preset 7b --text_layers 4 --dtype bfloat16 --seq_len 2048 --batch 8   # GPU

Both sides train projector + LLM with the tower frozen, AdamW, global-norm clip 1.0, one image of
tokens_per_image slots per row. Prints a table and one JSON line (paste into docs/PERFORMANCE.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def make_batch(cfg, batch: int, seq_len: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = cfg.tokens_per_image
    ids = rng.integers(3, cfg.text.vocab_size - 1, size=(batch, seq_len)).astype(np.int64)
    ids[:, 0] = 1
    ids[:, 1:1 + n] = cfg.image_token_id
    labels = ids.copy()
    labels[:, : 1 + n] = -100
    size = cfg.vision.image_size
    pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    return ids, labels, pixels


def jax_step_fn(cfg, ids, labels, pixels, dtype):
    import jax
    import jax.numpy as jnp
    import flax.linen as nn
    from vflan_jax import optim
    from vflan_jax.data.packing import next_token_targets
    from vflan_jax.models.llava import LlavaForConditionalGeneration
    from vflan_jax.parallel import init_inputs
    from vflan_jax.train_step import TrainState, make_train_step

    mcfg = cfg.replace(dtype=dtype, remat_policy="none")
    model = LlavaForConditionalGeneration(mcfg)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), *init_inputs(mcfg))["params"])
    mask = optim.trainable_mask(params, ("projector", "llm"))
    trainable, _ = optim.split(params, mask)
    oc = optim.default_optim_config()
    oc.learning_rate, oc.warmup_ratio = 1e-5, 0.0
    tx, _ = optim.make_optimizer(oc, trainable, total_steps=1000)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(trainable), jnp.zeros((2,), jnp.uint32))
    b, t = ids.shape
    batch = {"input_ids": jnp.asarray(ids, jnp.int32), "targets": jnp.asarray(np.stack([next_token_targets(l) for l in labels]), jnp.int32),
             "pixel_values": jnp.asarray(pixels)[:, None], "image_mask": jnp.ones((b, 1), bool),
             "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
             "segment_ids": jnp.ones((b, t), jnp.int32), "task_ids": jnp.zeros((b, t), jnp.int32)}
    step = jax.jit(make_train_step(model, tx, lambda p: optim.split(p, mask), num_tasks=1, grad_accum_steps=1),
                   donate_argnums=(0,))
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        return float(metrics["loss"])  # blocks until the step is done

    return run


def torch_step_fn(cfg, ids, labels, pixels, dtype):
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from vflan_jax.convert.hf_config import model_config_to_hf

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlavaForConditionalGeneration(LlavaConfig(**model_config_to_hf(cfg))).to(device)
    model.model.vision_tower.requires_grad_(False)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
    ids_t, labels_t = torch.from_numpy(ids).to(device), torch.from_numpy(labels).to(device)
    pix = torch.from_numpy(pixels).to(device)

    def run():
        with torch.autocast(device_type=device, dtype=torch_dtype, enabled=torch_dtype != torch.float32):
            loss = model(input_ids=ids_t, pixel_values=pix, labels=labels_t).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss)

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--text_layers", type=int, default=None, help="fewer decoder layers (7B width on one GPU)")
    ap.add_argument("--seq_len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()

    from vflan_jax.flops import train_step_flops
    from vflan_jax.metrics import device_peak_tflops
    from vflan_jax.models.config import get_preset
    cfg = get_preset(args.preset)
    if args.text_layers:
        cfg = cfg.replace(**{"text.num_layers": args.text_layers})
    cfg = cfg.replace(image_token_id=cfg.text.vocab_size - 1)  # HF needs an in-vocabulary image token
    ids, labels, pixels = make_batch(cfg, args.batch, args.seq_len)
    runners = {"vflan_jax": jax_step_fn(cfg, ids, labels, pixels, args.dtype),
               "transformers+torch": torch_step_fn(cfg, ids, labels, pixels, args.dtype)}
    for run in runners.values():
        for _ in range(args.warmup):
            run()
    times = {name: [] for name in runners}
    for _ in range(args.steps):  # alternate, so both see the same machine state
        for name, run in runners.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    flops = train_step_flops(cfg, batch=args.batch, seq_len=args.seq_len, image_slots=1)
    import jax
    peak = device_peak_tflops()
    result = {"preset": args.preset, "text_layers": cfg.text.num_layers, "seq_len": args.seq_len, "batch": args.batch,
              "dtype": args.dtype, "device": jax.devices()[0].device_kind, "cpus": os.cpu_count(),
              "machine": platform.machine()}
    print(f"{'':20s} {'median s/step':>14s} {'tokens/s':>10s}")
    for name, ts in times.items():
        med = float(np.median(ts))
        result[f"{name}_s_per_step"] = med
        print(f"{name:20s} {med:14.3f} {args.batch * args.seq_len / med:10.0f}")
    ratio = result["transformers+torch_s_per_step"] / result["vflan_jax_s_per_step"]
    result["speedup"] = ratio
    if peak:
        result["mfu"] = flops / result["vflan_jax_s_per_step"] / (peak * 1e12)
    print(f"vflan_jax is {ratio:.2f}x transformers+torch" + (f"; MFU {100 * result['mfu']:.1f}%" if peak else ""))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
