"""iso_c and iso_cts: isotropic merging. The summed task vector's spectrum is flattened so that no
direction (and no task living in the weaker directions) is drowned by the dominant ones; iso_cts
also reserves part of the rank for each task's own directions outside the common subspace."""

from __future__ import annotations

from mergesmith.lazy_torch import torch
from mergesmith.methods.registry import merge_method
from mergesmith.methods.spectral import deltas_of, is_matrix, mean_delta, polar

ISO_PAPER = "https://arxiv.org/abs/2502.04959"


def _tol(s: torch.Tensor, shape: torch.Size) -> float:
    """Singular values at or below this are numerical zeros: their directions are arbitrary (any
    orthonormal completion), so they are left out instead of inflated to the mean."""
    return float(s[0]) * max(shape) * torch.finfo(s.dtype).eps if s.numel() else 0.0


@merge_method(
    "iso_c",
    base="required",
    summary="Iso-C: the summed task vector with its singular values all set to their mean."
    " Whole-tensor (SVD needs the whole matrix).",
    paper=ISO_PAPER,
    pretty="Iso-C",
)
def iso_c(xs: list[torch.Tensor], base: torch.Tensor, *, lambda_: float = 1.0) -> torch.Tensor:
    """Per matrix: sum_i (x_i - b) = U S V^T, sigma = mean of all r = min(rows, cols) singular values;
    y = b + lambda * sigma U_n V_n^T over the n numerically non-zero directions.
    Other tensors: y = b + lambda * mean_i (x_i - b)."""
    deltas = deltas_of(xs, base)
    if not is_matrix(base):
        return base.add_(mean_delta(deltas), alpha=lambda_)
    total = deltas[0]
    for d in deltas[1:]:
        total.add_(d)
    u, s, vt = torch.linalg.svd(total, full_matrices=False)
    n = int((s > _tol(s, base.shape)).sum())
    return base.add_(u[:, :n] @ vt[:n], alpha=lambda_ * float(s.mean()))


@merge_method(
    "iso_cts",
    base="required",
    summary="Iso-CTS: common subspace of the summed task vector plus each task's own directions,"
    " orthogonalised, isotropic spectrum. Whole-tensor (SVD needs the whole matrix).",
    paper=ISO_PAPER,
    pretty="Iso-CTS",
)
def iso_cts(
    xs: list[torch.Tensor], base: torch.Tensor, *, common_fraction: float = 0.8, lambda_: float = 1.0
) -> torch.Tensor:
    """Per matrix (r = min(rows, cols), T models): s = round((r - floor(common_fraction r)) / T) task-specific
    directions per task (at most r / T), k = r - T s common ones. sum_i delta_i = U S V^T, common U_k, S_k, V_k;
    each task: delta_i - U_k U_k^T delta_i = U_i' S_i' V_i'^T, its top s; U = [U_k, U_1s' ... U_Ts'], V alike;
    sigma = mean of [S_k, S_1s' ... S_Ts']; y = b + lambda * sigma polar(U) polar(V)^T (polar as in tsv;
    directions with numerically zero singular values left out).
    Other tensors: y = b + lambda * mean_i delta_i."""
    deltas = deltas_of(xs, base)
    if not is_matrix(base):
        return base.add_(mean_delta(deltas), alpha=lambda_)
    r, t = min(base.shape), len(deltas)
    per_task = min(round((r - int(common_fraction * r)) / t), r // t)
    k = r - t * per_task
    u, s, vt = torch.linalg.svd(sum(deltas), full_matrices=False)
    us, ss, vs = [u[:, :k]], [s[:k]], [vt[:k].T]
    if per_task:
        for d in deltas:
            own = d.sub_(us[0] @ (us[0].T @ d))
            ui, si, vti = torch.linalg.svd(own, full_matrices=False)
            us.append(ui[:, :per_task])
            ss.append(si[:per_task])
            vs.append(vti[:per_task].T)
    sigma = float(torch.cat(ss).mean())
    live = torch.cat(ss) > _tol(s, base.shape)
    u_all, v_all = torch.cat(us, dim=1)[:, live], torch.cat(vs, dim=1)[:, live]
    return base.add_(polar(u_all) @ polar(v_all).T, alpha=lambda_ * sigma)
