"""Executing a plan: stream output tensors through their merge methods, in bounded memory.

Inputs are zero-copy views of the memory-mapped files (`engine.mapped`). Each is converted (cast
to the recipe's `dtype`, if any, then to float32) into a reusable buffer, the method runs on those
buffers in place, and the result is cast into a reusable output buffer that a writer thread puts
straight into its shard while the next tensor is computed. Methods that work element by element
(as they declare: `MergeMethod.elementwise`) run on row chunks of at most `CHUNK_ELEMENTS` values,
so memory holds a few chunks whatever the model size; the others get whole tensors. See
docs/performance.md.

Each tensor takes one lane (`engine.lanes`), picked here from its method's declaration and where
its inputs lie. Three lanes need no torch, and are tried first: pure copies (the input file's
bytes go to the output file), methods with a fused variant (a compiled kernel over the files' raw
values), and the task-vector methods given raw values (the same streamed passes, each a compiled
kernel). A merge made only of those never imports torch (`lazy_torch`).

The sink (`engine.sinks`) says what the receiver takes: a `ChunkSink` gets every lane's chunks, a
`TensorSink` whole tensors.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

from mergesmith.calibration import Statistics
from mergesmith.engine.buffers import Buffers, Target, as_bytes
from mergesmith.engine.context import MergeContext, torch_dtype
from mergesmith.engine.lanes.copy import copied_parts, copy_job, is_pure_copy
from mergesmith.engine.lanes.fused import fused_method, fused_parts
from mergesmith.engine.lanes.non_float import non_float, non_float_parts
from mergesmith.engine.lanes.raw_streamed import raw_streamed_parts, raw_streams
from mergesmith.engine.lanes.torch_chunked import chunked_parts
from mergesmith.engine.lanes.torch_streamed import streamed_parts, streams
from mergesmith.engine.lanes.vocab import fitted_parts, mismatched
from mergesmith.engine.mapped import Entry
from mergesmith.engine.memory import keep_freed_memory
from mergesmith.engine.sinks import Sink, TensorSink, sink_kind
from mergesmith.engine.writer import Writer
from mergesmith.lazy_torch import torch
from mergesmith.plan import OutputTensor, Plan
from mergesmith.sources.reader import TensorSource


class Executor:
    def __init__(
        self,
        plan: Plan,
        readers: Mapping[str, TensorSource],
        *,
        dtype: str | None = None,
        device: str = "cpu",
        seed: int = 0,
        statistics: Statistics | None = None,
    ) -> None:
        self.plan = plan
        self.ctx = MergeContext(readers, dtype, device, seed, statistics)
        self._torch_threads: int | None = None  # torch's thread count before `_enter_torch`

    def compute(self, t: OutputTensor) -> torch.Tensor:
        """The whole output tensor, freshly allocated (for callers that keep it)."""
        out_dtype = torch_dtype(t.dtype)
        out = torch.empty(t.shape, dtype=out_dtype)
        flat = out.view(-1)
        scratch = Buffers()
        for offset, part, _ in self._parts(t, lambda shape: (scratch.get("out", shape, out_dtype), None)):
            start = offset // out.element_size()
            flat[start : start + part.numel()].copy_(part.reshape(-1))
        return out

    def _parts(self, t: OutputTensor, target: Target, entries: list[Entry | None] | None = None) -> Iterator:
        """Yield (byte offset, output chunk, token) for `t` from a lane that reads no raw values;
        chunks are cast into the buffers that `target(shape)` gives as (buffer, token), and checked.
        `entries`: where the inputs lie, when the caller has them already."""
        ctx = self.ctx
        entries = ctx.entries(t) if entries is None else entries
        if is_pure_copy(ctx, t, entries):  # the input's bytes are the output's: no float32 round trip
            yield from copied_parts(ctx, t, entries, target)
            return
        raw = ctx.views(t)
        if non_float(raw):
            yield from non_float_parts(ctx, t, raw, target)
        elif streams(t, raw):
            yield from streamed_parts(ctx, t, raw, target)
        elif mismatched(t, raw):
            yield from fitted_parts(ctx, t, raw, target)
        else:
            yield from chunked_parts(ctx, t, raw, target)

    def run(self, sink: Sink, progress: Callable[[OutputTensor], None] | None = None) -> None:
        """Every planned tensor into `sink`: a `TensorSink` gets each whole, a `ChunkSink` gets them
        streamed through the lanes (pure copies as copy jobs, the kernels' lanes, torch)."""
        if sink_kind(sink) is TensorSink:
            for t in self.plan.tensors:
                sink.put_tensor(t.name, self.compute(t))
                if progress is not None:
                    progress(t)
            return
        ctx = self.ctx
        keep_freed_memory()
        threads = _cpu_threads()
        if ctx.on_cpu and threads > 1:
            # Chunks run on worker threads, each op on its own thread (`_enter_torch`): on 2 cores
            # that merges two chunks at once, where two intra-op threads per op gained nothing (measured).
            ctx.workers = min(threads, 8)
            ctx.pool = ThreadPoolExecutor(ctx.workers, thread_name_prefix="mergesmith-compute")
        writer = Writer(sink, slots=2 * ctx.workers + 2)
        ctx.sink = sink
        try:
            tensors = self.plan.tensors
            following = ctx.entries(tensors[0]) if tensors else []
            ctx.prefetch(following)
            for k, t in enumerate(tensors):
                entries = following  # looked up once per tensor, a tensor ahead
                if k + 1 < len(tensors):
                    following = ctx.entries(tensors[k + 1])
                    ctx.prefetch(following)
                if (job := copy_job(ctx, t, entries)) is not None:
                    writer.copy(job)
                elif (method := fused_method(ctx, t, entries)) is not None:
                    for offset, data, slot in fused_parts(ctx, t, entries, method, writer.slot):
                        writer.put(t.name, offset, data, t.dtype, slot)
                elif raw_streams(ctx, t, entries) and (parts := raw_streamed_parts(ctx, t, entries, writer.slot)):
                    for offset, data, slot in parts:
                        writer.put(t.name, offset, data, t.dtype, slot)
                else:
                    self._enter_torch()
                    out_dtype = torch_dtype(t.dtype)

                    def target(shape: tuple[int, ...], dt: torch.dtype = out_dtype) -> tuple[torch.Tensor, Buffers]:
                        slot = writer.slot()
                        return slot.get(0, shape, dt), slot

                    for offset, part, slot in self._parts(t, target, entries):
                        writer.put(t.name, offset, as_bytes(part), t.dtype, slot)
                if progress is not None:
                    progress(t)
        finally:
            if ctx.pool is not None:
                ctx.pool.shutdown(wait=True, cancel_futures=True)
                ctx.pool = None
            ctx.sink = None
            if self._torch_threads is not None:
                torch.set_num_threads(self._torch_threads)
                self._torch_threads = None
            writer.finish()

    def _enter_torch(self) -> None:
        """Before the first tensor that needs torch: with worker threads, one op thread each."""
        if self.ctx.pool is not None and self._torch_threads is None:
            self._torch_threads = torch.get_num_threads()
            torch.set_num_threads(1)


def _cpu_threads() -> int:
    """The threads to compute with: OMP_NUM_THREADS if set (as torch counts them), else the CPUs
    this process may run on."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
