"""Steps shared by the spectral task-vector methods (tsv, iso_c, iso_cts).

These methods work on the singular vectors of each weight matrix's task vectors, so they need the
whole matrix at once: they run as whole-tensor methods, never in row chunks. Tensors that are not
matrices (norms, biases) have no spectrum worth the name and merge as the mean task vector, as the
papers' reference code does.
"""

from __future__ import annotations

from mergesmith.lazy_torch import torch


def is_matrix(t: torch.Tensor) -> bool:
    return t.dim() == 2


def polar(a: torch.Tensor) -> torch.Tensor:
    """The orthonormal matrix nearest to `a` (orthogonal Procrustes): P Q^T from a = P S Q^T.
    Equivariant to an orthogonal change of basis on the right, so sign flips of singular vectors
    cancel out of every formula built on it."""
    p, _, qt = torch.linalg.svd(a, full_matrices=False)
    return p @ qt


def mean_delta(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Task arithmetic with weights 1/T: the non-matrix part of every spectral method."""
    total = deltas[0]
    for d in deltas[1:]:
        total.add_(d)
    return total.div_(len(deltas))


def deltas_of(xs: list[torch.Tensor], base: torch.Tensor) -> list[torch.Tensor]:
    """The task vectors, in place (the inputs are the method's to overwrite)."""
    return [x.sub_(base) for x in xs]
