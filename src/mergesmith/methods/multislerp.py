"""multislerp: barycentric interpolation of any number of models on the hypersphere.

The result is a combination of the (task) vectors whose coefficients need only their inner
products: those are taken from their Gram matrix (`methods.gram`), observed over the row chunks
first when streamed, then each chunk is combined."""

from __future__ import annotations

import math

import numpy as np

from mergesmith import kernels, kernels_gram
from mergesmith.errors import MergeError
from mergesmith.lazy_torch import torch
from mergesmith.methods.gram import Gram, combine, task_vectors
from mergesmith.methods.registry import REQUIRED, PerModel, merge_method
from mergesmith.methods.stream import Stream


def multislerp_coefficients(gram: np.ndarray, w: list[float], eps: float) -> list[float]:
    """c with y = sum_i c_i v_i, from the Gram matrix of the vectors v_i (float64 throughout)."""
    norms = np.sqrt(np.clip(np.diag(gram), 0, None))
    s = 1.0 / (norms + eps)  # u_i = s_i v_i
    gu = gram * np.outer(s, s)
    wv = np.array(w)
    mean_norm = math.sqrt(max(float(wv @ gu @ wv), 0.0))
    if mean_norm < eps:
        if len(w) != 2:
            raise MergeError(
                "multislerp: the weighted mean direction is zero (opposite inputs whose weights cancel); "
                "change the weights"
            )
        return [w[0] * (norms[0] + eps) * s[0], w[1] * (norms[1] + eps) * s[1]]  # the weighted sum, as mergekit
    mh = wv / mean_norm  # the unit mean direction, as coefficients of the u_i
    dots = gu @ mh  # u_i . m^
    tangent = wv - float(wv @ dots) * mh
    tau = math.sqrt(max(float(tangent @ gu @ tangent), 0.0)) + eps
    scale = float(wv @ norms)
    c = mh * (math.cos(tau) * scale) + tangent * (math.sin(tau) / tau * scale)
    return [float(ci * si) for ci, si in zip(c, s, strict=True)]


@merge_method(
    "multislerp",
    base="optional",
    summary="Spherical weighted mean of several models (or of their task vectors when a base is given).",
    paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    pretty="Multi-SLERP",
    observes=lambda args, rng, count: Gram(relative=True, fuses=True) if count > 1 else None,
)
def multislerp(
    xs: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: PerModel = REQUIRED,
    normalize_weights: bool = True,
    eps: float = 1e-8,
    stream: Stream | None = None,
) -> torch.Tensor | None:
    """n_i = |x_i|, u_i = x_i/(n_i+eps), m = sum w_i u_i, m^ = m/|m|; G = sum w_i (u_i - (u_i.m^) m^),
    tau = |G| + eps; y = (sum w_i n_i) (m^ cos tau + G sin tau / tau); x_i = x_i - b and y += b with a base.
    Weights are normalised to sum 1 when `normalize_weights` (a tangent projection, not a log map).
    Inner products in float64, observed over the row chunks first when streamed."""
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
    if isinstance(xs[0], kernels.Raw):  # the raw lane: one pass into `stream.out`, torch's operations
        assert stream is not None and stream.out is not None
        kernels_gram.combination(stream.out, xs, base, multislerp_coefficients(stream.seen.gram, w, eps))
        return None
    vs = task_vectors(xs, base)
    out = combine(vs, multislerp_coefficients(Gram.of(vs) if stream is None else stream.seen.gram, w, eps))
    return out.add_(base) if base is not None else out
