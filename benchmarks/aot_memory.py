"""Per-chip memory of the recipes against chip count, measured by compiling (`python -m vflan_jax.aot`).

    python benchmarks/aot_memory.py --python /path/to/venv-with-libtpu/bin/python \
        --cells vflan_stage1.py:size=13b@8,vflan_stage1.py:size=13b@64 [--set model.attention_impl=blockwise]
    (a cell's config may carry its own flags: "vflan_stage1.py:size=13b --config.grad_accum_steps=2@8")

Each cell (config @ chips) is one aot run for a v5p slice (8 -> 2x2x2, 16 -> 2x2x4, 64 -> 4x4x4);
results accumulate in docs/aot_memory.json (a rerun replaces only the cells it measures), and
docs/aot_memory.md (the table) and docs/aot_memory.png (per-chip memory vs chips) are redrawn
from all of them. A cell never run is "not measured": nothing is extrapolated.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
V5P = {8: "v5p:2x2x2", 16: "v5p:2x2x4", 64: "v5p:4x4x4"}
GIB = 1024 ** 3
# Every shipped recipe at both sizes, with its defaults (attention "auto": splash on TPU).
DEFAULT_CONFIGS = tuple(f"{name}.py:size={size}" for name in ("vflan_stage1", "vflan_stage2", "llava15_pretrain",
                                                               "mixed_single_stage", "ablation_tasks")
                        for size in ("13b", "7b"))


def measure_cell(python: str, config: str, chips: int, overrides: list[str], timeout: int) -> dict:
    name, *extra = config.split()   # a cell's config may carry its own flags: "NAME.py:arg --config.x=1"
    cmd = [python, "-m", "vflan_jax.aot", "--config", f"configs/{name}", "--topology", V5P[chips], "--json",
           *[f"--config.{o}" for o in overrides], *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode not in (0, 1) or not proc.stdout.strip():
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    report = json.loads(proc.stdout)
    report["compile_wall_s"] = round(time.perf_counter() - start, 1)
    report["command"] = "python -m vflan_jax.aot " + " ".join(cmd[3:])
    return report


def _gib(value) -> str:
    return f"{value / GIB:.1f}" if value is not None else "-"


def table(results: dict, configs: list[str]) -> str:
    rows = ["| config | chips | attention | parameters | optimizer state | temporaries | peak | fits (HBM 95.74 GiB) |",
            "|---|---|---|---|---|---|---|---|"]
    for config in configs:
        for chips in V5P:
            r = results.get(f"{config}@{chips}")
            if r is None:
                rows.append(f"| {config} | {chips} | - | not measured | not measured | not measured | not measured | "
                            "not measured |")
                continue
            step = r.get("train_step", {})
            fits = (f"yes, {r['headroom']:.0%} headroom" if r.get("fits") else
                    f"no: needs {r['needs_gib']:.1f} GiB" if r.get("needs_gib") else "no")
            rows.append(f"| {config} | {chips} | {r.get('attention_impl', '-')} | {_gib(r['parameters'])} | "
                        f"{_gib(r['optimizer_state'])} | {_gib(step.get('temporaries'))} | {_gib(r.get('peak'))} | "
                        f"{fits} |")
    return ("\n".join(rows)
            + "\n\nGiB per chip; every cell measured by compiling for the v5p slice (docs/aot_memory.json).\n")


def plot(results: dict, configs: list[str], path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for config in configs:
        cells = [(c, results[f"{config}@{c}"]) for c in V5P if f"{config}@{c}" in results]
        if len(cells) < 2:  # a line against chip count needs two slices; single cells are in the table
            continue
        chips = [c for c, _ in cells]
        ax.plot(chips, [(r["parameters"] + r["optimizer_state"]) / GIB for _, r in cells], "o--",
                label=f"{config}: parameters + optimizer state")
        peaks = [(c, r["peak"] / GIB) for c, r in cells if r.get("peak")]
        if peaks:
            ax.plot(*zip(*peaks, strict=True), "s-", label=f"{config}: peak")
    ax.axhline(95.74, color="grey", lw=0.8)
    ax.text(8, 97, "v5p HBM 95.74 GiB", fontsize=8)
    ax.axhline(80 * 1e9 / GIB, color="grey", lw=0.8, ls=":")
    ax.text(8, 70, "80 GB GPU (74.5 GiB)", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(V5P), [str(c) for c in V5P])
    ax.set_xlabel("v5p chips")
    ax.set_ylabel("GiB per chip (compiled)")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("per-chip memory against chip count (compiled for v5p)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", default=sys.executable, help="an interpreter with libtpu installed")
    p.add_argument("--cells", default="", help="config@chips,... to measure (default: none, only redraw)")
    p.add_argument("--set", action="append", default=[], help="config override for every cell, e.g. "
                   "model.attention_impl=blockwise")
    p.add_argument("--add", action="append", default=[], help="config@chips=FILE: a report that "
                   "`python -m vflan_jax.aot --json` (with the --set overrides) already wrote")
    p.add_argument("--timeout", type=int, default=3600)
    args = p.parse_args()
    store = DOCS / "aot_memory.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    for cell in filter(None, args.cells.split(",")):
        config, _, chips = cell.rpartition("@")
        print(f"compiling {config} for {V5P[int(chips)]} ...", flush=True)
        results[cell] = measure_cell(args.python, config, int(chips), args.set, args.timeout)
        store.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    for item in args.add:
        cell, _, path = item.rpartition("=")
        config, _, chips = cell.rpartition("@")
        results[cell] = json.loads(pathlib.Path(path).read_text())
        name, *extra = config.split()
        results[cell]["command"] = " ".join(["python -m vflan_jax.aot --config", f"configs/{name}", "--topology",
                                             V5P[int(chips)], "--json", *(f"--config.{o}" for o in args.set), *extra])
    if args.add:
        store.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    configs = list(dict.fromkeys([*DEFAULT_CONFIGS, *(k.rpartition("@")[0] for k in results)]))
    (DOCS / "aot_memory.md").write_text(table(results, configs))
    plot(results, configs, DOCS / "aot_memory.png")
    print(table(results, configs))


if __name__ == "__main__":
    main()
