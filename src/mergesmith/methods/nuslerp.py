"""nuslerp: spherical interpolation of two models by weight, of whole tensors, rows or columns."""

from __future__ import annotations

from mergesmith.errors import MergeError
from mergesmith.lazy_torch import torch
from mergesmith.methods.registry import REQUIRED, PerModel, merge_method


def slerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Slerp each pair of vectors along the last axis (un-normalised endpoints), into `v0`.

    Norms are clamped at 1e-7; where |sin theta| < 1e-8 the pair is interpolated linearly.
    Angles are taken in float64 so that near-parallel vectors do not lose their tiny angle.
    """
    n0 = torch.linalg.vector_norm(v0, dim=-1, keepdim=True).double().clamp_min_(1e-7)
    n1 = torch.linalg.vector_norm(v1, dim=-1, keepdim=True).double().clamp_min_(1e-7)
    cos = (torch.linalg.vecdot(v0, v1, dim=-1).unsqueeze(-1).double() / (n0 * n1)).clamp_(-1.0, 1.0)
    theta = torch.acos(cos)
    sin = torch.sin(theta)
    colinear = sin.abs() < 1e-8
    safe_sin = torch.where(colinear, 1.0, sin)
    c0 = torch.where(colinear, 1.0 - t, torch.sin((1.0 - t) * theta) / safe_sin)
    c1 = torch.where(colinear, t, torch.sin(t * theta) / safe_sin)
    return v0.mul_(c0.to(v0.dtype)).addcmul_(v1, c1.to(v1.dtype))


@merge_method(
    "nuslerp",
    base="optional",
    models=(0, 2),
    summary="Slerp between two models at t = w_B/(w_A+w_B); with a base, slerp their task vectors.",
    paper="https://en.wikipedia.org/wiki/Slerp",
    pretty="NuSLERP",
)
def nuslerp(
    xs: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: PerModel = REQUIRED,
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
) -> torch.Tensor:
    """t = w_B/(w_A+w_B) (0.5 if |w_A+w_B| < 1e-6); y = [sin((1-t)theta) v0 + sin(t theta) v1]/sin theta,
    v = x (or x - b, then y += b). Vectors: the whole tensor when flattening, else rows W[i,:];
    `nuslerp_row_wise: true` takes columns W[:,j] (mergekit's behaviour, the opposite of its docs)."""
    present = len(xs) + (base is not None)
    if present == 1:  # an optional tensor only one model has: mergekit passes it through
        return xs[0] if xs else base
    if len(xs) != 2:
        raise MergeError(
            f"nuslerp merges exactly two models (plus an optional base_model), got {len(xs)} besides the base"
        )
    total = weight[0] + weight[1]
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    v0, v1 = xs
    if base is not None:
        v0.sub_(base)
        v1.sub_(base)
    shape = v0.shape
    if nuslerp_flatten or v0.dim() < 2:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif nuslerp_row_wise:  # vectors along the first axis: columns of a matrix
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    out = slerp_vectors(t, v0, v1)
    if not nuslerp_flatten and nuslerp_row_wise and out.dim() >= 2:
        out = out.transpose(0, -1)
    out = out.reshape(shape)
    return out.add_(base) if base is not None else out
