"""Experts of a mixture of experts, as the output tensors of `mergesmith moe`'s plan.

An MoE output tensor is one expert's dense MLP weight (Mixtral's `experts.{i}.w1`) or several of
them joined: GraniteMoE stacks every expert's [gate; up] rows in one tensor, Qwen-MoE's shared
expert concatenates several experts' MLPs. Stacking along a new first axis lays out the same bytes
as joining rows, so one join along `dim` covers every family. Each part may take mergekit-moe's
`noise_scale` (Gaussian noise, to break the symmetry of identical experts) and `residual_scale`
(the down projection scaled). Internal: only MoE planning knows which blocks make an output.
"""

from __future__ import annotations

from mergesmith.lazy_torch import torch
from mergesmith.methods.registry import PerModel, merge_method
from mergesmith.rng import TensorRNG


def _one_plain_part(params: dict) -> bool:
    return len(params["noise_scale"]) == 1 and not params["noise_scale"][0]


@merge_method(
    "moe_experts",
    base="input",
    summary="Experts' MLP tensors, each with its noise and residual scale, joined along `dim` (mergesmith moe).",
    pretty="MoE experts",
    internal=True,
    joins=True,
    elementwise=_one_plain_part,  # noise is drawn whole; a join's inputs are not aligned with its output
)
def moe_experts(
    xs: list[torch.Tensor],
    base: None,
    *,
    noise_scale: PerModel = 0.0,
    residual_scale: PerModel = 1.0,
    dim: int = 0,
    rng: TensorRNG,
) -> torch.Tensor:
    """x_i + noise_scale_i * z_i (z_i standard normal, drawn from input i's stream at the part's
    offset, so parts of one model differ), times residual_scale_i; the parts joined along `dim`."""
    offset = 0
    for i, x in enumerate(xs):
        if noise_scale[i]:
            x.add_(rng.normal(x.shape, i, x.device, start=offset).mul_(noise_scale[i]))
        if residual_scale[i] != 1.0:
            x.mul_(residual_scale[i])
        offset += x.numel()
    return xs[0] if len(xs) == 1 else torch.cat(xs, dim=dim)
