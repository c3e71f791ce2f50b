"""Streaming figures of one tensor's task vectors, and their sums over layers and module types.

Each tensor is seen once, in row chunks. A chunk gives (in float32, summed in float64):
- the Gram matrix of [base, task vectors..., merged task vector]: norms, cosines, how far a merge
  moved towards each input;
- the TIES sign-conflict mass: per element the sign is elected by the sum of the task vectors
  (`+1` when the sum is >= 0, as mergekit's "sum" rule), and a model's non-zero entries of the other
  sign count with their magnitude (read from the Gram matrix: see `TensorStats.add`);
- a histogram of |delta| per model over bf16-wide bins (the top 16 bits of a float32 without its
  sign: 0.4% of a value wide), from which the share of each task vector's magnitude a magnitude
  (TIES) density cut keeps is read for any density, without holding the tensor;
- for matrices, a randomized SVD sketch (`sketch.RowSketch`).
`Figures` are additive, so a layer's or the whole model's figures are sums of its tensors'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mergesmith.inspect.sketch import RowSketch, rank_for_energy, subspace_overlap
from mergesmith.lazy_torch import torch

BINS = 1 << 15
#: Densities at which the kept share is reported for every model, besides the recipe's.
CURVE = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
#: Singular directions compared between models (subspace overlap).
OVERLAP_RANK = 8


def _bin_values() -> np.ndarray:
    """The middle value of each |x| bin."""
    bits = (np.arange(BINS, dtype=np.uint32) << 16) | 0x8000
    with np.errstate(invalid="ignore"):  # the NaN bins
        mid = bits.view(np.float32).astype(np.float64)
    return np.where(np.isfinite(mid), mid, 0.0)


BIN_VALUES = _bin_values()


def kept_shares(counts: np.ndarray, densities: list[float]) -> list[float]:
    """Share of the magnitude sum that keeping the `floor(density * n)` largest |x| keeps (TIES's
    magnitude cut), for each density; inside the bin where the cut falls, values count at its middle."""
    (nonzero,) = np.nonzero(counts)
    hr, vr = counts[nonzero][::-1], BIN_VALUES[nonzero][::-1]  # from the largest values down
    n = int(hr.sum())
    total = float(np.dot(hr, vr))
    if n == 0 or total <= 0:
        return [1.0 for _ in densities]
    cum = np.cumsum(hr)
    cum_mass = np.cumsum(hr * vr)
    out = []
    for d in densities:
        k = math.floor(d * n)
        if d >= 1 or k >= n:
            out.append(1.0)
            continue
        if k <= 0:
            out.append(0.0)
            continue
        j = int(np.searchsorted(cum, k))  # first bin where the count reaches k
        above, mass = (int(cum[j - 1]), float(cum_mass[j - 1])) if j > 0 else (0, 0.0)
        out.append((mass + (k - above) * float(vr[j])) / total)
    return out


@dataclass
class Figures:
    """Additive figures of K task vectors over some set of tensors."""

    count: int
    merged: bool = False
    numel: int = 0
    base_sq: float = 0.0
    gram: np.ndarray = field(default=None)  # type: ignore[assignment]  # (K, K) task-vector dot products
    base_dot: np.ndarray = field(default=None)  # type: ignore[assignment]  # (K,) base . task vector
    abs_mass: np.ndarray = field(default=None)  # type: ignore[assignment]  # (K,) sum |delta|
    conflict_mass: np.ndarray = field(default=None)  # type: ignore[assignment]  # (K,)
    kept_mass: np.ndarray = field(default=None)  # type: ignore[assignment]  # (K,) at the recipe's density
    density_numel: np.ndarray = field(default=None)  # type: ignore[assignment]  # (K,) sum density * numel
    has_density: bool = False
    curve_mass: np.ndarray = field(default=None)  # type: ignore[assignment]  # (len(CURVE), K)
    merged_sq: float = 0.0
    merged_dot: np.ndarray = field(default=None)  # type: ignore[assignment]  # (K,)
    matrices: int = 0
    matrix_sq: np.ndarray = field(default=None)  # type: ignore[assignment]  # (K,) ||delta||^2 of the matrices
    matrix_sum_sq: float = 0.0
    top_energy: np.ndarray = field(default=None)  # type: ignore[assignment]  # (K,) sum of top sigma^2
    top_energy_sum: float = 0.0
    overlap_sum: np.ndarray = field(default=None)  # type: ignore[assignment]  # (K, K)

    def __post_init__(self) -> None:
        k = self.count
        for name, shape in (
            ("gram", (k, k)),
            ("base_dot", (k,)),
            ("abs_mass", (k,)),
            ("conflict_mass", (k,)),
            ("kept_mass", (k,)),
            ("density_numel", (k,)),
            ("curve_mass", (len(CURVE), k)),
            ("merged_dot", (k,)),
            ("matrix_sq", (k,)),
            ("top_energy", (k,)),
            ("overlap_sum", (k, k)),
        ):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(shape))

    def add(self, other: Figures) -> None:
        for name, value in vars(other).items():
            if name in ("count", "merged", "has_density"):
                continue
            setattr(self, name, getattr(self, name) + value)
        self.has_density |= other.has_density
        self.merged |= other.merged


@dataclass
class TensorSpectra:
    """Per-tensor spectra, for the report's `spectra` list."""

    sigma: list[list[float]]
    sigma_sum: list[float]
    rank90: list[int | None]
    rank90_sum: int | None
    overlap: list[list[float]]
    sketch_rank: int


