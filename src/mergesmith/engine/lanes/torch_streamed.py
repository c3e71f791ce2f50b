"""The torch streamed lane: an observe-then-apply method in row chunks. Its observation (the pruners,
`Gram`...) sees a strided sample, then every chunk (thresholds, L1 norms, dot products), then each
chunk is merged with it. See `engine.streaming`."""

from __future__ import annotations

from collections.abc import Iterator

from mergesmith.dtypes import numel
from mergesmith.engine import chunks
from mergesmith.engine.buffers import Target, as_bytes
from mergesmith.engine.context import MergeContext, torch_dtype
from mergesmith.lazy_torch import torch
from mergesmith.methods.registry import get_method
from mergesmith.methods.sparsify import sample_blocks
from mergesmith.plan import OutputTensor


def streams(t: OutputTensor, raw: list[torch.Tensor]) -> bool:
    """Whether `t` goes this way: its method observes then applies, on inputs of the output's shape
    with rows to chunk."""
    return get_method(t.method).streams and len(t.shape) >= 2 and all(tuple(r.shape) == t.shape for r in raw)


def streamed_parts(ctx: MergeContext, t: OutputTensor, raw: list[torch.Tensor], target: Target) -> Iterator:
    n, rows = numel(t.shape), t.shape[0]
    per_row = n // rows if rows else 1
    stream = ctx.streaming(t, n)
    if stream.seen.samples:
        blocks = sample_blocks(n)
        samples = []
        for i, r in enumerate(raw):
            flat = r.reshape(-1)
            parts = [ctx.load(("sample", i, j), flat[a:b]) for j, (a, b) in enumerate(blocks)]
            samples.append(torch.cat(parts) if parts else torch.empty(0, device=ctx.device))
        ctx.sample(t, samples, stream)
    step = max(1, chunks.CHUNK_ELEMENTS // max(per_row, 1)) if stream.seen.streams else rows
    pieces = [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]

    def observe(chunk: tuple[int, int]) -> None:
        r0, r1 = chunk
        ctx.feed(t, [ctx.load(i, r[r0:r1]) for i, r in enumerate(raw)], stream.at(r0 * per_row))

    ctx.observe(stream, observe, pieces)
    item = torch.empty((), dtype=torch_dtype(t.dtype)).element_size()

    def merge(chunk: tuple[int, int]) -> tuple[int, torch.Tensor, object]:
        r0, r1 = chunk
        result = ctx.apply(t, [ctx.load(i, r[r0:r1]) for i, r in enumerate(raw)], stream.at(r0 * per_row))
        dest, token = target(tuple(result.shape))
        dest.copy_(result)
        ctx.checked(t, as_bytes(dest))
        return r0 * per_row * item, dest, token

    yield from ctx.in_order(merge, pieces)
