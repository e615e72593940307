"""The paper's results table (Vision-Flan Table 2 columns) from report.json files, one row per checkpoint.

    python -m vflan_jax.eval table results/*/report.json [--out table.md]

A cell is a report's headline (MME: perception total; POPE: F1 averaged over splits, plus its
yes-ratio, the hallucination measure of the paper's Figure 7). A benchmark without a report for
that checkpoint is "missing", a report whose judge has not run is "pending"; neither is ever 0.
"""
from __future__ import annotations

import json
import os

from vflan_jax.eval.benchmark import BenchmarkError

# (column, benchmark, how to read the report)
COLUMNS = (("MM-Bench", "mmbench", "headline"), ("MME", "mme", "headline"), ("LLaVA-Bench", "llava_bench", "headline"),
           ("POPE", "pope", "headline"), ("POPE yes-ratio", "pope", "yes_ratio_avg"), ("MM-Vet", "mm_vet", "headline"),
           ("MMMU", "mmmu", "headline"), ("CF", "forgetting", "headline"))
MISSING, PENDING = "missing", "pending"


def read_report(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BenchmarkError(f"table: {path}: not a readable report.json ({e})") from None
    if not isinstance(report, dict) or "benchmark" not in report or "headline" not in report:
        raise BenchmarkError(f"table: {path}: not a report.json written by `eval run` or `eval score`")
    return report


def row_name(report: dict, path: str) -> str:
    """The checkpoint a report belongs to: run's model_id / checkpoint, or score's predictions file."""
    context = report.get("context", {})
    if context.get("model_id"):
        return context["model_id"]
    for key in ("checkpoint", "predictions"):
        if context.get(key):
            return os.path.splitext(os.path.basename(os.path.normpath(context[key])))[0]
    return os.path.basename(os.path.dirname(os.path.abspath(path)))


def collect(paths: list[str]) -> dict[str, dict[str, tuple[dict, str]]]:
    rows: dict[str, dict[str, tuple[dict, str]]] = {}
    for path in paths:
        report = read_report(path)
        name, bench = row_name(report, path), report["benchmark"]
        if bench in rows.setdefault(name, {}):
            raise BenchmarkError(f"table: two {bench} reports for {name}: {rows[name][bench][1]} and {path}; "
                                 "give one per checkpoint")
        rows[name][bench] = (report, path)
    return rows


def cell(reports: dict[str, tuple[dict, str]], bench: str, field: str) -> str:
    if bench not in reports:
        return MISSING
    report = reports[bench][0]
    value = report["headline"] if field == "headline" else report.get("metrics", {}).get(field)
    if value is None:
        return PENDING if report["headline"] is None else MISSING
    return f"{value:.1f}"


def cells(paths: list[str]) -> tuple[list[str], list[list[str]]]:
    rows = collect(paths)
    header = ["checkpoint"] + [c for c, _, _ in COLUMNS]
    return header, [[name] + [cell(reports, b, f) for _, b, f in COLUMNS] for name, reports in rows.items()]


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def table_png(header: list[str], body: list[list[str]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")                     # WHY: headless machines have no display
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(1.3 * len(header) + 1, 0.45 * len(body) + 1.0))
    ax.set_axis_off()
    drawn = ax.table(cellText=body, colLabels=header, loc="center", cellLoc="center")
    drawn.auto_set_font_size(False)
    drawn.set_fontsize(8)
    for (r, c), item in drawn.get_celld().items():
        if r > 0 and body[r - 1][c] in (MISSING, PENDING):
            item.get_text().set_color("#999999")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def write_table(paths: list[str], out: str | None = None) -> str:
    """The Markdown table; with out, also written there with a PNG beside it (same name, .png)."""
    header, body = cells(paths)
    text = markdown(header, body)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)
        table_png(header, body, os.path.splitext(out)[0] + ".png")
    return text
