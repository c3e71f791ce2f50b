"""The pure-copy lane: the output tensor is its one input's bytes."""

from __future__ import annotations

from collections.abc import Iterator

from mergesmith.dtypes import DTYPE_BYTES
from mergesmith.engine import chunks
from mergesmith.engine.buffers import Target, as_bytes
from mergesmith.engine.context import MergeContext, method_params
from mergesmith.engine.mapped import Entry
from mergesmith.engine.sinks import CopyJob
from mergesmith.methods.registry import get_method
from mergesmith.plan import OutputTensor


def is_pure_copy(ctx: MergeContext, t: OutputTensor, entries: list[Entry | None]) -> bool:
    """A method that is the identity with these parameters (`MergeMethod.identity`: passthrough
    unscaled), of one input whose dtype (and the recipe's) is the output's, in a plain safetensors
    file: no float32 round trip, the file's bytes are the output's."""
    if len(entries) != 1 or not get_method(t.method).identity(method_params(t)):
        return False
    e = entries[0]
    return e is not None and e.dtype == t.dtype and ctx.dtype in (None, e.dtype) and e.shape == t.shape


def copy_job(ctx: MergeContext, t: OutputTensor, entries: list[Entry | None]) -> CopyJob | None:
    """A pure copy as the input's file location, for a chunk sink: no staging buffer at all."""
    if not is_pure_copy(ctx, t, entries):
        return None
    e = entries[0]
    assert e is not None
    return CopyJob(t.name, t.dtype, ctx.files.fd(e.path), e.offset, e.nbytes)


def copied_parts(ctx: MergeContext, t: OutputTensor, entries: list[Entry | None], target: Target) -> Iterator:
    """The copy read into `target`'s buffers, `COPY_ELEMENTS` values at a time."""
    e = entries[0]
    assert e is not None
    item = DTYPE_BYTES[e.dtype]
    n = e.nbytes // item
    for start in range(0, n, chunks.COPY_ELEMENTS):
        dest, token = target((min(chunks.COPY_ELEMENTS, n - start),))
        ctx.files.read_entry(e, start * item, as_bytes(dest))
        yield start * item, dest, token
