"""Train-step throughput: vflan_jax vs transformers' LlavaForConditionalGeneration + torch AdamW,
same model shapes, same batch, measured interleaved in one run (best of --repeats rounds).

    python benchmarks/train_step.py                       # CPU: `small` preset, seq 1024, batch 4
    python benchmarks/train_step.py --preset 7b --text_layers 4 --dtype bfloat16 --seq_len 2048 --batch 8   # GPU

Both sides train projector + LLM with the tower frozen, AdamW, global-norm clip 1.0, one image of
tokens_per_image slots per row. Three systems: vflan_jax as configured by default (attention
"auto", chunked lm_head + cross-entropy), vflan_jax with the previous path (XLA attention with a
boolean mask, full float32 logits + optax cross-entropy) and transformers + torch. For each: the
whole step, the forward loss alone and forward + backward (no optimizer; the gradients reduced to
their global norm on both sides, so no gradient buffers are returned), so (fwd+bwd)/fwd is read on
the same weights and batch. Prints the machine load (as `uptime` does), a table and one
JSON line (paste into docs/PERFORMANCE.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform

import numpy as np
from timing import interleaved_best

BEFORE = dict(attention_impl="xla", loss_chunk_size=0)  # the path before issue 13


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


def jax_step_fns(cfg, ids, labels, pixels, dtype):
    """-> (step, forward loss, forward + backward) callables that block until done."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from vflan_jax.data.packing import next_token_targets
    from vflan_jax.models.llava import LlavaForConditionalGeneration
    from vflan_jax.parallel import init_inputs
    from vflan_jax.train import optim
    from vflan_jax.train.step import TrainState, make_train_step, token_losses

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
    targets = np.stack([next_token_targets(row) for row in labels])
    batch = {"input_ids": jnp.asarray(ids, jnp.int32), "targets": jnp.asarray(targets, jnp.int32),
             "pixel_values": jnp.asarray(pixels)[:, None], "image_mask": jnp.ones((b, 1), bool),
             "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
             "segment_ids": jnp.ones((b, t), jnp.int32), "task_ids": jnp.zeros((b, t), jnp.int32)}
    step = jax.jit(make_train_step(model, tx, lambda p: optim.split(p, mask), num_tasks=1, grad_accum_steps=1),
                   donate_argnums=(0,))
    holder = {"state": state}
    # The step donates (frees) the state's arrays, so the loss timings get their own copy.
    weights, frozen = jax.tree.map(jnp.copy, optim.split(params, mask))

    def loss(t, f, b):  # frozen weights and batch as arguments: closed over, XLA constant-folds the tower
        _, w, total = token_losses(model, optim.merge(t, f), b)
        return total / w.sum()

    def loss_and_grad_norm(t, f, b):
        # Gradients reduced to their global norm inside the jit (the step's clip reads them the same way),
        # so no fresh gradient buffers are returned per call; torch's fwd_bwd computes the same norm.
        value, grads = jax.value_and_grad(loss)(t, f, b)
        return value, optax.tree.norm(grads)

    fwd, fwd_bwd = jax.jit(loss), jax.jit(loss_and_grad_norm)

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        return float(metrics["loss"])  # blocks until the step is done

    run.compiled_hlo = lambda: step.lower(holder["state"], batch).compile().as_text()  # for the profile
    run.lowered = lambda: step.lower(holder["state"], batch)   # memory_analysis (benchmarks/lora_train_step.py)

    return (run, lambda: float(fwd(weights, frozen, batch)),
            lambda: jax.block_until_ready(fwd_bwd(weights, frozen, batch)))


