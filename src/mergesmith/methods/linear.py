from __future__ import annotations

from mergesmith import kernels
from mergesmith.lazy_torch import torch
from mergesmith.methods.registry import REQUIRED, PerModel, fused_variant, merge_method


@merge_method(
    "linear",
    base="input",
    summary="Weighted average of the models.",
    paper="https://arxiv.org/abs/2203.05482",
    pretty="Linear",
    elementwise=True,
)
def linear(xs: list[torch.Tensor], base: None, *, weight: PerModel = REQUIRED, normalize: bool = True) -> torch.Tensor:
    """y = sum_i w_i x_i, divided by sum_i w_i when `normalize` (a zero sum is an error)."""
    out = xs[0].mul_(weight[0])
    for x, w in zip(xs[1:], weight[1:], strict=True):
        out.add_(x, alpha=w)
    divisor = _divisor(weight, normalize)
    if divisor is not None:
        out.div_(divisor)
    return out


@fused_variant("linear")
def linear_fused(
    out: kernels.Raw, xs: list[kernels.Raw], base: None, *, weight: PerModel = REQUIRED, normalize: bool = True
) -> None:
    """The same sum in one pass over the files' values (`kernels.linear`: torch's operations, bit for bit)."""
    kernels.linear(out, xs, weight, _divisor(weight, normalize))


def _divisor(weight: list[float], normalize: bool) -> float | None:
    if not normalize:
        return None
    total = sum(weight)
    if total == 0:
        raise ValueError("linear: the weights sum to zero; set normalize: false or change the weights")
    return total
