"""Train-step time and peak memory of LoRA vs full fine-tuning, vflan_jax and transformers + peft, on the same
shapes and batch; times measured interleaved in one run (best of --repeats rounds), as benchmarks/train_step.py.

    python benchmarks/lora_train_step.py   # CPU: `small` preset, seq 1024, batch 4; rank 128, alpha 256, dropout 0.05

LoRA as in LLaVA-1.5's recipe: adapters on every attention and MLP projection of the LLM, the projector trained
in full, the tower and the base LLM frozen. Full: projector + LLM trained. Both: AdamW, clip 1.0, float32
(benchmarks/train_step.py builds the steps; peft.get_peft_model wraps the transformers model).

Memory, each system in a fresh subprocess (run side by side before the timing; memory does not depend on load):
  state      parameters + AdamW's two float32 moments per trainable parameter (counted from the arrays)
  peak RSS   the process' peak resident set (VmHWM) over building the model, compiling and three steps, above
             its resident set once jax, torch and transformers are imported: the same measure on both sides
             (it includes XLA's compile and allocator pools; glibc's mmap threshold is set to 64 KiB so that
             freed tensors leave the resident set)
  XLA plan   vflan_jax only: the compiled step's buffers (memory_analysis: arguments + outputs - aliased
             + temporaries), the device-memory figure that carries over to a GPU or TPU
Prints the machine load before and after, a table and one JSON line (for docs/PERFORMANCE.md).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from timing import interleaved_best
from train_step import jax_step_fns, make_batch, torch_step_fns

SYSTEMS = ("vflan_jax full", "vflan_jax LoRA", "vflan_jax LoRA, dropout 0", "transformers full",
           "transformers+peft LoRA")
FULL = {"vflan_jax LoRA": "vflan_jax full", "vflan_jax LoRA, dropout 0": "vflan_jax full",
        "transformers+peft LoRA": "transformers full"}   # LoRA -> its full run
THEIRS = {"vflan_jax full": "transformers full", "vflan_jax LoRA": "transformers+peft LoRA"}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MIB = 2 ** 20


def model_config(args):
    from vflan_jax.models.config import get_preset
    cfg = get_preset(args.preset)
    return cfg.replace(image_token_id=cfg.text.vocab_size - 1)  # HF needs an in-vocabulary image token


def lora_config(args, dropout: float):
    from vflan_jax.models.lora import LoraConfig
    return LoraConfig(args.rank, args.alpha, dropout)


def peft_wrapper(args, holder: dict):
    """transformers model -> peft LoRA on the LLM's projections, the projector trainable in full (as LLaVA's
    LoRA recipe sets it: requires_grad, no peft copy of it)."""
    def wrap(model):
        import peft
        config = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout,
                                 target_modules=rf".*language_model.*\.({'|'.join(PROJECTIONS)})")
        model = peft.get_peft_model(model, config)
        model.base_model.model.model.multi_modal_projector.requires_grad_(True)
        holder["model"] = model
        return model
    return wrap


def keep(holder: dict):
    def wrap(model):
        holder["model"] = model
        return model
    return wrap


def jax_state_bytes(cfg) -> tuple[int, int]:
    """(all parameter bytes, trainable parameter bytes) of the vflan_jax model, from shapes alone."""
    import numpy as np
    from flax import traverse_util

    from vflan_jax.parallel import abstract_params, strip_boxes
    from vflan_jax.train import optim
    params = strip_boxes(abstract_params(cfg))
    mask = optim.trainable_mask(params, ("projector", "llm"))
    flat = traverse_util.flatten_dict(params)
    size = {p: int(np.prod(x.shape)) * x.dtype.itemsize for p, x in flat.items()}
    return sum(size.values()), sum(v for p, v in size.items() if mask[p])


def build(name: str, args, batch):
    """-> (step callable, parameter bytes, trainable bytes, lowered step or None)."""
    cfg = model_config(args)
    if name.startswith("vflan_jax"):
        if "LoRA" in name:
            cfg = cfg.replace(**{"text.lora": lora_config(args, 0.0 if name.endswith("dropout 0") else args.dropout)})
        step = jax_step_fns(cfg, *batch, args.dtype)[0]
        return (step, *jax_state_bytes(cfg.replace(dtype=args.dtype)), step.lowered)
    holder = {}
    wrap = peft_wrapper(args, holder) if name.endswith("LoRA") else keep(holder)
    step = torch_step_fns(cfg, *batch, args.dtype, wrap_model=wrap)[0]
    params = list(holder["model"].parameters())
    def nbytes(ps):
        return sum(p.numel() * p.element_size() for p in ps)

    return step, nbytes(params), nbytes(p for p in params if p.requires_grad), None


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure_memory(name: str, args) -> dict:
    """Run in a subprocess (see the module docstring): one system built, compiled and stepped three times."""
    import jax  # noqa: F401  (imported before the baseline, as the libraries' own memory is no step's)
    import torch  # noqa: F401  (likewise)
    import transformers  # noqa: F401  (likewise)
    batch = make_batch(model_config(args), args.batch, args.seq_len)
    baseline = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")   # VmHWM := VmRSS
    step, param_bytes, trainable_bytes, lowered = build(name, args, batch)
    out = {"params_mib": param_bytes / MIB, "trainable_mib": trainable_bytes / MIB,
           "state_mib": (param_bytes + 2 * trainable_bytes) / MIB}
    if lowered is not None:
        m = lowered().compile().memory_analysis()
        out["xla_plan_mib"] = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                               + m.temp_size_in_bytes) / MIB
        out["xla_temp_mib"] = m.temp_size_in_bytes / MIB
    for _ in range(3):
        step()
    out["peak_rss_mib"] = (_status_kib("VmHWM") - baseline) / 1024
    return out


def memory_in_subprocesses(argv: list[str]) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 1024))
    procs = {name: subprocess.Popen([sys.executable, __file__, *argv, "--measure_memory", name], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in SYSTEMS}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"memory measurement of {name} failed:\n{stderr[-3000:]}")
        out[name] = json.loads(stdout.strip().splitlines()[-1])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seq_len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--alpha", type=float, default=256.0)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best time of each counts")
    ap.add_argument("--measure_memory", choices=SYSTEMS, help=argparse.SUPPRESS)   # the subprocess' job
    args = ap.parse_args()
    if args.measure_memory:
        print(json.dumps(measure_memory(args.measure_memory, args)))
        return
    memory = memory_in_subprocesses(sys.argv[1:])
    load_before = os.getloadavg()
    batch = make_batch(model_config(args), args.batch, args.seq_len)
    steps = {name: build(name, args, batch)[0] for name in SYSTEMS}
    best = interleaved_best(steps, args.repeats)
    load_after = os.getloadavg()

    import jax
    result = {"preset": args.preset, "seq_len": args.seq_len, "batch": args.batch, "dtype": args.dtype,
              "rank": args.rank, "alpha": args.alpha, "dropout": args.dropout, "repeats": args.repeats,
              "device": jax.devices()[0].device_kind, "cpus": os.cpu_count(),
              "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in load_after]}
    print("load average (1, 5, 15 min) before: %.2f %.2f %.2f, after: %.2f %.2f %.2f" % (*load_before, *load_after))
    print("| system | s/step | speed vs full | speed vs transformers | trainable MiB | state MiB | peak RSS MiB "
          "| XLA plan MiB |")
    print("|---|---|---|---|---|---|---|---|")
    def ratio(other, name):
        return f"{best[other] / best[name]:.2f}x" if other else "-"

    for name in SYSTEMS:
        m = memory[name]
        result[name] = {"s_per_step": best[name], **{k: round(v, 1) for k, v in m.items()}}
        plan = f"{m['xla_plan_mib']:.0f}" if "xla_plan_mib" in m else "-"
        print(f"| {name} | {best[name]:.2f} | {ratio(FULL.get(name), name)} | {ratio(THEIRS.get(name), name)} "
              f"| {m['trainable_mib']:.1f} | {m['state_mib']:.0f} | {m['peak_rss_mib']:.0f} | {plan} |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
