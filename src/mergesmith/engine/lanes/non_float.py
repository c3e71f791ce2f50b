"""The non-float lane: integer and bool tensors (position ids, masks) are not merged; the output
takes the base's (or the first input's) unchanged."""

from __future__ import annotations

from collections.abc import Iterator

from mergesmith.engine.buffers import Target, as_bytes
from mergesmith.engine.context import MergeContext, torch_dtype
from mergesmith.lazy_torch import torch
from mergesmith.plan import OutputTensor


def non_float(raw: list[torch.Tensor]) -> bool:
    return not raw[0].is_floating_point()


def non_float_parts(ctx: MergeContext, t: OutputTensor, raw: list[torch.Tensor], target: Target) -> Iterator:
    src = ctx.owned(raw[t.base if t.base is not None else 0])
    if ctx.dtype is not None and src.dtype != torch_dtype(ctx.dtype) and src.is_floating_point():
        src = src.to(torch_dtype(ctx.dtype))
    dest, token = target(tuple(src.shape))
    dest.copy_(src)
    ctx.checked(t, as_bytes(dest))
    yield 0, dest, token
