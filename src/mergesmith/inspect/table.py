"""The terminal summary: findings first, then one row per layer (and the whole model) with each
model's relative task-vector norm, each pair's cosine, the sign conflict and the kept share."""

from __future__ import annotations

from typing import Any


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def summary_lines(report: dict[str, Any]) -> list[str]:
    models = report["models"]
    k = len(models)
    lines = [f"base: {report['base']}"]
    lines += [f"  [{i + 1}] {name}" for i, name in enumerate(models)]
    if report["merged"]:
        lines.append(f"  merge: {report['merged']}")
    lines.append("findings:")
    lines += [f"  - {s}" for s in report["findings"]]
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    has_kept = report["overall"]["kept_mass"] is not None
    has_merge = report["overall"]["merged"] is not None
    head = ["layer"] + [f"norm[{i + 1}]" for i in range(k)] + [f"cos[{i + 1},{j + 1}]" for i, j in pairs]
    head += ["conflict"] + ([f"kept[{i + 1}]" for i in range(k)] if has_kept else [])
    head += [f"toward[{i + 1}]" for i in range(k)] if has_merge else []
    rows = []
    for label, g in [("all", report["overall"]), *[(str(x["index"]), x) for x in report["layers"]]]:
        row = [label] + [_f(n, ".4f") for n in g["norm"]]
        row += [_f(g["cosine"][i][j], "+.3f") for i, j in pairs]
        row.append(_f(g["sign_conflict"]["rate"], ".1%"))
        if has_kept:
            row += [_f(x, ".1%") for x in (g["kept_mass"] or {"kept": [None] * k})["kept"]]
        if has_merge:
            row += [_f(x, ".3f") for x in g["merged"]["toward"]]
        rows.append(row)
    widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]
    lines.append("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    lines.append(
        "norm: task-vector norm / base norm; cos: task-vector cosine; conflict: magnitude against the elected sign"
    )
    return lines
