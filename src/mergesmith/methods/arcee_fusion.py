"""arcee_fusion: take the other model's changes only where they matter most (importance outliers).

The importance of an element needs only its row (a softmax along the last axis), and the threshold
needs only the sorted multiset of at most a million of them (all, or a seeded sample). Streamed in
row chunks, an observe pass gathers those values (`ImportanceSample`), then each chunk is merged."""

from __future__ import annotations

import numpy as np

from mergesmith.errors import MergeError
from mergesmith.lazy_torch import torch
from mergesmith.methods.registry import merge_method
from mergesmith.methods.sparsify import Pruner
from mergesmith.methods.stream import Stream
from mergesmith.rng import TensorRNG

QUANTILE_SAMPLE = 1_000_000


def importance(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|x - b| times the KL divergence of softmax(x) from softmax(b) along the last axis (row-wise)."""
    p = torch.softmax(x, dim=-1).add_(1e-8)
    q = torch.softmax(base, dim=-1).add_(1e-8)
    kl = (p * (p / q).log_()).sum(dim=-1, keepdim=True)
    return (x - base).abs_().mul_(kl)


def sample_positions(n: int, rng: TensorRNG, device: torch.device | None) -> torch.Tensor | None:
    """The flat positions whose scores give the quantiles: None (all of them) up to a million
    elements, else a million drawn (with replacement, as current mergekit does) by the seeded
    generator, so reruns agree bit for bit."""
    if n <= QUANTILE_SAMPLE:
        return None
    # float32 uniforms are multiples of 2^-24: two of them give a 48-bit index, bias < n / 2^48.
    hi = rng.uniform((QUANTILE_SAMPLE,), 0, device).mul_(2**24).long()
    lo = rng.uniform((QUANTILE_SAMPLE,), 1, device).mul_(2**24).long()
    return (hi * 2**24 + lo) % n


def quantile_threshold(values: torch.Tensor) -> float:
    """median + 1.5 IQR of `values`, each quantile q the sorted value at floor(q (n-1))."""
    n = values.numel()
    ordered = torch.sort(values).values
    q1, median, q3 = (float(ordered[i]) for i in ((n - 1) // 4, (n - 1) // 2, 3 * (n - 1) // 4))
    return median + 1.5 * (q3 - q1)


def outlier_threshold(scores: torch.Tensor, rng: TensorRNG) -> float:
    """The threshold of whole-tensor `scores`: `quantile_threshold` of their `sample_positions`."""
    flat = scores.reshape(-1)
    picked = sample_positions(flat.numel(), rng, flat.device)
    return quantile_threshold(flat if picked is None else flat[picked])


class ImportanceSample(Pruner):
    """The scores at the `sample_positions`, gathered chunk by chunk (chunks may be observed on several
    threads, in any order); `finish` sorts the multiset into the threshold the whole tensor gives."""

    needs_observe = True

    def __init__(self, rng: TensorRNG) -> None:
        self.rng = rng
        self.positions: np.ndarray | None = None  # sorted flat positions (repeats kept), or None: all
        self.parts: dict[int, torch.Tensor] = {}
        self.threshold = 0.0

    def setup(self, numel: int) -> None:
        super().setup(numel)
        picked = sample_positions(numel, self.rng, None)  # drawn on the CPU, as the whole tensor's are
        self.positions = None if picked is None else np.sort(picked.numpy())

    def observe_scores(self, scores: torch.Tensor, start: int) -> None:
        flat = scores.reshape(-1)
        if self.positions is None:
            self.parts[start] = flat  # a fresh tensor (`importance` allocates it)
            return
        a, b = np.searchsorted(self.positions, [start, start + flat.numel()])
        self.parts[start] = flat[torch.from_numpy(self.positions[a:b] - start).to(flat.device)]

    def feed(self, xs: list[torch.Tensor], base: torch.Tensor, at: Stream) -> None:
        self.observe_scores(importance(xs[0], base), at.start)

    def finish(self) -> bool:
        self.threshold = quantile_threshold(torch.cat([self.parts[s] for s in sorted(self.parts)]))
        self.parts = {}
        return True


@merge_method(
    "arcee_fusion",
    base="required",
    models=(1, 1),
    summary="Arcee Fusion: add the other model's changes where their importance is an upper outlier.",
    paper="https://arcee.ai",
    pretty="Arcee Fusion",
    observes=lambda args, rng, count: ImportanceSample(rng) if count == 1 else None,
)
def arcee_fusion(
    xs: list[torch.Tensor], base: torch.Tensor, *, rng: TensorRNG, stream: Stream | None = None
) -> torch.Tensor:
    """I = |x - b| KL_row(softmax(x) + 1e-8 || softmax(b) + 1e-8); y = b + (x - b) [I >= median(I) + 1.5 IQR(I)].
    Streamed, the scores that give the quantiles are gathered over the row chunks first."""
    if len(xs) != 1:
        raise MergeError(f"arcee_fusion merges the base model with exactly one other model, got {len(xs)} others")
    if stream is None:
        scores = importance(xs[0], base)
        return base.add_(xs[0].sub_(base).mul_(scores >= outlier_threshold(scores, rng)))
    keep = importance(xs[0], base) >= stream.seen.threshold
    return base.add_(xs[0].sub_(base).mul_(keep))
