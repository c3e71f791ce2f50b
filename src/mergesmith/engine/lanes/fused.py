"""The fused lane: a method's compiled variant (`registry.fused_variant`) over the files' raw values,
one pass per flat chunk: no torch, no float32 buffers."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from mergesmith import kernels
from mergesmith.dtypes import DTYPE_BYTES, numel
from mergesmith.engine import chunks
from mergesmith.engine.buffers import Buffers
from mergesmith.engine.context import MergeContext, method_params, reported, split
from mergesmith.engine.mapped import Entry
from mergesmith.methods.registry import MergeMethod, get_method
from mergesmith.plan import OutputTensor


def fused_method(ctx: MergeContext, t: OutputTensor, entries: list[Entry | None]) -> MergeMethod | None:
    """The method of `t` when its fused variant can merge these inputs."""
    method = get_method(t.method)
    return method if method.fused is not None and ctx.raw_ready(t, entries) else None


def fused_parts(
    ctx: MergeContext, t: OutputTensor, entries: list[Entry], method: MergeMethod, slot: Callable[[], Buffers]
) -> Iterator[tuple[int, np.ndarray, Buffers]]:
    """Yield (byte offset, checked bytes, slot) of `t` merged by `method`'s fused variant, in flat
    chunks of `CHUNK_ELEMENTS` values, each in an output slot from `slot()`."""
    n = numel(t.shape)
    item = DTYPE_BYTES[t.dtype]
    params = method_params(t)
    step = chunks.CHUNK_ELEMENTS

    def merge(start: int) -> tuple[int, np.ndarray, Buffers]:
        count = min(step, n - start)
        buffers = slot()
        out = kernels.Raw(buffers.raw(0, count * item), t.dtype)
        with ctx.raw_chunk(entries, start, count) as xs:
            base, others = split(t, xs)
            reported(t, lambda: method.call_fused(out, others, base, params))
        return start * item, ctx.checked(t, out.data), buffers

    yield from ctx.in_order(merge, range(0, n, step))
