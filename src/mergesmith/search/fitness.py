"""How the tasks' scores become one fitness: the aggregation the user chooses (`fitness:`).

The default, `mean_minus_std`, is the weighted mean of the task scores minus their weighted
standard deviation. A plain sum (mergekit-evolve's fitness, `weighted` here) lets the search buy a
large gain on the easy tasks with the collapse of another: on four tasks, scores (1, 1, 1, 0.03)
sum higher than (0.75, 0.75, 0.75, 0.75) would with any slack, while mean - std ranks them
0.34 < 0.75. Unlike `geometric` it accepts scores of any sign (a negative KL, a reward) and equals
the score itself for a single task; unlike `min` it still rewards progress on every task, not only
on the worst one, so the optimiser sees a slope everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from mergesmith.errors import MergeError

AGGREGATIONS = ("mean_minus_std", "mean", "geometric", "min", "weighted")
DEFAULT = "mean_minus_std"
GEOMETRIC_EPS = 1e-3  # keeps one zero score from hiding every other difference between candidates


def aggregate(scores: Sequence[float], weights: Sequence[float], how: str = DEFAULT) -> float:
    """The fitness of one candidate from its task scores (each maximised) and the tasks' weights.

    weighted: sum_i w_i s_i; mean: sum_i w_i s_i / sum_i w_i; mean_minus_std: mean - sqrt(sum_i w_i
    (s_i - mean)^2 / sum_i w_i); geometric: exp(sum_i w_i log(s_i + eps) / sum_i w_i) - eps, scores >= 0;
    min: min_i s_i (weights unused)."""
    if how == "weighted":
        return float(sum(w * s for w, s in zip(weights, scores, strict=True)))
    if how == "min":
        return float(min(scores))
    total = float(sum(weights))
    if total <= 0:
        raise MergeError(f"fitness '{how}' needs task weights with a positive sum, got {list(weights)}", "tasks")
    mean = sum(w * s for w, s in zip(weights, scores, strict=True)) / total
    if how == "mean":
        return float(mean)
    if how == "mean_minus_std":
        var = sum(w * (s - mean) ** 2 for w, s in zip(weights, scores, strict=True)) / total
        return float(mean - math.sqrt(max(var, 0.0)))
    if how == "geometric":
        if any(s < 0 for s in scores):
            raise MergeError(
                f"fitness 'geometric' needs scores >= 0, got {[round(s, 6) for s in scores]}"
                " (use mean_minus_std or mean for signed objectives)",
                "fitness",
            )
        logs = sum(w * math.log(s + GEOMETRIC_EPS) for w, s in zip(weights, scores, strict=True))
        return float(math.exp(logs / total) - GEOMETRIC_EPS)
    raise MergeError(f"unknown fitness '{how}' (known: {', '.join(AGGREGATIONS)})", "fitness")
