"""The vocabulary-mismatch lane: inputs of other shapes than the output (embeddings of models with
different vocabulary sizes) are cut or padded (from the base) to the output's shape, whole."""

from __future__ import annotations

from collections.abc import Iterator

from mergesmith.engine.buffers import Target
from mergesmith.engine.context import MergeContext, torch_dtype
from mergesmith.engine.lanes.torch_chunked import row_parts
from mergesmith.lazy_torch import torch
from mergesmith.methods.registry import get_method
from mergesmith.plan import OutputTensor


def mismatched(t: OutputTensor, raw: list[torch.Tensor]) -> bool:
    """Inputs of other shapes than the output's, unless the method joins them into it (`joins`)."""
    return any(tuple(r.shape) != t.shape for r in raw) and not get_method(t.method).joins


def fit_shape(x: torch.Tensor, shape: tuple[int, ...], filler: torch.Tensor | None) -> torch.Tensor:
    """Cut `x` to `shape` (vocabulary mismatch); rows/columns it lacks come from `filler` (the base)."""
    if tuple(x.shape) == shape:
        return x
    cut = x[tuple(slice(0, min(a, b)) for a, b in zip(x.shape, shape, strict=True))]
    if tuple(cut.shape) == shape:
        return cut
    out = filler.clone() if filler is not None else torch.zeros(shape, dtype=x.dtype)
    out[tuple(slice(0, s) for s in cut.shape)] = cut
    return out


def fitted_parts(ctx: MergeContext, t: OutputTensor, raw: list[torch.Tensor], target: Target) -> Iterator:
    raw = [ctx.owned(r) for r in raw]
    if ctx.dtype is not None:
        raw = [r.to(torch_dtype(ctx.dtype)) for r in raw]
    base_raw = fit_shape(raw[t.base], t.shape, None) if t.base is not None else None
    raw = [fit_shape(r, t.shape, base_raw) for r in raw]
    yield from row_parts(ctx, t, raw, target, t.shape[0] if t.shape else 1)
