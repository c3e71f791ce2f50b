"""Executing a plan: stream output tensors through their merge methods, in bounded memory.

Inputs are zero-copy views of the memory-mapped files (`engine.mapped`). Each is converted (cast
to the recipe's `dtype`, if any, then to float32) into a reusable buffer, the method runs on those
buffers in place, and the result is cast into a reusable output buffer that a writer thread puts
straight into its shard while the next tensor is computed. Methods that work element by element
(`ELEMENTWISE`) run on row chunks of at most `CHUNK_ELEMENTS` values, so memory holds a few chunks
whatever the model size; the others get whole tensors. See docs/performance.md.

Three kinds of tensor need no torch, and are done first without it: pure copies (the input file's
bytes go to the output file), methods with a fused variant (`registry.fused_variant`: a compiled
kernel over the files' raw values), and the task-vector methods given raw values (the raw lane of
`methods.task_vectors`: the same streamed passes, each a compiled kernel). A merge made only of
those never imports torch (`lazy_torch`).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from mergesmith import kernels
from mergesmith.engine.mapped import Entry, MappedFiles, read_entries, read_views
from mergesmith.engine.memory import keep_freed_memory
from mergesmith.engine.sinks import ChunkJob, ChunkSink, CopyJob, Sink, TensorSink, sink_kind
from mergesmith.errors import MergeError
from mergesmith.lazy_torch import torch
from mergesmith.methods.registry import MergeMethod, get_method
from mergesmith.methods.sparsify import sample_blocks
from mergesmith.methods.task_vectors import Streaming
from mergesmith.plan import OutputTensor, Plan
from mergesmith.rng import TensorRNG
from mergesmith.sources.model import DTYPE_BYTES
from mergesmith.sources.reader import TensorSource

#: Float values per chunk of a streamed merge (2 MiB of float32 per input: the working set of two
#: workers stays in cache; 512K measured at least as fast as 1M and 256K on medium ties and dare_ties).
CHUNK_ELEMENTS = 1 << 19
#: Values per chunk of a pure copy (written straight from the input file's mapped pages).
COPY_ELEMENTS = 1 << 23


#: `target(shape)` -> (an output buffer of that shape, a token the writer gives back with it)
Target = Callable[[tuple[int, ...]], tuple["torch.Tensor", object]]


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


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


def elementwise(t: OutputTensor) -> bool:
    """True when output element j depends only on input elements j (so row chunks merge alike), as
    `t`'s method declares for its parameters."""
    return get_method(t.method).elementwise(method_params(t))


