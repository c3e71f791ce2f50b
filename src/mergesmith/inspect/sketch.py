"""Spectra of streamed matrices: a single-pass randomized SVD sketch (Tropp et al. 2017, "Practical
sketching algorithms for low-rank matrix approximation", algorithm 4).

A task vector arrives in row chunks and is never held whole, so the two-pass range finder behind
`torch.svd_lowrank` does not apply. Two sketches are kept instead, both built chunk by chunk:
`Y = A @ Omega` (rows of A times a Gaussian test matrix, m x k) and `W = Psi @ A` (l x n, l = 2k + 1).
Then `Q = qr(Y)`, `X = lstsq(Psi @ Q, W)` and `A ~ Q @ X`, whose SVD gives the top singular values and
left singular vectors. Both sketches are linear in A, so the sketch of a sum of task vectors is the
sum of their sketches. When k reaches min(m, n) the result is exact (up to rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

from mergesmith.lazy_torch import torch

OVERSAMPLE = 8


@dataclass
class Spectrum:
    sigma: list[float]  # the top singular values, largest first
    vectors: torch.Tensor  # m x r: the matching left singular vectors (float64)


class RowSketch:
    """Sketches of `count` matrices of shape (m, n) (and of their sum), fed in row chunks."""

    def __init__(self, count: int, m: int, n: int, rank: int, seed: int) -> None:
        self.m, self.n = m, n
        self.k = min(rank + OVERSAMPLE, m, n)
        self.l = min(2 * self.k + 1, m)
        gen = torch.Generator().manual_seed(seed)
        self.omega = torch.randn(n, self.k, generator=gen)
        self.psi = torch.randn(self.l, m, generator=gen)
        self.y = torch.zeros(count, m, self.k)
        self.w = torch.zeros(count, self.l, n)

    def add(self, start: int, rows: torch.Tensor) -> None:
        """`rows`: (count, r, n) float32, rows `start` .. `start + r` of every matrix."""
        stop = start + rows.shape[1]
        self.y[:, start:stop] = rows @ self.omega
        self.w += self.psi[:, start:stop] @ rows

    def spectra(self, top: int) -> tuple[list[Spectrum], Spectrum]:
        """The top `top` singular values (and vectors) of each matrix, and of their sum."""
        out = [self._solve(self.y[i], self.w[i], top) for i in range(self.y.shape[0])]
        return out, self._solve(self.y.sum(0), self.w.sum(0), top)

    def _solve(self, y: torch.Tensor, w: torch.Tensor, top: int) -> Spectrum:
        q, _ = torch.linalg.qr(y.double())
        x = torch.linalg.lstsq(self.psi.double() @ q, w.double()).solution
        u, s, _ = torch.linalg.svd(x, full_matrices=False)
        r = min(top, s.numel())
        return Spectrum([float(v) for v in s[:r]], q @ u[:, :r])


def rank_for_energy(sigma: list[float], total: float, share: float = 0.9) -> int | None:
    """The fewest singular values whose squares reach `share` of `total` (the squared Frobenius norm),
    or None when the sketched values do not reach it (the rank is above the sketch's)."""
    if total <= 0:
        return 0
    acc = 0.0
    for i, s in enumerate(sigma):
        acc += s * s
        if acc >= share * total * (1 - 1e-6):
            return i + 1
    return None


def subspace_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """||A^T B||_F^2 / r for orthonormal m x r bases: 1 for the same subspace, about r/m for random ones."""
    r = min(a.shape[1], b.shape[1])
    if r == 0:
        return float("nan")
    return float((a[:, :r].T @ b[:, :r]).pow(2).sum()) / r
