"""CLI: `python -m vflan_jax.eval run ...` (generate + score + report), `... score ...` (score a file),
`... table ...` (one row per checkpoint from report.json files).

    python -m vflan_jax.eval run --benchmark mme --checkpoint ckpt/ --data_dir data/MME --out results/mme \\
        [--batch_size 16] [--limit N] [--max_new_tokens N] [--judge_config judge.json]
    python -m vflan_jax.eval score --benchmark pope --predictions answers.jsonl --annotations data/pope [--json]
    python -m vflan_jax.eval table results/*/report.json [--out table.md]

Exit status as every vflan_jax command (vflan_jax/cli.py): 0 ok, 1 failure (e.g. the judge
unreachable), 2 bad input, one line naming it, before any model is loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from vflan_jax.cli import EXIT_BAD_INPUT, EXIT_FAILURE, is_url, resolve_path
from vflan_jax.data.conversation import TEMPLATES
from vflan_jax.data.image import ASPECTS
from vflan_jax.data.tfds_source import TFDSUnavailable
from vflan_jax.eval.benchmark import BenchmarkError
from vflan_jax.eval.jsonl import read_jsonl
from vflan_jax.eval.judge import JudgeError, make_judge
from vflan_jax.eval.registry import BENCHMARKS, get_benchmark
from vflan_jax.eval.report import write_report

ANSWERS = "answers.jsonl"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vflan_jax.eval", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="answer a benchmark with a checkpoint, score it, write a report")
    run.add_argument("--benchmark", required=True, help=", ".join(BENCHMARKS))
    run.add_argument("--checkpoint", required=True, help="vflan_jax model checkpoint or transformers LLaVA dir")
    run.add_argument("--data_dir", required=True, help="the benchmark's files (docs/EVALUATION.md)")
    run.add_argument("--out", required=True, help="results folder (answers.jsonl, report.*, official files)")
    run.add_argument("--batch_size", type=int, default=16)
    run.add_argument("--limit", type=int, default=None, help="only the first N questions")
    run.add_argument("--max_new_tokens", type=int, default=None, help="default: LLaVA's (128 or 1024)")
    run.add_argument("--judge_config", default=None, help="JSON: base_url, model[, temperature, api_key_env]")
    run.add_argument("--image_aspect", default="pad", choices=ASPECTS, help="pad: LLaVA-1.5's")
    run.add_argument("--conv_template", default="vicuna_v1", choices=sorted(TEMPLATES))
    run.add_argument("--dtype", default=None, help="cast parameters on load, e.g. bfloat16")
    run.add_argument("--model_id", default=None, help="model_id in the answer file (default: checkpoint name)")
    score = sub.add_parser("score", help="score an existing predictions file (ours or LLaVA's)")
    score.add_argument("--benchmark", required=True, help=", ".join(BENCHMARKS))
    score.add_argument("--predictions", required=True,
                       help="LLaVA answer JSONL; MME: also an eval_tool results folder; MM-Vet: also results JSON; "
                            "MMMU: also MMMU's output folder (<Subject>/output.json)")
    score.add_argument("--annotations", default=None,
                       help="the benchmark's data folder (as run's --data_dir); not needed for an official folder")
    score.add_argument("--judge_config", default=None)
    score.add_argument("--out", default=None,
                       help="where official files/reports go (default: <predictions dir>/<benchmark>_score/<name>)")
    score.add_argument("--json", action="store_true", help="print the result as JSON")
    table = sub.add_parser("table", help="the paper's Table 2 columns, one row per checkpoint (Markdown + PNG)")
    table.add_argument("reports", nargs="+", help="report.json files written by run/score")
    table.add_argument("--out", default=None, help="table.md (and table.png beside it); default: print only")
    return p


def _resolve_paths(args) -> None:
    for name in ("checkpoint", "data_dir", "out", "judge_config", "predictions", "annotations"):
        if getattr(args, name, None) is not None:
            setattr(args, name, resolve_path(getattr(args, name)))
    if getattr(args, "reports", None):
        args.reports = [resolve_path(r) for r in args.reports]


def _check_checkpoint(path: str) -> None:
    if not is_url(path) and not os.path.isdir(path):
        raise BenchmarkError(f"checkpoint {path} not found (a vflan_jax model folder or a transformers LLaVA dir)")


def _generate_fn(args, max_new_tokens: int):
    from vflan_jax.inference.generator import GenerationConfig, Generator
    generator = Generator.from_checkpoint(args.checkpoint, batch_size=args.batch_size, dtype=args.dtype,
                                          image_aspect=args.image_aspect, conv_template=args.conv_template)
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0)     # greedy, docs/REFERENCE.md §5.0

    def generate(prompts, images):
        return [r.text for r in generator.generate(prompts, images, config)]
    return generate


def cmd_run(args) -> int:
    from vflan_jax.eval.runner import pending, run_questions
    bench = get_benchmark(args.benchmark)
    # Everything run and score will read is checked here, before a model is loaded.
    questions = bench.load_questions(args.data_dir)
    if hasattr(bench, "validate"):
        bench.validate(args.data_dir, questions)
    if args.limit is not None:
        questions = questions[:args.limit]
    judge = make_judge(args.judge_config)
    _check_checkpoint(args.checkpoint)
    max_new_tokens = args.max_new_tokens or bench.MAX_NEW_TOKENS
    model_id = args.model_id or os.path.basename(os.path.normpath(args.checkpoint))
    os.makedirs(args.out, exist_ok=True)
    answer_file = os.path.join(args.out, ANSWERS)
    todo = pending(questions, answer_file)
    print(f"{bench.NAME}: {len(questions)} questions, {len(questions) - len(todo)} already answered in {answer_file}")
    generate = _generate_fn(args, max_new_tokens) if todo else None
    answers = run_questions(questions, answer_file, generate, batch_size=args.batch_size, model_id=model_id,
                            desc=bench.NAME)
    result = bench.evaluate(answers, args.data_dir, args.out, judge)
    context = {"checkpoint": args.checkpoint, "data_dir": args.data_dir, "answers": answer_file,
               "max_new_tokens": max_new_tokens, "limit": args.limit, "model_id": model_id}
    paths = write_report(result, args.out, context)
    print(f"{bench.NAME}: {result.headline_name} = {result.headline if result.headline is not None else 'pending'}")
    for note in result.notes:
        print(f"  note: {note}")
    print(f"report: {paths['md']}")
    return 0


def read_predictions(bench, path: str):
    if os.path.isdir(path) and hasattr(bench, "score_result_dir"):
        return None                                  # the official tool's output folder: scored as is
    if not os.path.isfile(path):
        raise BenchmarkError(f"{bench.NAME}: predictions file {path} not found")
    if bench.NAME == "mm_vet":
        return bench.read_predictions(path)
    return read_jsonl(path, "LLaVA answer file")


def cmd_score(args) -> int:
    bench = get_benchmark(args.benchmark)
    # WHY one folder per predictions file by default: two models' reports never overwrite each other.
    stem = os.path.splitext(os.path.basename(os.path.normpath(args.predictions)))[0]
    out = args.out or os.path.join(os.path.dirname(args.predictions), f"{bench.NAME}_score", stem)
    answers = read_predictions(bench, args.predictions)
    if answers is None:
        result = bench.score_result_dir(args.predictions)
    elif args.annotations is None:
        raise BenchmarkError(f"{bench.NAME}: scoring {args.predictions} needs --annotations "
                             "(the benchmark's data folder)")
    else:
        result = bench.evaluate(answers, args.annotations, out, make_judge(args.judge_config))
    context = {"predictions": args.predictions, "annotations": args.annotations}
    paths = write_report(result, out, context)
    if args.json:
        print(json.dumps({**result.to_json(), "report": paths}, indent=1))
    else:
        with open(paths["md"], encoding="utf-8") as f:
            print(f.read())
    return 0


def cmd_table(args) -> int:
    from vflan_jax.eval.table import write_table
    print(write_table(args.reports, args.out), end="")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    _resolve_paths(args)
    commands = {"run": cmd_run, "score": cmd_score, "table": cmd_table}
    try:
        return commands[args.command](args)
    except (BenchmarkError, TFDSUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except JudgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