class Buffers:
    """Growable scratch memory, one buffer per slot, reused from tensor to tensor (no page faults):
    `raw` gives bytes (NumPy, CPU only), `get` a torch view of a shape and dtype."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self._store: dict[object, object] = {}  # slot -> uint8 NumPy array (CPU) or torch tensor (device)
        self._views: dict[tuple, torch.Tensor] = {}  # (slot, shape, dtype) -> view of the slot's buffer

    def _buffer(self, slot: object, nbytes: int):
        buf = self._store.get(slot)
        if buf is None or len(buf) < nbytes:
            self._store.pop(slot, None)
            self._views = {k: v for k, v in self._views.items() if k[0] != slot}
            if self.device == "cpu":
                buf = np.empty(nbytes, dtype=np.uint8)
            else:
                buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._store[slot] = buf
        return buf

    def raw(self, slot: object, nbytes: int) -> np.ndarray:
        return self._buffer(slot, nbytes)[:nbytes]

    def get(self, slot: object, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        view = self._views.get((slot, shape, dtype))
        if view is not None:  # the same chunk shape as before: no view chain to rebuild
            return view
        n = _numel(shape)
        nbytes = max(n * dtype.itemsize, 1)
        buf = self._buffer(slot, nbytes)
        whole = torch.from_numpy(buf) if isinstance(buf, np.ndarray) else buf
        view = whole[:nbytes].view(dtype)[:n].view(shape)
        if len(self._views) < 256:
            self._views[(slot, shape, dtype)] = view
        return view


class _Written(NamedTuple):
    """A chunk queued for the writer thread, and the output slot whose memory holds its bytes."""

    job: ChunkJob
    slot: Buffers


class _Writer:
    """A thread that hands finished chunks to the sink while the next ones are computed. Output
    buffers come from a small ring; a slot is reused only once its bytes are in the sink. Pure copies
    go to the sink as `CopyJob`s (file descriptor, offset), read straight into its output."""

    def __init__(self, sink: ChunkSink, slots: int = 3) -> None:
        self.sink = sink
        self.free: queue.Queue[Buffers] = queue.Queue()
        for _ in range(slots):
            self.free.put(Buffers())
        self.jobs: queue.Queue[_Written | CopyJob | None] = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, daemon=True, name="mergesmith-writer")
        self.thread.start()

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                if self.error is None:
                    if isinstance(job, CopyJob):
                        self.sink.copy_file(job)
                    else:
                        self.sink.write_chunk(job.job)
            except BaseException as err:  # re-raised in the computing thread
                self.error = err
            if isinstance(job, _Written):
                self.free.put(job.slot)  # the chunk's bytes are in the file: its slot is free again

    def slot(self) -> Buffers:
        if self.error is not None:
            raise self.error
        return self.free.get()

    def put(self, name: str, offset: int, data: np.ndarray, dtype: str, slot: Buffers) -> None:
        """Bytes `data` (in `slot`'s memory, checked) of tensor `name`, of `dtype`, at byte `offset` of it."""
        self.jobs.put(_Written(ChunkJob(name, offset, data, dtype), slot))

    def copy(self, job: CopyJob) -> None:
        if self.error is not None:
            raise self.error
        self.jobs.put(job)

    def finish(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


class Executor:
    def __init__(
        self,
        plan: Plan,
        readers: Mapping[str, TensorSource],
        *,
        dtype: str | None = None,
        device: str = "cpu",
        seed: int = 0,
    ) -> None:
        self.plan = plan
        self.readers = readers
        self.dtype = dtype  # the recipe's: inputs are rounded through it
        self.device = device
        self.seed = seed
        self.files = MappedFiles()
        self._local = threading.local()  # scratch buffers, one set per computing thread
        self._pool: ThreadPoolExecutor | None = None
        self.workers = 1
        self._sink: ChunkSink | None = None  # while `run` streams into one: its `check_chunk` runs in the workers
        self._torch_threads: int | None = None  # torch's thread count before `_enter_torch`

    @property
    def on_cpu(self) -> bool:
        return self.device == "cpu"

    @property
    def buffers(self) -> Buffers:
        """This thread's float32 scratch buffers."""
        if not hasattr(self._local, "buffers"):
            self._local.buffers = Buffers(self.device)
        return self._local.buffers

    @property
    def staging(self) -> Buffers:
        """This thread's buffers for the raw bytes read from the files."""
        if not hasattr(self._local, "staging"):
            self._local.staging = Buffers()
        return self._local.staging

    def _in_order(self, work: Callable, items: Iterable) -> Iterator:
        """`work(item)` for each item, run by the worker threads (a few items ahead), results in order.

        Chunks of a tensor are independent (pruners key their state by chunk), and the maths
        releases the GIL (torch, NumPy, the C kernels, pread): two cores merge two chunks at once."""
        if self._pool is None:
            for item in items:
                yield work(item)
            return
        pending: deque = deque()
        for item in items:
            pending.append(self._pool.submit(work, item))
            if len(pending) >= 2 * self.workers:  # queued work for a worker that finishes early
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    # -- the maths of one (chunk of a) tensor ------------------------------------------------

    def _apply(self, t: OutputTensor, xs: list, stream: Streaming | None = None) -> torch.Tensor | None:
        """`t`'s method on its inputs `xs` (float32 tensors, or `kernels.Raw` values in the raw lane)."""
        base, others = _split(t, xs)
        method = get_method(t.method)
        rng = TensorRNG(self.seed, t.name, tuple(x.model for x in t.others))
        return _reported(t, lambda: method(others, base, method_params(t), rng=rng, stream=stream))

    def _load(self, slot: object, raw: torch.Tensor) -> torch.Tensor:
        """`raw` (a view of the file) as float32 in scratch buffer `slot`, rounded through `dtype`.

        A view of a mapped file is first read with pread into a reused staging buffer: faulting the
        mapped pages in (and dropping them again) costs several times more than the copy."""
        mapped = raw.is_contiguous() and self.files.maps(raw)
        if mapped:  # read, never faulted in: nothing to release afterwards
            staged = self.staging.get(slot, tuple(raw.shape), raw.dtype)
            self.files.read_into(raw, staged)
            raw = staged
        if self.dtype is not None and raw.dtype != torch_dtype(self.dtype):
            view, raw = raw, raw.to(torch_dtype(self.dtype))
            if not mapped:
                self.files.release(view)
        buf = self.buffers.get(slot, tuple(raw.shape), torch.float32)
        buf.copy_(raw)
        if not mapped:
            self.files.release(raw)
        return buf

    def _owned(self, raw: torch.Tensor) -> torch.Tensor:
        """`raw` in memory of its own, read with pread when it is a view of a mapped file (so that
        whole-tensor paths never touch the map either: see `_raw_chunk`)."""
        if not (raw.is_contiguous() and self.files.maps(raw)):
            return raw
        out = torch.empty(raw.shape, dtype=raw.dtype)
        self.files.read_into(raw, out)
        return out

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

    def _entries(self, t: OutputTensor) -> list[Entry | None]:
        """Where the inputs of `t` lie in their files (None for those not in plain safetensors)."""
        return read_entries(self.files, self.readers, [(x.model, x.name) for x in t.inputs])

    def _views(self, t: OutputTensor) -> list[torch.Tensor]:
        """The inputs of `t`: views of the mapped files (or loaded tensors, as fallback)."""
        return read_views(self.files, self.readers, [(x.model, x.name) for x in t.inputs])

    def _pure_copy(self, t: OutputTensor, entries: list[Entry | None]) -> bool:
        """A method that is the identity with these parameters (`MergeMethod.identity`: passthrough
        unscaled), of one input whose dtype (and the recipe's) is the output's, in a
        plain safetensors file: no float32 round trip, the writer copies the file's bytes."""
        if len(entries) != 1 or not get_method(t.method).identity(method_params(t)):
            return False
        e = entries[0]
        return e is not None and e.dtype == t.dtype and self.dtype in (None, e.dtype) and e.shape == t.shape

    def _raw_ready(self, t: OutputTensor, entries: list[Entry | None]) -> bool:
        """Whether the kernels can merge `t` from its files' raw values: on the CPU, every input in a
        plain safetensors file with the output's shape, every dtype one the kernels read."""
        kinds = kernels.raw_kinds()
        if not self.on_cpu or t.dtype not in kinds or self.dtype not in (None, *kinds):
            return False
        return all(e is not None and e.dtype in kinds and e.shape == t.shape for e in entries)

    def _fused(self, t: OutputTensor, entries: list[Entry | None]) -> MergeMethod | None:
        """The method of `t` when its fused variant can merge these inputs: no torch, no float32
        buffers, one pass per chunk."""
        method = get_method(t.method)
        return method if method.fused is not None and self._raw_ready(t, entries) else None

    def _raw_streaming(self, t: OutputTensor, entries: list[Entry | None]) -> bool:
        """Whether `t`'s method streams and may run in the raw lane (whether it can, its stream's state
        says after the sample phase: the task-vector methods' pruners mostly can)."""
        others = len(entries) - 1
        return (
            get_method(t.method).streams
            and t.base is not None
            and 0 < others <= kernels.MAX_INPUTS
            and self._raw_ready(t, entries)
        )

    def _prefetch(self, entries: list[Entry | None]) -> None:
        """Ask the kernel to read these inputs (the next tensor's) into the page cache now, in the
        background, so their reads find them there (models not yet cached, or evicted since)."""
        advise = getattr(os, "posix_fadvise", None)
        if advise is None:
            return
        for e in entries:
            if e is not None:
                with contextlib.suppress(OSError):
                    advise(self.files.fd(e.path), e.offset, e.nbytes, os.POSIX_FADV_WILLNEED)

    def _copy_job(self, t: OutputTensor, entries: list[Entry | None], writer: _Writer) -> bool:
        """Hand a pure copy to the writer as the input's file location: no staging buffer at all."""
        if not self._pure_copy(t, entries):
            return False
        e = entries[0]
        writer.copy(CopyJob(t.name, t.dtype, self.files.fd(e.path), e.offset, e.nbytes))
        return True

    def _checked(self, t: OutputTensor, data: np.ndarray) -> np.ndarray:
        """`data` (a chunk of `t`) after the sink's check (the audit's NaN/Inf scan), run here in the
        computing worker, beside the other worker rather than in the one writing thread."""
        if self._sink is not None:
            self._sink.check_chunk(t.name, data, t.dtype)
        return data

    def _via(self, dtype: str) -> str | None:
        """The dtype raw values of `dtype` are rounded through when read: the recipe's, if another."""
        return self.dtype if self.dtype not in (None, dtype) else None

    @contextlib.contextmanager
    def _raw_chunk(self, entries: list[Entry], start: int, count: int):
        """The inputs' values `start` .. `start + count` as `kernels.Raw`, in the order of `entries`,
        read with pread into this thread's reused staging buffers. Reading them through the files'
        maps saved 1-2 s of system time on medium linear, but a file truncated by another process
        mid-merge then kills the merge with SIGBUS; a short pread is one error naming the file."""
        xs = []
        for i, e in enumerate(entries):
            item = DTYPE_BYTES[e.dtype]
            buf = self.staging.raw(("raw", i), count * item)
            self.files.read_entry(e, start * item, buf)
            xs.append(kernels.Raw(buf, e.dtype, self._via(e.dtype)))
        yield xs

    def _fused_parts(self, t: OutputTensor, entries: list[Entry], method: MergeMethod, writer: _Writer):
        """Yield (byte offset, checked bytes, slot) of `t` merged by `method`'s fused variant, in flat
        chunks of `CHUNK_ELEMENTS` values."""
        n = _numel(t.shape)
        item = DTYPE_BYTES[t.dtype]
        params = method_params(t)

        def merge(start: int) -> tuple[int, np.ndarray, Buffers]:
            count = min(CHUNK_ELEMENTS, n - start)
            slot = writer.slot()
            out = kernels.Raw(slot.raw(0, count * item), t.dtype)
            with self._raw_chunk(entries, start, count) as xs:
                base, others = _split(t, xs)
                _reported(t, lambda: method.call_fused(out, others, base, params))
            return start * item, self._checked(t, out.data), slot

        yield from self._in_order(merge, range(0, n, CHUNK_ELEMENTS))

    def _observe(self, stream: Streaming, observe: Callable, chunks: list) -> None:
        """The observe passes of a streamed merge (`observe(chunk)` on the workers, as often as the
        pruners ask), the pruners' `finish`, then the stream set to "apply"."""
        run = map if self._pool is None else self._pool.map  # the pruners finish side by side
        stream.phase = "observe"
        while stream.needs_observe:
            for _ in self._in_order(observe, chunks):
                pass
            if stream.finish(run):
                break
        else:
            stream.finish(run)
        stream.phase = "apply"

    def _raw_streamed(self, t: OutputTensor, entries: list[Entry], writer: _Writer):
        """`_streamed` in the raw lane: the same passes (sample, observe, apply) over chunks of whole
        rows, the inputs given to the method as raw values. Runs the sample phase and returns the
        parts' iterator, or None (nothing written) when a pruner of `t` cannot run there."""
        n = _numel(t.shape)
        rows, item = (t.shape[0] if len(t.shape) >= 2 else 1), DTYPE_BYTES[t.dtype]
        cols = n // rows if rows else 1
        stream = Streaming(n, cols=cols)
        samples = []
        for e in entries:  # the fixed sample, as one run of raw values per input
            parts = []
            for a, b in sample_blocks(n):
                part = np.empty((b - a) * DTYPE_BYTES[e.dtype], dtype=np.uint8)
                self.files.read_entry(e, a * DTYPE_BYTES[e.dtype], part)
                parts.append(part)
            data = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint8)
            samples.append(kernels.Raw(data, e.dtype, self._via(e.dtype)))
        self._apply(t, samples, stream)
        if not stream.fusable:
            return None
        step = max(1, CHUNK_ELEMENTS // max(cols, 1))
        chunks = [(r0 * cols, (min(rows, r0 + step) - r0) * cols) for r0 in range(0, rows, step)]

        def observe(chunk: tuple[int, int]) -> None:
            with self._raw_chunk(entries, *chunk) as xs:
                self._apply(t, xs, stream.at(chunk[0]))

        self._observe(stream, observe, chunks)

        def merge(chunk: tuple[int, int]) -> tuple[int, np.ndarray, Buffers]:
            start, count = chunk
            slot = writer.slot()
            out = kernels.Raw(slot.raw(0, count * item), t.dtype)
            with self._raw_chunk(entries, start, count) as xs:
                self._apply(t, xs, stream.at(start, out))
            return start * item, self._checked(t, out.data), slot

        return self._in_order(merge, chunks)

    def _parts(self, t: OutputTensor, target: Target, entries: list[Entry | None] | None = None):
        """Yield (byte offset, output chunk, token) for `t`; chunks are cast into the buffers that
        `target(shape)` gives as (buffer, token), and checked (`_checked`).
        `entries`: where the inputs lie, when the caller has them already."""
        entries = self._entries(t) if entries is None else entries
        out_dtype = torch_dtype(t.dtype)
        if self._pure_copy(t, entries):  # the input's bytes are the output's: no float32 round trip
            e = entries[0]
            item = DTYPE_BYTES[e.dtype]
            n = e.nbytes // item
            for start in range(0, n, COPY_ELEMENTS):
                dest, token = target((min(COPY_ELEMENTS, n - start),))
                self.files.read_entry(e, start * item, _bytes(dest))
                yield start * item, dest, token
            return
        raw = self._views(t)
        if not raw[0].is_floating_point():
            src = self._owned(raw[t.base if t.base is not None else 0])
            if self.dtype is not None and src.dtype != torch_dtype(self.dtype) and src.is_floating_point():
                src = src.to(torch_dtype(self.dtype))
            dest, token = target(tuple(src.shape))
            dest.copy_(src)
            self._checked(t, _bytes(dest))
            yield 0, dest, token
            return
        if get_method(t.method).streams and len(t.shape) >= 2 and all(tuple(r.shape) == t.shape for r in raw):
            yield from self._streamed(t, raw, target)
            return
        if any(tuple(r.shape) != t.shape for r in raw):  # vocabulary mismatch: whole tensors
            raw = [self._owned(r) for r in raw]
            if self.dtype is not None:
                raw = [r.to(torch_dtype(self.dtype)) for r in raw]
            base_raw = fit_shape(raw[t.base], t.shape, None) if t.base is not None else None
            raw = [fit_shape(r, t.shape, base_raw) for r in raw]
            rows = t.shape[0] if t.shape else 1
            step = rows
        else:
            rows = t.shape[0] if t.shape else 1
            per_row = max(_numel(t.shape[1:]), 1)
            step = max(1, CHUNK_ELEMENTS // per_row) if elementwise(t) and t.shape else rows
        item = torch.empty((), dtype=out_dtype).element_size()
        per_row_bytes = _numel(t.shape[1:]) * item if t.shape else item

        def merge(r0: int) -> tuple[int, torch.Tensor, object]:
            r1 = min(rows, r0 + step)
            result = self._apply(t, [self._load(i, r[r0:r1] if t.shape else r) for i, r in enumerate(raw)])
            dest, token = target(tuple(result.shape))
            dest.copy_(result)
            self._checked(t, _bytes(dest))
            return r0 * per_row_bytes, dest, token

        yield from self._in_order(merge, range(0, rows, step))

    def _streamed(self, t: OutputTensor, raw: list[torch.Tensor], target: Target):
        """A task-vector merge in row chunks: the pruners see a strided sample, then every chunk
        (thresholds, L1 norms), then each chunk is merged. See `methods.task_vectors.Streaming`."""
        n, rows = _numel(t.shape), t.shape[0]
        per_row = n // rows if rows else 1
        stream = Streaming(n)
        blocks = sample_blocks(n)
        samples = []
        for i, r in enumerate(raw):
            flat = r.reshape(-1)
            parts = [self._load(("sample", i, j), flat[a:b]) for j, (a, b) in enumerate(blocks)]
            samples.append(torch.cat(parts) if parts else torch.empty(0, device=self.device))
        self._apply(t, samples, stream)
        step = max(1, CHUNK_ELEMENTS // max(per_row, 1)) if stream.streams else rows
        chunks = [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]

        def observe(chunk: tuple[int, int]) -> None:
            r0, r1 = chunk
            self._apply(t, [self._load(i, r[r0:r1]) for i, r in enumerate(raw)], stream.at(r0 * per_row))

        self._observe(stream, observe, chunks)
        item = torch.empty((), dtype=torch_dtype(t.dtype)).element_size()

        def merge(chunk: tuple[int, int]) -> tuple[int, torch.Tensor, object]:
            r0, r1 = chunk
            result = self._apply(t, [self._load(i, r[r0:r1]) for i, r in enumerate(raw)], stream.at(r0 * per_row))
            dest, token = target(tuple(result.shape))
            dest.copy_(result)
            self._checked(t, _bytes(dest))
            return r0 * per_row * item, dest, token

        yield from self._in_order(merge, chunks)

    # -- the stream ------------------------------------------------------------------------

    def run(self, sink: Sink, progress: Callable[[OutputTensor], None] | None = None) -> None:
        """Every planned tensor into `sink`: a `TensorSink` gets each whole, a `ChunkSink` gets them
        streamed through the lanes (pure copies as copy jobs, the kernels' lanes, torch)."""
        if sink_kind(sink) is TensorSink:
            for t in self.plan.tensors:
                sink.put_tensor(t.name, self.compute(t))
                if progress is not None:
                    progress(t)
            return
        keep_freed_memory()
        threads = _cpu_threads()
        if self.on_cpu and threads > 1:
            # Chunks run on worker threads, each op on its own thread (`_enter_torch`): on 2 cores
            # that merges two chunks at once, where two intra-op threads per op gained nothing (measured).
            self.workers = min(threads, 8)
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="mergesmith-compute")
        writer = _Writer(sink, slots=2 * self.workers + 2)
        self._sink = sink
        try:
            tensors = self.plan.tensors
            following = self._entries(tensors[0]) if tensors else []
            self._prefetch(following)
            for k, t in enumerate(tensors):
                entries = following  # looked up once per tensor, a tensor ahead
                if k + 1 < len(tensors):
                    following = self._entries(tensors[k + 1])
                    self._prefetch(following)
                if self._copy_job(t, entries, writer):
                    pass
                elif (method := self._fused(t, entries)) is not None:
                    for offset, data, slot in self._fused_parts(t, entries, method, writer):
                        writer.put(t.name, offset, data, t.dtype, slot)
                elif self._raw_streaming(t, entries) and (parts := self._raw_streamed(t, entries, writer)) is not None:
                    for offset, data, slot in parts:
                        writer.put(t.name, offset, data, t.dtype, slot)
                else:
                    self._enter_torch()
                    out_dtype = torch_dtype(t.dtype)

                    def target(shape: tuple[int, ...], dt: torch.dtype = out_dtype) -> tuple[torch.Tensor, Buffers]:
                        slot = writer.slot()
                        return slot.get(0, shape, dt), slot

                    for offset, part, slot in self._parts(t, target, entries):
                        writer.put(t.name, offset, _bytes(part), t.dtype, slot)
                if progress is not None:
                    progress(t)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
            self._sink = None
            if self._torch_threads is not None:
                torch.set_num_threads(self._torch_threads)
                self._torch_threads = None
            writer.finish()

    def _enter_torch(self) -> None:
        """Before the first tensor that needs torch: with worker threads, one op thread each."""
        if self._pool is not None and self._torch_threads is None:
            self._torch_threads = torch.get_num_threads()
            torch.set_num_threads(1)


def _cpu_threads() -> int:
    """The threads to compute with: OMP_NUM_THREADS if set (as torch counts them), else the CPUs
    this process may run on."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _split(t: OutputTensor, xs: list) -> tuple:
    """(the base's input or None, the others) of `t`'s inputs `xs`."""
    return (xs[t.base] if t.base is not None else None), [x for i, x in enumerate(xs) if i != t.base]


def method_params(t: OutputTensor) -> dict:
    """The method's parameters for `t`: global ones and the per-model lists."""
    return {**t.params, **{k: list(v) for k, v in t.per_model.items()}}


def _reported(t: OutputTensor, call: Callable):
    """`call()`, its errors reported as a MergeError naming tensor `t`."""
    try:
        return call()
    except MergeError as err:
        raise MergeError(err.message, err.where or f"tensor {t.name}") from None
    except (ValueError, RuntimeError) as err:
        raise MergeError(f"{t.method} failed: {err}", f"tensor {t.name}") from None


def _bytes(part: torch.Tensor) -> np.ndarray:
    """The bytes of `part`, a contiguous CPU tensor (an output slot's view), without a copy."""
    return part.reshape(-1).view(torch.uint8).numpy()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
