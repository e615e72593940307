"""report.json (everything), report.md (for people) and report.png (bar chart) of one Result."""
from __future__ import annotations

import os

from vflan_jax.eval.benchmark import Result
from vflan_jax.files import write_json


def _fmt(value) -> str:
    return "pending" if value is None else (f"{value:.2f}" if isinstance(value, float) else str(value))


def markdown(result: Result, context: dict) -> str:
    lines = [f"# {result.benchmark}", "",
             f"**{result.headline_name}: {_fmt(result.headline)}**", "",
             f"answered {result.n_answered} / {result.n_questions} questions", ""]
    lines += [f"- {k}: `{v}`" for k, v in context.items()]
    if result.bars:
        lines += ["", f"| | {result.bar_axis} |", "|---|---:|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in result.bars.items()]
    if result.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result.notes]
    if result.files:
        lines += ["", "## Files", ""] + [f"- {k}: `{v}`" for k, v in result.files.items()]
    return "\n".join(lines) + "\n"


def bar_chart(result: Result, path: str) -> list[float]:
    """Writes the chart; returns the y ticks drawn (for tests: none below 0 when no score is)."""
    import matplotlib
    matplotlib.use("Agg")                     # WHY: headless machines have no display
    import matplotlib.pyplot as plt
    labels, values = list(result.bars), [float(v) for v in result.bars.values()]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(labels) + 2), 4))
    if labels:
        ax.bar(range(len(labels)), values, color="#4C72B0")
        ax.set_xticks(range(len(labels)), labels, rotation=40, ha="right", fontsize=8)
        ax.set_ylabel(result.bar_axis)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
        # WHY: with every score 0 matplotlib centres the axis on 0 and draws negative ticks.
        top = max(values)
        ax.set_ylim(min(0.0, min(values)), top * 1.15 if top > 0 else 1.0)
    else:
        ax.text(0.5, 0.5, "scores pending" if result.headline is None else "no breakdown",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title(f"{result.benchmark} - {result.headline_name}: {_fmt(result.headline)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    low, high = ax.get_ylim()
    ticks = [float(t) for t in ax.get_yticks() if low <= t <= high] if labels else []
    plt.close(fig)
    return ticks


def write_report(result: Result, out_dir: str, context: dict | None = None) -> dict[str, str]:
    context = context or {}
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"report.{ext}") for ext in ("json", "md", "png")}
    write_json(paths["json"], {**result.to_json(), "context": context}, indent=1, sort_keys=False)
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(markdown(result, context))
    bar_chart(result, paths["png"])
    return paths
