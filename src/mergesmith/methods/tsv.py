"""tsv: Task Singular Vectors merge (TSV-M): each task keeps its top singular directions, and the
task subspaces are decorrelated before they are summed."""

from __future__ import annotations

from mergesmith.lazy_torch import torch
from mergesmith.methods.registry import merge_method
from mergesmith.methods.spectral import deltas_of, is_matrix, mean_delta, polar


@merge_method(
    "tsv",
    base="required",
    summary="Task Singular Vectors: low-rank task vectors with decorrelated (Procrustes) subspaces, summed."
    " Whole-tensor (SVD needs the whole matrix).",
    paper="https://arxiv.org/abs/2412.00081",
    pretty="TSV-M",
)
def tsv(xs: list[torch.Tensor], base: torch.Tensor, *, rank_share: float = 1.0, lambda_: float = 1.0) -> torch.Tensor:
    """Per matrix: delta_i = x_i - b = U_i S_i V_i^T, keep k = max(1, floor(rank_share * r / T)) directions
    of each (r = min(rows, cols), T models; rank_share 1 splits the rank equally, as the paper);
    U = [U_1k ... U_Tk], V = [V_1k ... V_Tk], S = diag(S_1k ... S_Tk);
    y = b + lambda * polar(U) S polar(V)^T, polar(A) = P Q^T for A = P Sigma Q^T (orthogonal Procrustes).
    Other tensors: y = b + lambda * mean_i delta_i."""
    deltas = deltas_of(xs, base)
    if not is_matrix(base):
        return base.add_(mean_delta(deltas), alpha=lambda_)
    k = max(1, int(rank_share * min(base.shape) / len(deltas)))
    us, ss, vs = [], [], []
    for d in deltas:
        u, s, vt = torch.linalg.svd(d, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vt[:k].T)
    merged = polar(torch.cat(us, dim=1)) @ torch.diag(torch.cat(ss)) @ polar(torch.cat(vs, dim=1)).T
    return base.add_(merged, alpha=lambda_)
