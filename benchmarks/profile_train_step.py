"""Where the train step's time goes on CPU: a jax.profiler trace of one step, per-op table.

    python benchmarks/profile_train_step.py                 # small preset, seq 1024, batch 4, float32
    python benchmarks/profile_train_step.py --before        # the pre-issue-13 path (XLA attention, full logits)

XLA:CPU emits one trace event per executed HLO op when --xla_cpu_enable_xprof_traceme=true; the
events of one step are summed per part of the model, read from each op's metadata in the compiled
HLO (the Flax module path and the named scopes "attention_core" and "lm_head_cross_entropy"),
and printed as a table with the whole step's wall time. The raw trace stays in --trace_dir (TensorBoard /
xprof can open it).
"""
from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

# Imports after XLA_FLAGS on purpose: the flag must be set before jax starts its CPU backend.
import argparse  # noqa: E402
import collections  # noqa: E402
import glob  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
from train_step import BEFORE, jax_step_fns, make_batch  # noqa: E402

# First match wins: (part, substring of the op's metadata op_name).
PARTS = (("lm_head + cross-entropy", "lm_head_cross_entropy"), ("lm_head + cross-entropy", "lm_head"),
         ("attention core (scores, softmax, mask)", "attention_core"),
         ("attention projections + RoPE", "self_attn"), ("MLP", "/mlp/"), ("vision tower (frozen)", "vision_tower"),
         ("projector", "multi_modal_projector"), ("RMSNorm", "layernorm"), ("RMSNorm", "/norm/"),
         ("embedding", "embed_tokens"))
_OP = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"")


def op_parts(hlo_text: str) -> dict[str, str]:
    """HLO op name -> model part, from the compiled module's metadata."""
    parts = {}
    for line in hlo_text.splitlines():
        m = _OP.match(line)
        if m:
            parts[m.group(1)] = next((part for part, key in PARTS if key in m.group(2)), "optimizer, clip, other")
    return parts


def op_table(trace_dir: str) -> tuple[collections.Counter, collections.Counter]:
    """Total microseconds and counts per HLO op name over every thread of the trace."""
    total, count = collections.Counter(), collections.Counter()
    for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
        for plane in jax.profiler.ProfileData.from_file(path).planes:
            for line in plane.lines:
                for event in line.events:
                    total[event.name] += event.duration_ns / 1e3
                    count[event.name] += 1
    return total, count


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seq_len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--before", action="store_true", help="profile the pre-issue-13 path")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--trace_dir", default=None)
    ap.add_argument("--from_trace", action="store_true",
                    help="re-read the trace already in --trace_dir (same code and flags) instead of running a step")
    args = ap.parse_args()

    from vflan_jax.models.config import get_preset
    cfg = get_preset(args.preset)
    cfg = cfg.replace(image_token_id=cfg.text.vocab_size - 1, **(BEFORE if args.before else {}))
    step, _, _ = jax_step_fns(cfg, *make_batch(cfg, args.batch, args.seq_len), "float32")
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="vflan_profile_")
    wall = float("nan")
    if not args.from_trace:
        step()  # compile
        with jax.profiler.trace(trace_dir):
            t0 = time.perf_counter()
            step()
            wall = time.perf_counter() - t0
    total, count = op_table(trace_dir)
    parts = op_parts(step.compiled_hlo())
    # Loops (the layer scan, the loss chunks) are events too and contain their body's events.
    ops = {name: us for name, us in total.items() if name in parts and not name.startswith(("while", "call"))}
    print(f"one step: {wall:.2f} s wall; load average {os.getloadavg()[0]:.2f}; trace in {trace_dir}")
    by_part = collections.Counter()
    for name, us in ops.items():
        by_part[parts[name]] += us
    everything = sum(by_part.values())
    print("| part | ms (op time summed over threads) | share |")
    print("|---|---|---|")
    for part, us in by_part.most_common():
        print(f"| {part} | {us / 1e3:.0f} | {100 * us / everything:.0f}% |")
    print("| largest HLO ops | ms | calls | part |")
    print("|---|---|---|---|")
    for name, us in sorted(ops.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"| {name} | {us / 1e3:.0f} | {count[name]} | {parts[name]} |")


if __name__ == "__main__":
    main()
