"""The task-vector family as one pipeline.

deltas -> sparsify each (its own density) -> weight -> optional sign consensus -> combine
-> normalise -> base + lambda * result. A method is this pipeline with a sparsifier and a
consensus switch; new sparsifiers plug in as a function `(delta, index) -> delta`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Sparsifier = Callable[[torch.Tensor, int], torch.Tensor]


def sign_consensus(weighted: Sequence[torch.Tensor]) -> torch.Tensor:
    """TIES sign election by sum: per element the sign (+1/-1) of the summed weighted deltas (0 -> +1)."""
    total = torch.zeros_like(weighted[0])
    for d in weighted:
        total.add_(d)
    return torch.where(total >= 0, 1.0, -1.0).to(total.dtype)


def merge_task_vectors(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    weights: Sequence[float],
    *,
    sparsify: Sparsifier | None,
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    if not xs:
        return base
    deltas = []
    for i, x in enumerate(xs):
        d = x.sub_(base)  # the inputs are ours to overwrite
        if sparsify is not None:
            d = sparsify(d, i)
        deltas.append(d.mul_(weights[i]))
    if consensus:  # in place: the deltas become their agreeing parts, two scratch tensors in all
        positive = sign_consensus(deltas) > 0
        divisor = torch.zeros_like(base)
        for d, w in zip(deltas, weights, strict=True):
            agree = torch.where(positive, d > 0, d < 0)  # sign(d) == elected; d == 0 never agrees
            d.mul_(agree)
            divisor.add_(agree.to(base.dtype), alpha=w)
        combined = torch.zeros_like(base)
        for d in deltas:
            combined.add_(d)
        divisor[divisor == 0] = 1.0
    else:
        combined = deltas[0]
        for d in deltas[1:]:
            combined.add_(d)
        z = float(sum(weights))
        divisor = torch.tensor(1.0 if abs(z) < 1e-8 else z, dtype=base.dtype, device=base.device)
    if normalize:
        combined.div_(divisor)
    return base.add_(combined, alpha=lambda_)
