"""Data-aware merges: RegMean (Gram matrices of each linear layer's inputs) and Fisher merging
(diagonal Fisher information). Their statistics come from `calibration` (the recipe's
`calibration:` block); the engine hands each tensor its inputs' statistics as `stats`."""

from __future__ import annotations

from mergesmith.errors import MergeError
from mergesmith.lazy_torch import torch
from mergesmith.methods.linear import linear
from mergesmith.methods.registry import PerModel, merge_method


def _mean(xs: list[torch.Tensor], weight: list[float]) -> torch.Tensor:
    """The weighted mean of the models (normalised weights): task arithmetic with weights w_i / Σw."""
    if sum(weight) == 0:
        raise MergeError("the models' weights sum to zero")
    return linear(xs, None, weight=weight, normalize=True)


@merge_method(
    "regmean",
    summary="RegMean: per linear layer, the weights that best reproduce every model's outputs on its own inputs.",
    base="optional",
    models=(1, None),
    paper="https://arxiv.org/abs/2212.09849",
    pretty="RegMean",
    calibration="gram",
)
def regmean(
    xs: list[torch.Tensor], base: torch.Tensor | None, *, stats: list, weight: PerModel = 1.0, alpha: float = 0.9
) -> torch.Tensor:
    """For a linear layer's weight W (out x in) with Gram matrices G_i = Σ x xᵀ of model i's inputs:
    G̃_i = alpha G_i + (1 - alpha) diag(G_i)  (off-diagonals scaled),
    W = (Σ w_i W_i G̃_i) (Σ w_i G̃_i)⁻¹,
    the least-squares merge of min Σ_i w_i ‖X_i Wᵀ − X_i W_iᵀ‖². Every other tensor (embeddings,
    norms, biases), or one without statistics: the weighted mean Σ w_i x_i / Σ w_i. A base model
    changes nothing (its terms cancel); it may be given."""
    ready = xs[0].dim() == 2 and all(s is not None and tuple(s.shape) == (xs[0].shape[1],) * 2 for s in stats)
    if not ready:
        return _mean(xs, weight)
    lhs = torch.zeros(stats[0].shape, dtype=torch.float64)
    rhs = torch.zeros((xs[0].shape[1], xs[0].shape[0]), dtype=torch.float64)
    for x, g, w in zip(xs, stats, weight, strict=True):
        g = g.double()
        g = g * alpha + torch.diag(torch.diagonal(g)) * (1 - alpha)
        lhs.add_(g, alpha=w)
        rhs.add_(g @ x.double().T, alpha=w)
    try:
        merged = torch.linalg.solve(lhs, rhs)
    except RuntimeError:  # singular (inputs that never vary): the least-norm solution
        merged = torch.linalg.lstsq(lhs, rhs).solution
    return merged.T.float()


@merge_method(
    "fisher",
    summary="Fisher merging: each parameter averaged with the models' diagonal Fisher information as weights.",
    base="optional",
    models=(1, None),
    paper="https://arxiv.org/abs/2111.09832",
    pretty="Fisher merging",
    calibration="fisher",
)
def fisher(
    xs: list[torch.Tensor], base: torch.Tensor | None, *, stats: list, weight: PerModel = 1.0, floor: float = 1e-6
) -> torch.Tensor:
    """θ = Σ w_i F̃_i θ_i / Σ w_i F̃_i, F̃_i = max(F_i, floor) elementwise, F_i model i's diagonal
    Fisher (mean over its calibration samples of the squared gradient of the log-likelihood of labels
    drawn from the model itself, calibration/collect.py).
    A tensor without statistics: the weighted mean Σ w_i θ_i / Σ w_i. A base model changes nothing."""
    if any(s is None or tuple(s.shape) != tuple(xs[0].shape) for s in stats):
        return _mean(xs, weight)
    num = torch.zeros(xs[0].shape, dtype=torch.float64)
    den = torch.zeros(xs[0].shape, dtype=torch.float64)
    for x, f, w in zip(xs, stats, weight, strict=True):
        f = f.double().clamp_min(floor) * w
        num.add_(f * x.double())
        den.add_(f)
    return (num / den).float()
