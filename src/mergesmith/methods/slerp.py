from __future__ import annotations

import math

from mergesmith.lazy_torch import torch
from mergesmith.methods.registry import REQUIRED, merge_method


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation of two whole tensors (as flat vectors), un-normalised endpoints."""
    n0 = float(v0.norm())
    n1 = float(v1.norm())
    dot = float(torch.dot(v0.reshape(-1), v1.reshape(-1)))
    if n0 > 1e-8:
        dot /= n0
    if n1 > 1e-8:
        dot /= n1
    if abs(dot) > dot_threshold:
        return v0.mul_(1 - t).add_(v1, alpha=t)
    theta = math.acos(dot)
    s = math.sin(theta)
    return v0.mul_(math.sin((1 - t) * theta) / s).add_(v1, alpha=math.sin(t * theta) / s)


@merge_method(
    "slerp",
    base="required",
    models=(0, 1),
    summary="Spherical interpolation between the base (t=0) and one other model (t=1).",
    paper="https://en.wikipedia.org/wiki/Slerp",
    pretty="SLERP",
)
def slerp(xs: list[torch.Tensor], base: torch.Tensor, *, t: float = REQUIRED) -> torch.Tensor:
    """u_k = v_k/|v_k|; d = u0.u1; |d| > 0.9995: (1-t)v0 + t v1;
    else theta = acos d, y = [sin((1-t)theta) v0 + sin(t theta) v1] / sin theta."""
    if not xs:
        return base
    return slerp_tensors(t, base, xs[0])
