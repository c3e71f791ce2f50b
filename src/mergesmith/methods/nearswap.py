"""nearswap: take the other model where it is close to the base, blend towards the base elsewhere."""

from __future__ import annotations

from mergesmith import kernels
from mergesmith.errors import MergeError
from mergesmith.lazy_torch import torch
from mergesmith.methods.registry import REQUIRED, fused_variant, merge_method


@merge_method(
    "nearswap",
    base="required",
    models=(1, 1),
    summary="NearSwap: use the other model's weight where it is within t of the base, interpolate elsewhere.",
    paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    pretty="NearSwap",
    elementwise=True,
)
def nearswap(xs: list[torch.Tensor], base: torch.Tensor, *, t: float = REQUIRED) -> torch.Tensor:
    """omega = clamp(t / max(|b - x|, 1e-6), 0, 1); y = omega x + (1 - omega) b."""
    _one_other(xs)
    delta = xs[0].sub_(base)
    omega = delta.abs().clamp_min_(1e-6).reciprocal_().mul_(t).clamp_(0.0, 1.0)
    return base.addcmul_(delta, omega)


@fused_variant("nearswap")
def nearswap_fused(out: kernels.Raw, xs: list[kernels.Raw], base: kernels.Raw, *, t: float = REQUIRED) -> None:
    """The same merge in one pass over the files' values (`kernels.nearswap`: torch's operations, bit for bit)."""
    _one_other(xs)
    kernels.nearswap(out, xs[0], base, t)


def _one_other(xs: list) -> None:
    if len(xs) != 1:
        raise MergeError(f"nearswap merges the base model with exactly one other model, got {len(xs)} others")
