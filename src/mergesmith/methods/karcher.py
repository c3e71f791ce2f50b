"""karcher: the Riemannian (Karcher) mean of the models' directions, scaled by their mean norm."""

from __future__ import annotations

import math

from mergesmith.lazy_torch import torch
from mergesmith.methods.registry import merge_method


@merge_method(
    "karcher",
    base="input",
    summary="Equal-weight Karcher mean on the hypersphere: average directions geodesically, then mean norm.",
    paper="https://en.wikipedia.org/wiki/Karcher_mean",
    pretty="Karcher Mean",
)
def karcher(xs: list[torch.Tensor], base: None, *, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """alpha_i = 1/N over inputs with |x_i| > tol (renormalised), u_i = x_i/|x_i|; u = normalise(sum alpha_i u_i);
    repeat: theta_i = acos(u.u_i), T = sum alpha_i theta_i/sin theta_i (u_i - cos theta_i u), stop if |T| < tol,
    u = cos|T| u + sin|T| T/|T|. y = (sum_i |x_i| / N) u."""
    if len(xs) == 1:
        return xs[0]
    shape = xs[0].shape
    norms = [float(torch.linalg.vector_norm(x)) for x in xs]
    scale = sum(norms) / len(xs)  # zero-norm inputs count in the scale
    units = [x.reshape(-1).div_(n) for x, n in zip(xs, norms, strict=True) if n > tol]
    if not units:
        return torch.zeros_like(xs[0])
    alpha = 1.0 / len(units)
    mean = torch.zeros_like(units[0])
    for u in units:
        mean.add_(u, alpha=alpha)
    mean_norm = float(torch.linalg.vector_norm(mean))
    mean = units[0].clone() if mean_norm < tol else mean.div_(mean_norm)
    tangent = torch.empty_like(mean)
    for _ in range(max_iter):
        tangent.zero_()
        for u in units:
            cos = min(1.0, max(-1.0, float(torch.dot(mean, u))))
            theta = math.acos(cos)
            if theta < tol:
                continue
            c = alpha * theta / math.sin(theta)
            tangent.add_(u, alpha=c).add_(mean, alpha=-c * cos)
        step = float(torch.linalg.vector_norm(tangent))
        if step < tol:
            break
        mean.mul_(math.cos(step)).add_(tangent, alpha=math.sin(step) / step)
        norm = float(torch.linalg.vector_norm(mean))
        if norm > tol:
            mean.div_(norm)
    return mean.mul_(scale).reshape(shape)
