"""The torch lane of the other float merges: element-wise methods (`MergeMethod.elementwise`) in
row chunks of at most `CHUNK_ELEMENTS` values, the others (and 0-D tensors) whole."""

from __future__ import annotations

from collections.abc import Iterator

from mergesmith.dtypes import numel
from mergesmith.engine import chunks
from mergesmith.engine.buffers import Target, as_bytes
from mergesmith.engine.context import MergeContext, method_params, torch_dtype
from mergesmith.lazy_torch import torch
from mergesmith.methods.registry import get_method
from mergesmith.plan import OutputTensor


def elementwise(t: OutputTensor) -> bool:
    """True when output element j depends only on input elements j (so row chunks merge alike), as
    `t`'s method declares for its parameters."""
    return get_method(t.method).elementwise(method_params(t))


def chunked_parts(ctx: MergeContext, t: OutputTensor, raw: list[torch.Tensor], target: Target) -> Iterator:
    rows = t.shape[0] if t.shape else 1
    per_row = max(numel(t.shape[1:]), 1)
    step = max(1, chunks.CHUNK_ELEMENTS // per_row) if elementwise(t) and t.shape else rows
    yield from row_parts(ctx, t, raw, target, step)


def row_parts(ctx: MergeContext, t: OutputTensor, raw: list[torch.Tensor], target: Target, step: int) -> Iterator:
    """`t`'s method on `step` rows of the inputs `raw` at a time, on the workers, in order; all rows at
    once: the whole inputs (whatever their shapes: a method that `joins` them)."""
    rows = t.shape[0] if t.shape else 1
    whole = step >= rows or not t.shape
    item = torch.empty((), dtype=torch_dtype(t.dtype)).element_size()
    per_row_bytes = numel(t.shape[1:]) * item if t.shape else item

    def merge(r0: int) -> tuple[int, torch.Tensor, object]:
        r1 = min(rows, r0 + step)
        result = ctx.apply(t, [ctx.load(i, r if whole else r[r0:r1]) for i, r in enumerate(raw)])
        dest, token = target(tuple(result.shape))
        dest.copy_(result)
        ctx.checked(t, as_bytes(dest))
        return r0 * per_row_bytes, dest, token

    yield from ctx.in_order(merge, range(0, rows, step))
