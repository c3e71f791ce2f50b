"""The weight-space math of LoRA adapters and of their extraction: small pure tensor functions.

Conventions follow peft. A linear adapter has `A` [r, in] and `B` [out, r]; its update in the
[out, in] orientation is `scale * B @ A`. GPT-2's Conv1D stores weights as [in, out]
(`fan_in_fan_out`), so the update is transposed before it is added. An embedding adapter has
`A` [r, vocab] and `B` [dim, r]; its update is `scale * (B @ A).T` ([vocab, dim]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mergesmith.lazy_torch import torch


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """`alpha / r`, or `alpha / sqrt(r)` for rank-stabilised LoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float, transpose: bool) -> torch.Tensor:
    """The weight update in the stored orientation (transposed for Conv1D and embeddings)."""
    delta = (b.float() @ a.float()) * scale
    return delta.T if transpose else delta


def dora(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, out_axis: int) -> torch.Tensor:
    """DoRA: `m * (W + dW) / ||W + dW||`, the norm taken over the input axis for each output unit.

    `out_axis` is the axis of `weight` the magnitude vector runs along (0 for Linear, 1 for Conv1D
    and embeddings, as peft's `fan_in_fan_out` convention puts it).
    """
    merged = weight.float() + delta
    norm = torch.linalg.vector_norm(merged, dim=1 - out_axis)
    factor = magnitude.float() / norm
    return merged * (factor[:, None] if out_axis == 0 else factor[None, :])


@dataclass(frozen=True)
class Factors:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    singular_values: torch.Tensor  # all of them, descending
    rank: int
    error: float  # ||delta - b @ a||_F / ||delta||_F (0 for a zero delta)


def choose_rank(s: torch.Tensor, max_rank: int, energy: float | None, sv_epsilon: float) -> int:
    """Rank to keep: at most `max_rank`, only singular values above `sv_epsilon`, and (with `energy`)
    the smallest rank whose squared singular values reach that share of the total."""
    r = min(max_rank, int(s.numel()))
    if sv_epsilon > 0:
        r = min(r, int((s > sv_epsilon).sum()))
    if energy is not None:
        sq = s.double() ** 2
        total = float(sq.sum())
        if total > 0:
            share = torch.cumsum(sq, 0) / total
            r = min(r, int((share < energy - 1e-12).sum()) + 1)
    return r


def decompose(
    delta: torch.Tensor, max_rank: int, *, energy: float | None = None, sv_epsilon: float = 0.0, distribute: bool = True
) -> Factors:
    """Best rank-r factors of `delta` [out, in] (Eckart-Young): float32 SVD, truncated.

    `distribute` splits sqrt(sigma) into both factors (mergekit's `--distribute-scale`); otherwise
    `B = U_r` and `A = diag(sigma_r) V_r^T`.
    """
    d = delta.float()
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    r = choose_rank(s, max_rank, energy, sv_epsilon)
    if distribute:
        root = s[:r].sqrt()
        b, a = u[:, :r] * root[None, :], root[:, None] * vh[:r]
    else:
        b, a = u[:, :r].clone(), s[:r, None] * vh[:r]
    norm = float(torch.linalg.matrix_norm(d))
    error = float(torch.linalg.matrix_norm(d - b @ a)) / norm if norm > 0 else 0.0
    return Factors(a.contiguous(), b.contiguous(), s.cpu(), r, error)
