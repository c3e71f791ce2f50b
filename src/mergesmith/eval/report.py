"""Render an EvalReport: a rich table (model x task, mean, difference to the best input) and grouped bars."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.table import Table

from mergesmith.eval.runner import EvalReport
from mergesmith.extras import require


def _cell(score: float, stderr: float) -> str:
    return f"{score:.3f}" if math.isnan(stderr) else f"{score:.3f} ± {stderr:.3f}"


def table(report: EvalReport) -> Table:
    t = Table(title="mergesmith eval", show_lines=False)
    t.add_column("model", overflow="fold")
    for task in report.tasks:
        metric = report.primary(next(iter(report.models)), task)[0] if report.models else ""
        t.add_column(f"{task.name}\n{metric}", justify="right")
    t.add_column("mean", justify="right")
    t.add_column("Δ best input", justify="right")
    t.add_column("ex/s", justify="right")
    for name, entry in report.models.items():
        cells = [_cell(*report.primary(name, task)[1:]) for task in report.tasks]
        best = report.best_input(name)
        delta = f"{report.mean(name) - best[1]:+.3f}" if best else ("input" if entry.input_of else "")
        label = name + (f"\n[dim](input of {', '.join(entry.input_of)})[/dim]" if entry.input_of else "")
        t.add_row(label, *cells, f"{report.mean(name):.3f}", delta, f"{entry.examples_per_second:.1f}")
    return t


def write_json(report: EvalReport, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")


def plot(report: EvalReport, path: str | Path) -> None:
    """Grouped bars: one group per task (primary metric), one bar per model, stderr as error bars."""
    matplotlib = require("matplotlib", "mergesmith eval --plot", "--plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report.models)
    n_tasks = len(report.tasks)
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * n_tasks * max(len(names), 1) ** 0.5 + 2), 3.5))
    for k, name in enumerate(names):
        scores = [report.primary(name, t) for t in report.tasks]
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(n_tasks)]
        errs = [0.0 if math.isnan(s[2]) else s[2] for s in scores]
        ax.bar(xs, [s[1] for s in scores], width, yerr=errs, capsize=2, label=Path(name).name or name)
    ax.set_xticks(range(n_tasks))
    ax.set_xticklabels([f"{t.name}\n({report.primary(names[0], t)[0]})" for t in report.tasks] if names else [])
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
