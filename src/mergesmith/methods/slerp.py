from __future__ import annotations

import math

from mergesmith import kernels
from mergesmith.lazy_torch import torch
from mergesmith.methods.gram import Gram
from mergesmith.methods.registry import REQUIRED, merge_method
from mergesmith.methods.stream import Stream


def _weights(gram, t: float, dot_threshold: float = 0.9995) -> tuple[float, float]:
    """(c0, c1) with y = c0 v0 + c1 v1, from the Gram matrix of v0 and v1."""
    n0, n1, dot = math.sqrt(gram[0, 0]), math.sqrt(gram[1, 1]), gram[0, 1]
    if n0 > 1e-8:
        dot /= n0
    if n1 > 1e-8:
        dot /= n1
    if abs(dot) > dot_threshold:
        return 1 - t, t
    theta = math.acos(dot)
    s = math.sin(theta)
    return math.sin((1 - t) * theta) / s, math.sin(t * theta) / s


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two whole tensors (as flat vectors), un-normalised endpoints."""
    c0, c1 = _weights(Gram.of([v0, v1]), t)
    return v0.mul_(c0).add_(v1, alpha=c1)


def _base_and_other(xs: list, base: object) -> list:
    return [base, xs[0]]


@merge_method(
    "slerp",
    base="required",
    models=(0, 1),
    summary="Spherical interpolation between the base (t=0) and one other model (t=1).",
    paper="https://en.wikipedia.org/wiki/Slerp",
    pretty="SLERP",
    observes=lambda args, rng, count: Gram(_base_and_other, fuses=True) if count else None,
)
def slerp(
    xs: list[torch.Tensor], base: torch.Tensor, *, t: float = REQUIRED, stream: Stream | None = None
) -> torch.Tensor | None:
    """u_k = v_k/|v_k|; d = u0.u1; |d| > 0.9995: (1-t)v0 + t v1;
    else theta = acos d, y = [sin((1-t)theta) v0 + sin(t theta) v1] / sin theta.
    Streamed: the norms and the dot product are observed over the row chunks first."""
    if not xs:
        return base
    if stream is None:
        return slerp_tensors(t, base, xs[0])
    c0, c1 = _weights(stream.seen.gram, t)
    if isinstance(base, kernels.Raw):  # the raw lane: one pass into `stream.out`, torch's operations
        assert stream.out is not None
        kernels.linear(stream.out, [base, xs[0]], [c0, c1], None)
        return None
    return base.mul_(c0).add_(xs[0], alpha=c1)
