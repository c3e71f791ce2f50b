"""model_stock: move from the base towards the models' average as far as their task vectors agree."""

from __future__ import annotations

import math

import numpy as np

from mergesmith import kernels, kernels_gram
from mergesmith.errors import MergeError
from mergesmith.lazy_torch import torch
from mergesmith.methods.gram import Gram
from mergesmith.methods.registry import merge_method
from mergesmith.methods.stream import Stream


def _ratio(gram: np.ndarray) -> float:
    """t = N c / (1 + (N-1) c), c the mean pairwise cosine of the task vectors whose Gram matrix is
    `gram` (0 where they cancel)."""
    n = len(gram)
    norms = [math.sqrt(gram[i, i]) for i in range(n)]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    c = sum(min(1.0, max(-1.0, gram[i, j] / max(norms[i] * norms[j], 1e-6))) for i, j in pairs) / len(pairs)
    denominator = 1 + (n - 1) * c
    return 0.0 if denominator == 0 else n * c / denominator


@merge_method(
    "model_stock",
    base="required",
    models=(0, None),
    summary="Model Stock: interpolate base -> average of the models by the mean cosine of their task vectors.",
    paper="https://arxiv.org/abs/2403.19522",
    pretty="Model Stock",
    observes=lambda args, rng, count: (
        Gram(relative=True, observe=not args["filter_wise"], fuses=True) if count > 1 else None
    ),
)
def model_stock(
    xs: list[torch.Tensor], base: torch.Tensor, *, filter_wise: bool = False, stream: Stream | None = None
) -> torch.Tensor | None:
    """c = mean over pairs i<j of cos(delta_i, delta_j) (norm product clamped at 1e-6, c in [-1, 1]),
    t = N c / (1 + (N-1) c), y = t mean_i(x_i) + (1-t) b; per row (last axis) when `filter_wise`.
    Streamed: the norms and dot products are observed over the row chunks first."""
    if not xs:
        return base
    if len(xs) < 2:
        raise MergeError(f"model_stock needs the base model and at least two other models, got {len(xs)} other")
    if filter_wise:  # the whole tensor, or a chunk of whole rows
        return _filter_wise(xs, base)
    if isinstance(base, kernels.Raw):  # the raw lane: one pass into `stream.out`, torch's operations
        assert stream is not None and stream.out is not None
        n = len(xs)
        kernels_gram.span(stream.out, xs, base, [1.0] * n, divisor=n, scale=_ratio(stream.seen.gram))
        return None
    deltas = [x.sub_(base) for x in xs]
    ratio = _ratio(Gram.of(deltas) if stream is None else stream.seen.gram)
    mean_delta = deltas[0]
    for d in deltas[1:]:
        mean_delta.add_(d)
    mean_delta.div_(len(deltas))
    return base.addcmul_(mean_delta, torch.tensor(ratio, dtype=base.dtype, device=base.device))


def _filter_wise(xs: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """model_stock with a ratio per row (last axis)."""
    shape = base.shape
    if base.dim() >= 2:
        rows = [x.reshape(-1, shape[-1]) for x in [base, *xs]]
    else:
        rows = [x.reshape(1, -1) for x in [base, *xs]]
    b, deltas = rows[0], [x.sub_(rows[0]) for x in rows[1:]]
    norms = [torch.linalg.vector_norm(d, dim=-1).double() for d in deltas]
    n = len(deltas)
    cos_sum = torch.zeros_like(norms[0])
    for i in range(n):
        for j in range(i + 1, n):
            dot = torch.linalg.vecdot(deltas[i], deltas[j], dim=-1).double()
            cos_sum += (dot / (norms[i] * norms[j]).clamp_min(1e-6)).clamp_(-1.0, 1.0)
    c = cos_sum / (n * (n - 1) / 2)
    denominator = 1 + (n - 1) * c
    # Task vectors that cancel exactly (c = -1/(N-1)) have a zero mean: keep the base instead of NaN.
    t = torch.where(denominator == 0, 0.0, n * c / torch.where(denominator == 0, 1.0, denominator))
    mean_delta = deltas[0]
    for d in deltas[1:]:
        mean_delta.add_(d)
    mean_delta.div_(n)
    return b.addcmul_(mean_delta, t.to(b.dtype).unsqueeze(-1)).reshape(shape)
