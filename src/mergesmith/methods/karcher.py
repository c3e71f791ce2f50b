"""karcher: the Riemannian (Karcher) mean of the models' directions, scaled by their mean norm.

Every point the iteration visits is a combination of the inputs' directions, so it runs on
coefficients against the inputs' Gram matrix (`methods.gram`): the whole tensors are needed only
for their inner products, observed over row chunks first, and the result is y = sum_i c_i x_i."""

from __future__ import annotations

import math

import numpy as np

from mergesmith import kernels
from mergesmith.lazy_torch import torch
from mergesmith.methods.gram import Gram, combine
from mergesmith.methods.registry import merge_method
from mergesmith.methods.stream import Stream


def karcher_coefficients(gram: np.ndarray, max_iter: int, tol: float) -> list[float]:
    """c with y = sum_i c_i x_i, from the Gram matrix of the inputs x_i (float64 throughout)."""
    count = len(gram)
    norms = np.sqrt(np.clip(np.diag(gram), 0, None))
    scale = float(norms.sum()) / count  # zero-norm inputs count in the scale
    active = [i for i in range(count) if norms[i] > tol]
    if not active:
        return [0.0] * count
    g = gram[np.ix_(active, active)] / np.outer(norms[active], norms[active])  # of the unit directions

    def norm(a: np.ndarray) -> float:
        return math.sqrt(max(float(a @ g @ a), 0.0))

    alpha = 1.0 / len(active)
    mean = np.full(len(active), alpha)
    mean_norm = norm(mean)
    mean = np.eye(len(active))[0] if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = np.zeros(len(active))
        cosines = g @ mean
        for k in range(len(active)):
            cos = min(1.0, max(-1.0, float(cosines[k])))
            theta = math.acos(cos)
            if theta < tol:
                continue
            c = alpha * theta / math.sin(theta)
            tangent[k] += c
            tangent -= c * cos * mean
        step = norm(tangent)
        if step < tol:
            break
        mean = math.cos(step) * mean + math.sin(step) / step * tangent
        n = norm(mean)
        if n > tol:
            mean = mean / n
    out = [0.0] * count
    for k, i in enumerate(active):
        out[i] = scale * float(mean[k]) / float(norms[i])
    return out


@merge_method(
    "karcher",
    base="input",
    summary="Equal-weight Karcher mean on the hypersphere: average directions geodesically, then mean norm.",
    paper="https://en.wikipedia.org/wiki/Karcher_mean",
    pretty="Karcher Mean",
    observes=lambda args, rng, count: Gram(fuses=True) if count > 1 else None,
)
def karcher(
    xs: list[torch.Tensor], base: None, *, max_iter: int = 10, tol: float = 1e-5, stream: Stream | None = None
) -> torch.Tensor | None:
    """alpha_i = 1/N over inputs with |x_i| > tol (renormalised), u_i = x_i/|x_i|; u = normalise(sum alpha_i u_i);
    repeat: theta_i = acos(u.u_i), T = sum alpha_i theta_i/sin theta_i (u_i - cos theta_i u), stop if |T| < tol,
    u = cos|T| u + sin|T| T/|T|. y = (sum_i |x_i| / N) u. Inner products in float64, observed over
    the row chunks first when streamed."""
    if len(xs) == 1:
        return xs[0]
    if stream is None:
        return combine(xs, karcher_coefficients(Gram.of(xs), max_iter, tol))
    coefficients = karcher_coefficients(stream.seen.gram, max_iter, tol)
    if isinstance(xs[0], kernels.Raw):  # the raw lane: one pass into `stream.out`, torch's operations
        assert stream.out is not None
        kernels.linear(stream.out, xs, coefficients, None)
        return None
    return combine(xs, coefficients)
