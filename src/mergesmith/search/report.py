"""The end-of-search report: the best recipe's scores on the search tasks beside held-out ones.

A search fits its tasks' prompts; the held-out tasks (`--holdout`) say how much of that carries
over. Both sides are aggregated the same way (the genome's `fitness:`), and when there are as many
held-out tasks as search tasks they are paired in order (task i's held-out prompts), weighted alike.
"""

from __future__ import annotations

from typing import Any

from mergesmith.search.fitness import aggregate


def holdout_report(
    search: dict[str, float], held: dict[str, float], weights: list[float], how: str
) -> tuple[list[str], dict[str, Any]]:
    """Lines to print and the record for holdout.json (`fitness` of both sides and their gap)."""
    paired = len(held) == len(search)
    held_weights = weights if paired else [1.0] * len(held)
    fit_search = aggregate(list(search.values()), weights, how)
    fit_held = aggregate(list(held.values()), held_weights, how)
    lines = [
        "search tasks:  " + ", ".join(f"{k} {v:.6g}" for k, v in search.items()),
        "holdout tasks: " + ", ".join(f"{k} {v:.6g}" for k, v in held.items()),
    ]
    if paired:
        width = max(len(f"{a} / {b}") for a, b in zip(search, held, strict=True))
        lines.append(f"  {'task (search / held out)':{width}}  {'search':>10}  {'held out':>10}")
        for (a, va), (b, vb) in zip(search.items(), held.items(), strict=True):
            lines.append(f"  {f'{a} / {b}':{width}}  {va:10.4f}  {vb:10.4f}")
    lines.append(
        f"fitness ({how}): search {fit_search:.6g}, held out {fit_held:.6g} (gap {fit_search - fit_held:+.4g})"
    )
    record = {"fitness": {"aggregation": how, "search": fit_search, "holdout": fit_held}, "paired": paired}
    return lines, record
