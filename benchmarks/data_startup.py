"""Data start-up at release scale: annotation JSON vs prepared ArrayRecord shards, side by side.

  python benchmarks/data_startup.py --sample_dir ../shared/data/vision_flan_sample --work /tmp/data_startup \
      [--sizes 10000,100000,1664261] [--before HEAD] [--workers 8]

Records are the real sample's 100 records repeated with unique ids (a 1,664,261-record file is
1.04 GB, like the release's 983 MB); the prepared copies use `--images reference`, so no image
is copied. Every measurement runs in a fresh process, one at a time, with the stage-1 data
settings (vicuna_v1, max_length 2048, best-fit packing, 576 tokens per image at 336 px, B=16):
  start-up  seconds from `build_train_pipeline` called to returned (reading, indexing, mixture)
            and to the first batch; resident memory: peak RSS above the process's RSS after
            imports + tokenizer, and the peak itself
  json.load LLaVA's approach on the same file (json.load, nothing else), for comparison
  before    the JSON path of the code at --before (a git revision, extracted with git archive)
  workers   the whole pipeline with --workers spawned decode processes: RSS and PSS summed over
            the main process and its workers after 3 batches (PSS counts shared pages once)
  per core  decode-to-batch examples per CPU second, one process, one read thread
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child would report its parent's peak.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def process_tree(pid: int) -> list[int]:
    out = [pid]
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in f.read().split():
                out += process_tree(int(child))
    return out


def smaps(pid: int) -> dict[str, int]:
    """kB per field of /proc/PID/smaps_rollup (Rss, Pss, ...)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return {k.rstrip(":"): int(v) for k, v, *_ in (line.split() for line in f) if k.endswith(":")}


# ----------------------------------------------------------------------------- child process

def data_config(kind: str, path: str, image_folder: str, workers: int):
    from vflan_jax.data import pipeline
    c = pipeline.default_data_config()
    c.sources.vflan = (pipeline.prepared_source_config(path) if kind == "prepared"
                       else pipeline.source_config(path, image_folder, format="llava"))
    c.max_length, c.num_workers, c.read_threads, c.prefetch, c.num_epochs = 2048, workers, 1, 0, 1
    return c


def child(args) -> dict:
    if args.code:
        sys.path.insert(0, args.code)
    else:
        sys.path.insert(0, REPO)
    from absl import flags
    flags.FLAGS(sys.argv[:1])
    if args.kind == "json.load":
        base = rss_mb()
        t, cpu = time.perf_counter(), time.process_time()
        with open(args.path) as f:
            records = json.load(f)
        return {"build_s": time.perf_counter() - t, "build_cpu_s": time.process_time() - cpu, "rss_base_mb": base,
                "peak_mb": peak_mb(), "n": len(records)}
    from transformers import AutoTokenizer

    from vflan_jax.data import pipeline
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    c = data_config(args.kind, args.path, args.image_folder, args.workers)
    base = rss_mb()
    t0, cpu = time.perf_counter(), time.process_time()
    ds, info = pipeline.build_train_pipeline(c, tok, image_token_id=32000, tokens_per_image=576, image_size=336,
                                             per_host_batch_size=16, process_index=0, process_count=1)
    build_s, build_cpu_s = time.perf_counter() - t0, time.process_time() - cpu
    import vflan_jax
    out = {"build_s": build_s, "build_cpu_s": build_cpu_s, "rss_base_mb": base, "peak_build_mb": peak_mb(),
           "code": vflan_jax.__path__[0],
           "n": sum(sum(v["selected"] for v in s.values()) for s in info.counts.values())}
    it = iter(ds)
    next(it)
    out["first_batch_s"] = time.perf_counter() - t0
    if args.workers:
        for _ in range(2):
            next(it)
        procs = process_tree(os.getpid())
        out["tree_rss_mb"] = sum(smaps(p)["Rss"] for p in procs) / 1024
        out["tree_pss_mb"] = sum(smaps(p)["Pss"] for p in procs) / 1024
        out["processes"] = len(procs)
    if args.throughput:
        cpu, examples = time.process_time(), 0
        for _ in range(args.throughput):
            examples += int((next(it)["meta_record_ids"] != "").sum())
        out["examples_per_cpu_s"] = examples / (time.process_time() - cpu)
        out["examples"] = examples
    out["peak_mb"] = peak_mb()
    return out


# ----------------------------------------------------------------------------- driver

def write_records(sample: str, n: int, path: str) -> None:
    """The sample's records, repeated with unique ids, as one JSON list (written as a stream)."""
    with open(os.path.join(sample, "llava_format.json")) as f:
        recs = json.load(f)
    with open(path + ".tmp", "w") as f:
        f.write("[")
        for i in range(n):
            r = dict(recs[i % len(recs)], id=f"{recs[i % len(recs)]['id']}-{i}")
            f.write((",\n" if i else "") + json.dumps(r))
        f.write("]")
    os.replace(path + ".tmp", path)


