"""Sparsifiers for task vectors: which elements of a delta survive.

Each takes a delta and returns it sparsified (a new tensor or the input modified in place).
`rescale` is mergekit's: multiply the survivors by the ratio of L1 norms before/after, so the
task vector keeps its L1 norm (not the papers' per-element 1/p).
"""

from __future__ import annotations

import torch

from mergesmith.errors import MergeError
from mergesmith.rng import TensorRNG

#: Below this many values a plain `kthvalue` is as fast as anything.
SMALL = 1 << 20


def kth_smallest(flat: torch.Tensor, r: int) -> torch.Tensor:
    """The exact r-th smallest value (1-based) of a 1-D tensor, in O(n).

    A fixed strided sample of ~64K values brackets the answer between two of its order statistics
    (lo, hi); one counting pass gives how many values lie below lo, the few in [lo, hi] are
    gathered and `kthvalue` runs on those only. The result is checked to be bracketed; if the
    sample was unlucky (or values are NaN) it falls back to a full `kthvalue`. Deterministic.
    """
    n = flat.numel()
    if n <= SMALL:
        return torch.kthvalue(flat, r).values
    stride = n // 65536
    sample = torch.sort(flat[::stride]).values
    m = sample.numel()
    q = r / n * m
    slack = 4.0 * m**0.5 + 2
    lo_i, hi_i = int(q - slack), int(q + slack)
    lo = sample[lo_i] if lo_i >= 0 else None
    hi = sample[hi_i] if hi_i < m else None
    below = int((flat < lo).sum()) if lo is not None else 0
    if lo is not None and hi is not None:
        candidates = flat[(flat >= lo) & (flat <= hi)]
    elif lo is not None:
        candidates = flat[flat >= lo]
    elif hi is not None:
        candidates = flat[flat <= hi]
    else:
        candidates = flat
    if below < r <= below + candidates.numel():
        return torch.kthvalue(candidates, r - below).values
    return torch.kthvalue(flat, r).values


def top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the `k` largest entries of `values` (any shape); ties go to the lowest flat index."""
    flat = values.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(values, dtype=torch.bool)
    threshold = kth_smallest(flat, n - k + 1)
    mask = flat > threshold
    missing = k - int(mask.sum())
    if missing > 0:
        first = torch.nonzero(flat == threshold).reshape(-1)[:missing]
        mask[first] = True
    return mask.view(values.shape)


def l1_rescale(sparse: torch.Tensor, original_l1: float) -> torch.Tensor:
    kept_l1 = float(sparse.abs().sum())
    if original_l1 >= 1e-7 and kept_l1 >= 1e-7:
        sparse.mul_(original_l1 / kept_l1)
    return sparse


def magnitude(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the floor(density * n) largest-magnitude elements (TIES). None kept -> all zero."""
    if density >= 1:
        return delta
    l1 = float(delta.abs().sum()) if rescale else 0.0
    k = int(density * delta.numel())
    delta.mul_(top_k_mask(delta.abs(), k))
    return l1_rescale(delta, l1) if rescale else delta


def random(delta: torch.Tensor, density: float, rng: TensorRNG, stream: int, rescale: bool = False) -> torch.Tensor:
    """Keep each element with probability `density` (DARE)."""
    if density >= 1:
        return delta
    l1 = float(delta.abs().sum()) if rescale else 0.0
    delta.mul_(rng.keep_mask(delta.shape, density, stream, delta.device))
    return l1_rescale(delta, l1) if rescale else delta


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    """Drop the floor(gamma*n) largest magnitudes and the smallest ones, keeping floor(density*n) (breadcrumbs).

    mergekit zeroes the whole vector when floor(gamma*n) is 0; here nothing is dropped from the top then.
    """
    if density >= 1:
        return delta
    n = delta.numel()
    keep = int(density * n)
    top = int(gamma * n)
    bottom = n - keep - top
    if bottom < 0:
        top += bottom
        bottom = 0
    l1 = float(delta.abs().sum()) if rescale else 0.0
    magnitudes = delta.abs()
    mask = top_k_mask(magnitudes, n - bottom) & ~top_k_mask(magnitudes, top)
    delta.mul_(mask)
    return l1_rescale(delta, l1) if rescale else delta


def della_magprune(
    delta: torch.Tensor, density: float, epsilon: float, rng: TensorRNG, stream: int, rescale: bool = False
) -> torch.Tensor:
    """Keep each element with a probability rising with its magnitude rank within its row (DELLA).

    p = density - epsilon + 2*epsilon*rank/(n-1), rank 0 for the smallest |delta| of the row.
    A row of one element keeps probability `density` (mergekit divides by zero there).
    """
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    if not (0 < density - epsilon and density + epsilon < 1):
        raise MergeError(
            f"della needs 0 < density - epsilon and density + epsilon < 1; got density={density}, epsilon={epsilon}"
        )
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    n = rows.shape[1]
    l1 = float(delta.abs().sum()) if rescale else 0.0
    if n == 1:
        p = torch.full_like(rows, density)
    else:
        ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1, stable=True).to(rows.dtype)
        p = (density - epsilon) + (2 * epsilon / (n - 1)) * ranks
    rows.mul_(rng.keep_mask(rows.shape, p, stream, rows.device))
    return l1_rescale(delta, l1) if rescale else delta
