"""sce: select high-variance elements, weight task vectors by their energy, erase minority signs.

Without selection (`select_topk` 1) it streams in row chunks: the energies (mean squares of the
task vectors, the diagonal of their Gram matrix) are observed first, the rest is element-wise (in the
raw lane one compiled pass over the files' values, `kernels_gram.sce`).
Selecting by variance needs a threshold over the whole tensor before the energies, so that case
takes whole tensors."""

from __future__ import annotations

import numpy as np

from mergesmith import kernels, kernels_gram
from mergesmith.lazy_torch import torch
from mergesmith.methods.gram import Gram, WholeTensors
from mergesmith.methods.registry import merge_method
from mergesmith.methods.sparsify import top_k_mask
from mergesmith.methods.stream import Stream
from mergesmith.methods.task_arithmetic import STORAGE_ONLY
from mergesmith.methods.task_vectors import sign_consensus


def variance_mask(deltas: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """Mask of the floor(fraction * count_nonzero(var)) positions whose deltas vary most across models."""
    mean = torch.zeros_like(deltas[0])
    for d in deltas:
        mean.add_(d)
    mean.div_(len(deltas))
    var = torch.zeros_like(mean)
    for d in deltas:
        var.add_((d - mean).square_())
    var.div_(len(deltas))
    k = int(int(torch.count_nonzero(var)) * fraction)
    return top_k_mask(var, k)


def _weights(squares: np.ndarray, numel: int) -> list[float]:
    """omega_i = mean(tau_i^2) / sum_j mean(tau_j^2) from the task vectors' Gram matrix `squares` over
    `numel` values (equal weights where the energies are all but zero)."""
    energy = [float(squares[i, i]) / numel for i in range(len(squares))]
    total = sum(energy)
    return [1.0 / len(energy)] * len(energy) if total < 1e-6 else [e / total for e in energy]


@merge_method(
    "sce",
    base="required",
    models=(0, None),  # only the base (a base+LoRA alone, "lorablation"): the output is the base, as in mergekit
    summary="SCE: Select top-variance elements, Calculate energy-based weights, Erase minority signs.",
    paper="https://arxiv.org/abs/2408.07990",
    pretty="SCE",
    whole_when=lambda p: (
        "select_topk < 1: the variance threshold over the whole tensor comes before the energies"
        if p.get("select_topk", 1.0) < 1
        else None
    ),
    storage_only=STORAGE_ONLY,
    observes=lambda args, rng, count: (
        (Gram(relative=True, fuses=True) if args["select_topk"] >= 1 else WholeTensors()) if count else None
    ),
)
def sce(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    *,
    select_topk: float = 1.0,
    int8_mask: bool = False,
    stream: Stream | None = None,
) -> torch.Tensor:
    """tau_i = x_i - b (kept only at the top select_topk of positions by variance across models);
    omega_i = mean(tau_i^2)/sum_j mean(tau_j^2); M_i = [sign tau_i = sign sum_j tau_j];
    y = b + sum_i omega_i M_i tau_i / max(sum_i omega_i M_i, 1e-6). Model weights play no part.
    The mean squares in float64 (observed over the row chunks first when streamed)."""
    if not xs:
        return base
    if isinstance(base, kernels.Raw):  # the raw lane: one pass into `stream.out`, torch's operations
        assert stream is not None and stream.out is not None
        kernels_gram.sce(stream.out, xs, base, _weights(stream.seen.gram, stream.numel))
        return None
    deltas = [x.sub_(base) for x in xs]
    if select_topk < 1:
        mask = variance_mask(deltas, select_topk)
        for d in deltas:
            d.mul_(mask)
    observed = stream is not None and stream.seen.needs_observe
    # the energies of the whole tensor, not the chunk
    omega = _weights(stream.seen.gram, stream.numel) if observed else _weights(Gram.of(deltas), deltas[0].numel())
    elected = sign_consensus(deltas)
    merged = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for d, w in zip(deltas, omega, strict=True):
        agree = (torch.sign(d) == elected).to(base.dtype)
        merged.addcmul_(d, agree, value=w)
        divisor.add_(agree, alpha=w)
    return base.add_(merged.div_(divisor.clamp_min_(1e-6)))
