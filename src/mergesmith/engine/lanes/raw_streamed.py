"""The raw streamed lane: an observe-then-apply method (the task-vector family) on the files' raw
values (`kernels.Raw`): the same passes as `torch_streamed` (sample, observe, apply) over chunks of
whole rows, each a compiled kernel, no torch. (The task-vector and ram methods merge onto a base;
the Gram family's may have none.)"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from mergesmith import kernels
from mergesmith.dtypes import DTYPE_BYTES, numel
from mergesmith.engine import chunks
from mergesmith.engine.buffers import Buffers
from mergesmith.engine.context import MergeContext
from mergesmith.engine.mapped import Entry
from mergesmith.methods.registry import get_method
from mergesmith.methods.sparsify import sample_blocks
from mergesmith.plan import OutputTensor


def raw_streams(ctx: MergeContext, t: OutputTensor, entries: list[Entry | None]) -> bool:
    """Whether `t`'s method streams and may run in the raw lane (whether it can, its observation
    says: the task-vector methods' pruners mostly can, the Gram family's inner products can)."""
    return get_method(t.method).streams and 0 < len(t.others) <= kernels.MAX_INPUTS and ctx.raw_ready(t, entries)


def raw_streamed_parts(
    ctx: MergeContext, t: OutputTensor, entries: list[Entry], slot: Callable[[], Buffers]
) -> Iterator[tuple[int, np.ndarray, Buffers]] | None:
    """Runs the sample and observe passes and returns the iterator of (byte offset, checked bytes,
    slot), or None (nothing read) when the observation of `t`'s method cannot run on raw values."""
    n = numel(t.shape)
    rows, item = (t.shape[0] if len(t.shape) >= 2 else 1), DTYPE_BYTES[t.dtype]
    cols = n // rows if rows else 1
    stream = ctx.streaming(t, n, cols)
    if not stream.seen.fusable:
        return None
    if stream.seen.samples:
        samples = []
        for e in entries:  # the fixed sample, as one run of raw values per input
            parts = []
            for a, b in sample_blocks(n):
                part = np.empty((b - a) * DTYPE_BYTES[e.dtype], dtype=np.uint8)
                ctx.files.read_entry(e, a * DTYPE_BYTES[e.dtype], part)
                parts.append(part)
            data = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint8)
            samples.append(kernels.Raw(data, e.dtype, ctx.via(e.dtype)))
        ctx.sample(t, samples, stream)
    step = max(1, chunks.CHUNK_ELEMENTS // max(cols, 1))
    pieces = [(r0 * cols, (min(rows, r0 + step) - r0) * cols) for r0 in range(0, rows, step)]

    def observe(chunk: tuple[int, int]) -> None:
        with ctx.raw_chunk(entries, *chunk) as xs:
            ctx.feed(t, xs, stream.at(chunk[0]))

    ctx.observe(stream, observe, pieces)

    def merge(chunk: tuple[int, int]) -> tuple[int, np.ndarray, Buffers]:
        start, count = chunk
        buffers = slot()
        out = kernels.Raw(buffers.raw(0, count * item), t.dtype)
        with ctx.raw_chunk(entries, start, count) as xs:
            ctx.apply(t, xs, stream.at(start, out))
        return start * item, ctx.checked(t, out.data), buffers

    return ctx.in_order(merge, pieces)
