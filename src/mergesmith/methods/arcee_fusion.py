"""arcee_fusion: take the other model's changes only where they matter most (importance outliers)."""

from __future__ import annotations

from mergesmith.errors import MergeError
from mergesmith.lazy_torch import torch
from mergesmith.methods.registry import merge_method
from mergesmith.rng import TensorRNG

QUANTILE_SAMPLE = 1_000_000


def importance(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|x - b| times the KL divergence of softmax(x) from softmax(b) along the last axis (row-wise)."""
    p = torch.softmax(x, dim=-1).add_(1e-8)
    q = torch.softmax(base, dim=-1).add_(1e-8)
    kl = (p * (p / q).log_()).sum(dim=-1, keepdim=True)
    return (x - base).abs_().mul_(kl)


def outlier_threshold(scores: torch.Tensor, rng: TensorRNG) -> float:
    """median + 1.5 IQR, each quantile q the sorted value at floor(q (n-1)).

    Above a million elements the quantiles come from a million elements drawn (with replacement,
    as current mergekit does) by the seeded generator, so reruns agree bit for bit.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if n > QUANTILE_SAMPLE:
        # float32 uniforms are multiples of 2^-24: two of them give a 48-bit index, bias < n / 2^48.
        hi = rng.uniform((QUANTILE_SAMPLE,), 0, flat.device).mul_(2**24).long()
        lo = rng.uniform((QUANTILE_SAMPLE,), 1, flat.device).mul_(2**24).long()
        flat = flat[(hi * 2**24 + lo) % n]
        n = QUANTILE_SAMPLE
    ordered = torch.sort(flat).values
    q1, median, q3 = (float(ordered[i]) for i in ((n - 1) // 4, (n - 1) // 2, 3 * (n - 1) // 4))
    return median + 1.5 * (q3 - q1)


@merge_method(
    "arcee_fusion",
    base="required",
    models=(1, 1),
    summary="Arcee Fusion: add the other model's changes where their importance is an upper outlier.",
    paper="https://arcee.ai",
    pretty="Arcee Fusion",
)
def arcee_fusion(xs: list[torch.Tensor], base: torch.Tensor, *, rng: TensorRNG) -> torch.Tensor:
    """I = |x - b| KL_row(softmax(x) + 1e-8 || softmax(b) + 1e-8); y = b + (x - b) [I >= median(I) + 1.5 IQR(I)]."""
    if len(xs) != 1:
        raise MergeError(f"arcee_fusion merges the base model with exactly one other model, got {len(xs)} others")
    scores = importance(xs[0], base)
    keep = scores >= outlier_threshold(scores, rng)
    return base.add_(xs[0].sub_(base).mul_(keep))