def run_child(args, kind, path, *, code=None, workers=0, throughput=0) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--path", path, "--tokenizer", args.tokenizer,
           "--image_folder", os.path.join(args.sample_dir, "images"), "--workers", str(workers),
           "--throughput", str(throughput)] + (["--code", code] if code else [])
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{kind} {path} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sample_dir")
    p.add_argument("--work", default="/tmp/data_startup")
    p.add_argument("--sizes", default="10000,100000,1664261")
    p.add_argument("--before", help="git revision whose JSON path is measured too (e.g. HEAD)")
    p.add_argument("--workers", type=int, default=8, help="decode workers for the whole-pipeline memory (0 = skip)")
    p.add_argument("--throughput_batches", type=int, default=15)
    p.add_argument("--parts", default="startup,workers,throughput", help="which measurements to run")
    p.add_argument("--child"), p.add_argument("--path"), p.add_argument("--tokenizer"), p.add_argument("--code")
    p.add_argument("--image_folder"), p.add_argument("--throughput", type=int, default=0)
    args = p.parse_args()
    if args.child:
        args.kind = args.child
        args.workers = args.workers if args.workers else 0
        print(json.dumps(child(args)))
        return
    args.parts = set(args.parts.split(","))
    sys.path.insert(0, REPO)
    from vflan_jax.data import prepare, synthetic
    os.makedirs(args.work, exist_ok=True)
    args.sample_dir = os.path.abspath(args.sample_dir)
    args.tokenizer = os.path.join(args.work, "tokenizer")
    if not os.path.isdir(args.tokenizer):
        with open(os.path.join(args.sample_dir, "llava_format.json")) as f:
            texts = [t["value"] for r in json.load(f) for t in r["conversations"]]
        synthetic.build_tokenizer(args.tokenizer, texts)
    code = None
    if args.before:
        code = os.path.join(args.work, f"code-{args.before}")
        if not os.path.isdir(code):
            os.makedirs(code)
            archive = subprocess.run(["git", "-C", REPO, "archive", args.before, "vflan_jax"], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", code], input=archive, check=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for n in sizes:
        data, prep = os.path.join(args.work, f"vf_{n}.json"), os.path.join(args.work, f"prep_{n}")
        if not os.path.exists(data):
            write_records(args.sample_dir, n, data)
        prep_s = None
        if not os.path.exists(os.path.join(prep, "index.array_record")):
            t = time.perf_counter()
            prepare.prepare([data], os.path.join(args.sample_dir, "images"), prep, format="llava",
                            workers=2, images="reference", progress=False)
            prep_s = time.perf_counter() - t
        if "startup" not in args.parts:
            continue
        row = {"n": n, "mb": os.path.getsize(data) / 2**20, "prepare_s": prep_s,
               "json.load": run_child(args, "json.load", data), "json": run_child(args, "json", data),
               "prepared": run_child(args, "prepared", prep)}
        if code:
            row["before"] = run_child(args, "json", data, code=code)
        rows.append(row)
        print(json.dumps(row), flush=True)
    big = sizes[-1]
    workers = {}
    if args.workers and "workers" in args.parts:
        for kind, path in (("prepared", f"prep_{big}"), ("json", f"vf_{big}.json")):
            workers[kind] = run_child(args, kind, os.path.join(args.work, path), workers=args.workers)
            print(json.dumps({"workers": args.workers, kind: workers[kind]}), flush=True)
    speed = {}
    if "throughput" in args.parts:   # 2,000 records, also prepared with the images embedded (320 MB)
        n = 2000
        data, embed = os.path.join(args.work, f"vf_{n}.json"), os.path.join(args.work, f"prep_embed_{n}")
        if not os.path.exists(data):
            write_records(args.sample_dir, n, data)
        for path, mode in ((embed, "embed"), (os.path.join(args.work, f"prep_{n}"), "reference")):
            if not os.path.exists(os.path.join(path, "index.array_record")):
                prepare.prepare([data], os.path.join(args.sample_dir, "images"), path, format="llava", workers=2,
                                images=mode, progress=False)
        variants = (("json", data), ("prepared", os.path.join(args.work, f"prep_{n}")), ("prepared", embed))
        for _ in range(2):   # interleaved, best of two: the machine is shared
            for kind, path in variants:
                m = run_child(args, kind, path, throughput=args.throughput_batches)
                name = kind if path != embed else "prepared (embed)"
                if name not in speed or m["examples_per_cpu_s"] > speed[name]["examples_per_cpu_s"]:
                    speed[name] = m
    print(json.dumps({"throughput": speed}), flush=True)
    report(rows, workers, speed, args)


def report(rows, workers, speed, args):
    if not rows:
        rows = [{}]
    print("\nstart-up: build_train_pipeline wall s (CPU s) / to first batch s, peak RSS above imports MiB")
    cols = ["json.load", "before", "json", "prepared"]
    cols = [c for c in cols if c in rows[0]]
    print("| records | file MB | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for r in rows if "n" in rows[0] else []:
        cells = []
        for c in cols:
            m = r[c]
            first = f" / {m['first_batch_s']:.1f}" if "first_batch_s" in m else ""
            cells.append(f"{m['build_s']:.2f} s ({m['build_cpu_s']:.2f} s CPU){first}, "
                         f"{m.get('peak_build_mb', m['peak_mb']) - m['rss_base_mb']:.0f} MiB")
        print(f"| {r['n']:,} | {r['mb']:.0f} | " + " | ".join(cells) + " |")
    for kind, m in workers.items():
        print(f"{kind}, {args.workers} workers, {m['processes']} processes: first batch {m['first_batch_s']:.1f} s, "
              f"RSS sum {m['tree_rss_mb'] / 1024:.2f} GiB, PSS sum {m['tree_pss_mb'] / 1024:.2f} GiB")
    for kind, m in speed.items():
        print(f"{kind}: {m['examples_per_cpu_s']:.1f} examples per CPU second ({m['examples']} examples)")


if __name__ == "__main__":
    main()
