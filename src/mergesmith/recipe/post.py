"""Post-steps: edits of the merged task vector that apply after any task-vector method (`post:`).

One post-step today, LiNeS (layer-increasing network scaling, Wang et al. ICLR 2025): the merged
task vector of output layer l of L is scaled by alpha + beta * l / (L - 1), so shallow layers stay
near the base (general features) and deep layers keep the task-specific change; tensors outside
the layer stack (embeddings, final norm, head) get alpha, as in the paper's code.

Every task-vector method writes y = b + lambda * tau, so the scale multiplies each tensor's
resolved `lambda`: exact, and the merge keeps streaming and its compiled lanes. That is also why a
post-step needs a method with a `lambda` parameter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mergesmith.errors import MergeError, did_you_mean

POST_STEPS = ("lines",)


@dataclass(frozen=True)
class LiNeS:
    alpha: float
    beta: float

    def scale(self, layer: int | None, n_layers: int) -> float:
        """The factor on the merged task vector of output layer `layer` (None: not a layer tensor)."""
        if layer is None:
            return self.alpha
        return self.alpha + self.beta * (layer / (n_layers - 1) if n_layers > 1 else 1.0)


def parse_post(raw: Sequence[Any] | None, method: str, method_params: Mapping[str, Any]) -> list[LiNeS]:
    """The recipe's `post:` list, checked against the merge method, or a MergeError naming the key."""
    steps: list[LiNeS] = []
    for i, entry in enumerate(raw or []):
        where = f"post[{i}]"
        if not isinstance(entry, dict) or len(entry) != 1:
            raise MergeError("a post-step is a one-key mapping, e.g. {lines: {alpha: 0.5, beta: 0.5}}", where)
        ((name, body),) = entry.items()
        if name not in POST_STEPS:
            raise MergeError(f"unknown post-step '{name}'{did_you_mean(str(name), POST_STEPS)}", f"{where}.{name}")
        if "lambda" not in method_params:
            raise MergeError(
                f"'{name}' scales the merged task vector; {method} has none (use a task-vector method:"
                " task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, della, tsv, iso_c, iso_cts, ...)",
                f"{where}.{name}",
            )
        steps.append(_lines(body, f"{where}.{name}"))
    return steps


def _lines(body: Any, where: str) -> LiNeS:
    if not isinstance(body, dict):
        raise MergeError("lines takes {alpha: NUMBER, beta: NUMBER}", where)
    unknown = set(body) - {"alpha", "beta"}
    if unknown:
        raise MergeError(f"unknown key(s) {sorted(unknown)}; lines takes alpha and beta", where)
    values = {}
    for key in ("alpha", "beta"):
        value = body.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise MergeError(f"lines needs a number for '{key}', got {value!r}", f"{where}.{key}")
        values[key] = float(value)
    return LiNeS(values["alpha"], values["beta"])
