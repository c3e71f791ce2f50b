from __future__ import annotations

from mergesmith import kernels
from mergesmith.lazy_torch import torch
from mergesmith.methods.registry import PerModel, fused_variant, merge_method


@merge_method(
    "passthrough",
    base="input",
    models=(1, 1),
    summary="Copy one model's tensor unchanged (optionally scaled): layer stacking, frankenmerges.",
    pretty="Passthrough",
    elementwise=True,
    identity=lambda params: all(s == 1.0 for s in params.get("scale", ())),
)
def passthrough(xs: list[torch.Tensor], base: None, *, scale: PerModel = 1.0) -> torch.Tensor:
    """y = scale * x for the single input (scale is per-model: filter it by tensor name)."""
    return xs[0] if scale[0] == 1.0 else xs[0].mul_(scale[0])


@fused_variant("passthrough")
def passthrough_fused(out: kernels.Raw, xs: list[kernels.Raw], base: None, *, scale: PerModel = 1.0) -> None:
    """The copy with a scale or a change of dtype, in one pass over the file's values (x * scale in
    float32, exact for a scale of 1, then rounded to the output dtype: torch's result, bit for bit)."""
    kernels.linear(out, xs, [scale[0]], None)
