"""nuslerp: spherical interpolation of two models by weight, of whole tensors, rows or columns.

Streamed in row chunks: flattened, the two vectors' norms and dot product are observed first (their
Gram matrix, `methods.gram`); row by row, each chunk holds its own rows; column by column
(`nuslerp_row_wise`) every chunk would need every row, so that case takes whole tensors."""

from __future__ import annotations

import math

import numpy as np

from mergesmith import kernels, kernels_gram
from mergesmith.errors import MergeError
from mergesmith.lazy_torch import torch
from mergesmith.methods.gram import Gram, WholeTensors, combine
from mergesmith.methods.registry import REQUIRED, PerModel, merge_method
from mergesmith.methods.stream import Stream


def slerp_coefficients(t: float, gram: np.ndarray) -> list[float]:
    """(c0, c1) with y = c0 v0 + c1 v1 for the flattened vectors: `slerp_vectors`' rules, in float64."""
    n0 = max(math.sqrt(max(gram[0, 0], 0.0)), 1e-7)
    n1 = max(math.sqrt(max(gram[1, 1], 0.0)), 1e-7)
    theta = math.acos(min(1.0, max(-1.0, gram[0, 1] / (n0 * n1))))
    sin = math.sin(theta)
    if abs(sin) < 1e-8:
        return [1.0 - t, t]
    return [math.sin((1.0 - t) * theta) / sin, math.sin(t * theta) / sin]


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


def _observation(args: dict) -> Gram:
    """Flattened: the two vectors' Gram matrix; by rows: each chunk holds its own (nothing to
    observe); by columns: whole tensors."""
    if args["nuslerp_flatten"]:
        return Gram(relative=True, fuses=True)
    return WholeTensors() if args["nuslerp_row_wise"] else Gram(observe=False)


@merge_method(
    "nuslerp",
    base="optional",
    models=(0, 2),
    summary="Slerp between two models at t = w_B/(w_A+w_B); with a base, slerp their task vectors.",
    paper="https://en.wikipedia.org/wiki/Slerp",
    pretty="NuSLERP",
    whole_when=lambda p: (
        "nuslerp_row_wise: each column's slerp needs every row"
        if not p.get("nuslerp_flatten", True) and p.get("nuslerp_row_wise", False)
        else None
    ),
    observes=lambda args, rng, count: _observation(args) if count == 2 else None,
)
def nuslerp(
    xs: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: PerModel = REQUIRED,
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
    stream: Stream | None = None,
) -> torch.Tensor | None:
    """t = w_B/(w_A+w_B) (0.5 if |w_A+w_B| < 1e-6); y = [sin((1-t)theta) v0 + sin(t theta) v1]/sin theta,
    v = x (or x - b, then y += b). Vectors: the whole tensor when flattening, else rows W[i,:];
    `nuslerp_row_wise: true` takes columns W[:,j] (mergekit's behaviour, the opposite of its docs).
    Flattened, the norms and the dot product are float64 (observed over the row chunks first when streamed)."""
    present = len(xs) + (base is not None)
    if present == 1:  # an optional tensor only one model has: mergekit passes it through
        return xs[0] if xs else base
    if len(xs) != 2:
        raise MergeError(
            f"nuslerp merges exactly two models (plus an optional base_model), got {len(xs)} besides the base"
        )
    total = weight[0] + weight[1]
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    flat = nuslerp_flatten or (stream is None and xs[0].dim() < 2)  # streamed chunks are >= 2-D
    if isinstance(xs[0], kernels.Raw):  # flattened, in the raw lane: one pass into `stream.out`
        assert stream is not None and stream.out is not None
        kernels_gram.combination(stream.out, xs, base, slerp_coefficients(t, stream.seen.gram))
        return None
    v0, v1 = xs
    if base is not None:
        v0.sub_(base)
        v1.sub_(base)
    shape = v0.shape
    if flat:
        out = combine([v0, v1], slerp_coefficients(t, Gram.of([v0, v1]) if stream is None else stream.seen.gram))
        return out.add_(base) if base is not None else out
    if nuslerp_row_wise:  # vectors along the first axis: columns of a matrix
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    out = slerp_vectors(t, v0, v1)
    if not nuslerp_flatten and nuslerp_row_wise and out.dim() >= 2:
        out = out.transpose(0, -1)
    out = out.reshape(shape)
    return out.add_(base) if base is not None else out
