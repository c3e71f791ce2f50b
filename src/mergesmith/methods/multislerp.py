"""multislerp: barycentric interpolation of any number of models on the hypersphere."""

from __future__ import annotations

import math

from mergesmith.errors import MergeError
from mergesmith.lazy_torch import torch
from mergesmith.methods.registry import REQUIRED, PerModel, merge_method


@merge_method(
    "multislerp",
    base="optional",
    summary="Spherical weighted mean of several models (or of their task vectors when a base is given).",
    paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    pretty="Multi-SLERP",
)
def multislerp(
    xs: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: PerModel = REQUIRED,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """n_i = |x_i|, u_i = x_i/(n_i+eps), m = sum w_i u_i, m^ = m/|m|; G = sum w_i (u_i - (u_i.m^) m^),
    tau = |G| + eps; y = (sum w_i n_i) (m^ cos tau + G sin tau / tau); x_i = x_i - b and y += b with a base.
    Weights are normalised to sum 1 when `normalize_weights` (a tangent projection, not a log map)."""
    if not xs:
        return base
    if len(xs) == 1:
        return xs[0]
    w = list(weight)
    if normalize_weights:
        total = sum(w)
        if total == 0:
            raise MergeError("multislerp: the weights sum to zero; change them or set normalize_weights: false")
        w = [wi / total for wi in w]
    shape = xs[0].shape
    if base is not None:
        for x in xs:
            x.sub_(base)
    norms = [float(torch.linalg.vector_norm(x)) for x in xs]
    units = [x.reshape(-1).div_(n + eps) for x, n in zip(xs, norms, strict=True)]
    mean = torch.zeros_like(units[0])
    for u, wi in zip(units, w, strict=True):
        mean.add_(u, alpha=wi)
    mean_norm = float(torch.linalg.vector_norm(mean))
    if mean_norm < eps:
        if len(xs) != 2:
            raise MergeError(
                "multislerp: the weighted mean direction is zero (opposite inputs whose weights cancel); "
                "change the weights"
            )
        # Two cancelling directions: fall back to the weighted sum, as mergekit does.
        out = units[0].mul_(w[0] * (norms[0] + eps)).add_(units[1], alpha=w[1] * (norms[1] + eps))
    else:
        mean.div_(mean_norm)
        tangent = torch.zeros_like(mean)
        for u, wi in zip(units, w, strict=True):
            tangent.add_(u, alpha=wi).add_(mean, alpha=-wi * float(torch.dot(u, mean)))
        tau = float(torch.linalg.vector_norm(tangent)) + eps
        scale = sum(wi * n for wi, n in zip(w, norms, strict=True))
        out = mean.mul_(math.cos(tau) * scale).add_(tangent, alpha=math.sin(tau) / tau * scale)
    out = out.reshape(shape)
    return out.add_(base) if base is not None else out
