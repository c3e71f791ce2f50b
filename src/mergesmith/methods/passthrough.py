from __future__ import annotations

from mergesmith.lazy_torch import torch
from mergesmith.methods.registry import PerModel, merge_method


@merge_method(
    "passthrough",
    base="input",
    models=(1, 1),
    summary="Copy one model's tensor unchanged (optionally scaled): layer stacking, frankenmerges.",
    pretty="Passthrough",
)
def passthrough(xs: list[torch.Tensor], base: None, *, scale: PerModel = 1.0) -> torch.Tensor:
    """y = scale * x for the single input (scale is per-model: filter it by tensor name)."""
    return xs[0] if scale[0] == 1.0 else xs[0].mul_(scale[0])
