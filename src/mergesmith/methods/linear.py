from __future__ import annotations

import torch

from mergesmith.methods.registry import REQUIRED, PerModel, merge_method


@merge_method(
    "linear",
    base="input",
    summary="Weighted average of the models.",
    paper="https://arxiv.org/abs/2203.05482",
    pretty="Linear",
)
def linear(xs: list[torch.Tensor], base: None, *, weight: PerModel = REQUIRED, normalize: bool = True) -> torch.Tensor:
    """y = sum_i w_i x_i, divided by sum_i w_i when `normalize` (a zero sum is an error)."""
    out = xs[0].mul_(weight[0])
    for x, w in zip(xs[1:], weight[1:], strict=True):
        out.add_(x, alpha=w)
    if normalize:
        total = sum(weight)
        if total == 0:
            raise ValueError("linear: the weights sum to zero; set normalize: false or change the weights")
        out.div_(total)
    return out