class TensorStats:
    """Accumulates one tensor's figures over its row chunks."""

    def __init__(self, count: int, rows: int, cols: int, *, merged: bool, matrix: bool, rank: int, seed: int) -> None:
        self.count, self.merged = count, merged
        self.fig = Figures(count, merged=merged)
        self.hist = np.zeros((count, BINS), dtype=np.int64)
        self.sketch = RowSketch(count, rows, cols, rank, seed) if matrix else None
        self.rank = rank
        n = count + 2 + merged
        self._gram = torch.zeros(n, n, dtype=torch.float64)
        self._abs = torch.zeros(count, dtype=torch.float64)

    @staticmethod
    def rows_needed(count: int, merged: bool) -> int:
        """Rows of the `stacked` chunk that `add` takes."""
        return count + 2 + merged

    def add(self, start: int, stacked: torch.Tensor, width: int) -> None:
        """`stacked`: float32 rows of c = rows * `width` elements from row `start` on: the base chunk, the
        task-vector chunks, a scratch row, and (with a merge) the merged task-vector chunk.

        The scratch row gets the elected sign s (+1 where the task vectors sum to >= 0, else -1), so the
        one Gram matrix also gives each task vector's dot product with it, and a model's magnitude
        against the elected sign is (sum |d| - d . s) / 2, without an element-wise pass of its own."""
        k = self.count
        deltas = stacked[1 : k + 1]
        sign = stacked[k + 1]
        torch.sum(deltas, 0, out=sign)
        torch.ge(sign, 0, out=sign)  # 1.0 / 0.0
        sign.mul_(2).sub_(1)
        self._gram += (stacked @ stacked.T).double()
        if self.sketch is not None:
            self.sketch.add(start, deltas.reshape(k, -1, width))
        mags = deltas.abs()
        self._abs += mags.sum(1).double()
        bins = mags.view(torch.int32).bitwise_right_shift_(16)  # |d|'s top bits: its bin (mags is spent)
        for i in range(k):
            self.hist[i] += torch.bincount(bins[i], minlength=BINS).numpy()

    def finish(self, densities: list[float | None]) -> tuple[Figures, TensorSpectra | None]:
        f, k = self.fig, self.count
        g = self._gram.numpy()
        f.numel = int(self.hist[0].sum())
        f.base_sq = float(g[0, 0])
        f.gram = g[1 : k + 1, 1 : k + 1].copy()
        f.base_dot = g[0, 1 : k + 1].copy()
        if self.merged:
            f.merged_sq = float(g[k + 2, k + 2])
            f.merged_dot = g[k + 2, 1 : k + 1].copy()
        f.abs_mass = self._abs.numpy().copy()
        f.conflict_mass = np.maximum((f.abs_mass - g[k + 1, 1 : k + 1]) / 2, 0.0)
        for i in range(k):
            d = densities[i]
            shares = kept_shares(self.hist[i], [*CURVE, 1.0 if d is None else d])
            f.curve_mass[:, i] = np.array(shares[:-1]) * f.abs_mass[i]
            if d is not None:
                f.has_density = True
                f.kept_mass[i] = shares[-1] * f.abs_mass[i]
                f.density_numel[i] = min(d, 1.0) * f.numel
        spectra = self._spectra(f) if self.sketch is not None else None
        return f, spectra

    def _spectra(self, f: Figures) -> TensorSpectra:
        assert self.sketch is not None
        k = self.count
        per, total = self.sketch.spectra(self.rank)
        sq = np.diag(f.gram)
        sum_sq = float(f.gram.sum())
        f.matrices = 1
        f.matrix_sq = sq.copy()
        f.matrix_sum_sq = sum_sq
        f.top_energy = np.array([sum(s * s for s in p.sigma) for p in per])
        f.top_energy_sum = sum(s * s for s in total.sigma)
        r = min(OVERLAP_RANK, self.sketch.k)
        overlap = [[subspace_overlap(per[i].vectors[:, :r], per[j].vectors[:, :r]) for j in range(k)] for i in range(k)]
        f.overlap_sum = np.array(overlap)
        return TensorSpectra(
            sigma=[p.sigma for p in per],
            sigma_sum=total.sigma,
            rank90=[rank_for_energy(p.sigma, float(sq[i])) for i, p in enumerate(per)],
            rank90_sum=rank_for_energy(total.sigma, sum_sq),
            overlap=overlap,
            sketch_rank=self.sketch.k,
        )
