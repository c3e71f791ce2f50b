"""ram, ramplus_tl: average task vectors only where several models change a weight; keep unique changes."""

from __future__ import annotations

from mergesmith.lazy_torch import torch
from mergesmith.methods.registry import merge_method

RAM_PAPER = "https://arxiv.org/abs/2601.13572"


def _active(xs: list[torch.Tensor], base: torch.Tensor, epsilon: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Task vectors zeroed where |tau| <= epsilon, and the count of active models per element."""
    deltas = [x.sub_(base) for x in xs]
    count = torch.zeros_like(base)
    for d in deltas:
        active = d.abs() > epsilon
        d.mul_(active)
        count.add_(active)
    return deltas, count


@merge_method(
    "ram",
    base="required",
    summary="RAM: mean of the task vectors that change each weight; a change made by one model is kept whole.",
    paper=RAM_PAPER,
    pretty="Reinforced Agent Merging",
)
def ram(xs: list[torch.Tensor], base: torch.Tensor, *, epsilon: float = 1e-5) -> torch.Tensor:
    """a_i = |tau_i| > epsilon, c = sum_i a_i; y = b + sum_i a_i tau_i / max(c, 1)."""
    if not xs:
        return base
    deltas, count = _active(xs, base, epsilon)
    merged = deltas[0]
    for d in deltas[1:]:
        merged.add_(d)
    return base.add_(merged.div_(count.clamp_min_(1)))


@merge_method(
    "ramplus_tl",
    base="required",
    summary="RAM+ (tensor-local): RAM with each model's unique changes amplified by its share of overlap.",
    paper=RAM_PAPER,
    pretty="Reinforced Agent Merging Plus (Tensor-Local)",
)
def ramplus_tl(
    xs: list[torch.Tensor], base: torch.Tensor, *, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5
) -> torch.Tensor:
    """As ram, but where only model i is active its tau_i is scaled by 1 + r clamp(rho_i, 0, alpha),
    rho_i = #(a_i and c > 1) / max(#(a_i and c = 1), epsilon), counted over the tensor."""
    if not xs:
        return base
    deltas, count = _active(xs, base, epsilon)
    unique = count == 1
    shared = count > 1
    shared_share = shared / count.clamp_min(1)  # 1/c where c > 1, else 0
    merged = torch.zeros_like(base)
    for d in deltas:
        active = d != 0
        rho = int((active & shared).sum()) / max(int((active & unique).sum()), epsilon)
        boost = 1 + r * min(max(rho, 0.0), alpha)
        merged.addcmul_(d, unique.to(d.dtype).mul_(boost).add_(shared_share))
    return base.add_(merged)