def torch_step_fns(cfg, ids, labels, pixels, dtype, wrap_model=None):
    """wrap_model: applied to the model once its tower is frozen (peft LoRA: benchmarks/lora_train_step.py)."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from vflan_jax.convert.hf_config import model_config_to_hf

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlavaForConditionalGeneration(LlavaConfig(**model_config_to_hf(cfg))).to(device)
    model.model.vision_tower.requires_grad_(False)
    if wrap_model is not None:
        model = wrap_model(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
    ids_t, labels_t = torch.from_numpy(ids).to(device), torch.from_numpy(labels).to(device)
    pix = torch.from_numpy(pixels).to(device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def loss():
        with torch.autocast(device_type=device, dtype=torch_dtype, enabled=torch_dtype != torch.float32):
            return model(input_ids=ids_t, pixel_values=pix, labels=labels_t).loss

    def fwd():
        with torch.no_grad():
            out = float(loss())
        sync()
        return out

    def fwd_bwd():  # as vflan_jax's: loss, gradients, their global norm; no optimizer
        loss().backward()
        float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
        opt.zero_grad(set_to_none=True)
        sync()

    def run():
        out = loss()
        out.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return float(out.detach())

    return run, fwd, fwd_bwd


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--text_layers", type=int, default=None, help="fewer decoder layers (7B width on one GPU)")
    ap.add_argument("--seq_len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best time of each counts")
    ap.add_argument("--skip_before", action="store_true", help="leave out the pre-issue-13 vflan_jax path")
    args = ap.parse_args()

    from vflan_jax.models.config import get_preset
    from vflan_jax.train.flops import train_step_flops
    from vflan_jax.train.metrics import device_peak_tflops
    cfg = get_preset(args.preset)
    if args.text_layers:
        cfg = cfg.replace(**{"text.num_layers": args.text_layers})
    cfg = cfg.replace(image_token_id=cfg.text.vocab_size - 1)  # HF needs an in-vocabulary image token
    ids, labels, pixels = make_batch(cfg, args.batch, args.seq_len)
    systems = {"vflan_jax": jax_step_fns(cfg, ids, labels, pixels, args.dtype)}
    if not args.skip_before:
        systems["vflan_jax (before)"] = jax_step_fns(cfg.replace(**BEFORE), ids, labels, pixels, args.dtype)
    systems["transformers+torch"] = torch_step_fns(cfg, ids, labels, pixels, args.dtype)
    load_before = os.getloadavg()
    best = interleaved_best({(name, part): fn for name, fns in systems.items()
                             for part, fn in zip(("step", "fwd", "fwd_bwd"), fns, strict=True)}, args.repeats)
    load_after = os.getloadavg()
    flops = train_step_flops(cfg, batch=args.batch, seq_len=args.seq_len, image_slots=1)
    import jax
    peak = device_peak_tflops()
    result = {"preset": args.preset, "text_layers": cfg.text.num_layers, "seq_len": args.seq_len, "batch": args.batch,
              "dtype": args.dtype, "device": jax.devices()[0].device_kind, "cpus": os.cpu_count(),
              "machine": platform.machine(), "repeats": args.repeats,
              "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in load_after]}
    torch_step = best[("transformers+torch", "step")]
    print("load average (1, 5, 15 min) before: %.2f %.2f %.2f, after: %.2f %.2f %.2f" % (*load_before, *load_after))
    print("| system | s/step | tokens/s | vs transformers+torch | fwd s | fwd+bwd s | (fwd+bwd)/fwd |")
    print("|---|---|---|---|---|---|---|")
    for name in systems:
        step, fwd, fwd_bwd = (best[(name, part)] for part in ("step", "fwd", "fwd_bwd"))
        result[name] = {"s_per_step": step, "fwd_s": fwd, "fwd_bwd_s": fwd_bwd, "speedup": torch_step / step}
        print(f"| {name} | {step:.2f} | {args.batch * args.seq_len / step:.0f} | {torch_step / step:.2f}x "
              f"| {fwd:.2f} | {fwd_bwd:.2f} | {fwd_bwd / fwd:.2f} |")
    if peak:
        result["mfu"] = flops / best[("vflan_jax", "step")] / (peak * 1e12)
        print(f"vflan_jax MFU {100 * result['mfu']:.1f}%")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
