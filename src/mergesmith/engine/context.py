"""What every lane of the executor shares: the inputs' files, per-thread scratch memory, the
worker threads, and the method call with its parameters, RNG and error reporting."""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from mergesmith import kernels
from mergesmith.calibration import Statistics
from mergesmith.dtypes import DTYPE_BYTES
from mergesmith.engine.buffers import Buffers
from mergesmith.engine.mapped import Entry, MappedFiles, read_entries, read_views
from mergesmith.engine.sinks import ChunkSink
from mergesmith.engine.streaming import Streaming
from mergesmith.errors import MergeError
from mergesmith.lazy_torch import torch
from mergesmith.methods.registry import get_method
from mergesmith.methods.stream import Observation
from mergesmith.plan import OutputTensor
from mergesmith.rng import TensorRNG
from mergesmith.sources.reader import TensorSource


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


class MergeContext:
    """One merge's shared state; lanes are functions of it and of one output tensor."""

    def __init__(
        self,
        readers: Mapping[str, TensorSource],
        dtype: str | None,
        device: str,
        seed: int,
        statistics: Statistics | None = None,
    ) -> None:
        self.readers = readers
        self.statistics = statistics  # the data-aware methods' calibration statistics
        self.dtype = dtype  # the recipe's: inputs are rounded through it
        self.device = device
        self.seed = seed
        self.files = MappedFiles()
        self._local = threading.local()  # scratch buffers, one set per computing thread
        self.pool: ThreadPoolExecutor | None = None
        self.workers = 1
        self.sink: ChunkSink | None = None  # while a run streams into one: its `check_chunk` runs in the workers

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

    def in_order(self, work: Callable, items: Iterable) -> Iterator:
        """`work(item)` for each item, run by the worker threads (a few items ahead), results in order.

        Chunks of a tensor are independent (pruners key their state by chunk), and the maths
        releases the GIL (torch, NumPy, the C kernels, pread): two cores merge two chunks at once."""
        if self.pool is None:
            for item in items:
                yield work(item)
            return
        pending: deque = deque()
        for item in items:
            pending.append(self.pool.submit(work, item))
            if len(pending) >= 2 * self.workers:  # queued work for a worker that finishes early
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    # -- the inputs ---------------------------------------------------------------------------

    def entries(self, t: OutputTensor) -> list[Entry | None]:
        """Where the inputs of `t` lie in their files (None for those not in plain safetensors)."""
        return read_entries(self.files, self.readers, [(x.model, x.name) for x in t.inputs])

    def views(self, t: OutputTensor) -> list[torch.Tensor]:
        """The inputs of `t`: views of the mapped files (or loaded tensors, as fallback)."""
        return read_views(self.files, self.readers, [(x.model, x.name) for x in t.inputs])

    def prefetch(self, entries: list[Entry | None]) -> None:
        """Ask the kernel to read these inputs (the next tensor's) into the page cache now, in the
        background, so their reads find them there (models not yet cached, or evicted since)."""
        advise = getattr(os, "posix_fadvise", None)
        if advise is None:
            return
        for e in entries:
            if e is not None:
                with contextlib.suppress(OSError):
                    advise(self.files.fd(e.path), e.offset, e.nbytes, os.POSIX_FADV_WILLNEED)

    def load(self, slot: object, raw: torch.Tensor) -> torch.Tensor:
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

    def owned(self, raw: torch.Tensor) -> torch.Tensor:
        """`raw` in memory of its own, read with pread when it is a view of a mapped file (so that
        whole-tensor paths never touch the map either: see `raw_chunk`)."""
        if not (raw.is_contiguous() and self.files.maps(raw)):
            return raw
        out = torch.empty(raw.shape, dtype=raw.dtype)
        self.files.read_into(raw, out)
        return out

    def via(self, dtype: str) -> str | None:
        """The dtype raw values of `dtype` are rounded through when read: the recipe's, if another."""
        return self.dtype if self.dtype not in (None, dtype) else None

    @contextlib.contextmanager
    def raw_chunk(self, entries: list[Entry], start: int, count: int):
        """The inputs' values `start` .. `start + count` as `kernels.Raw`, in the order of `entries`,
        read with pread into this thread's reused staging buffers. Reading them through the files'
        maps saved 1-2 s of system time on medium linear, but a file truncated by another process
        mid-merge then kills the merge with SIGBUS; a short pread is one error naming the file."""
        xs = []
        for i, e in enumerate(entries):
            item = DTYPE_BYTES[e.dtype]
            buf = self.staging.raw(("raw", i), count * item)
            self.files.read_entry(e, start * item, buf)
            xs.append(kernels.Raw(buf, e.dtype, self.via(e.dtype)))
        yield xs

    def raw_ready(self, t: OutputTensor, entries: list[Entry | None]) -> bool:
        """Whether the kernels can merge `t` from its files' raw values: on the CPU, every input in a
        plain safetensors file with the output's shape, every dtype one the kernels read."""
        kinds = kernels.raw_kinds()
        if not self.on_cpu or t.dtype not in kinds or self.dtype not in (None, *kinds):
            return False
        return all(e is not None and e.dtype in kinds and e.shape == t.shape for e in entries)

    # -- the maths and its results ------------------------------------------------------------

    def apply(self, t: OutputTensor, xs: list, stream: Streaming | None = None) -> torch.Tensor | None:
        """`t`'s method on its inputs `xs` (float32 tensors, or `kernels.Raw` values in the raw lane)."""
        base, others = split(t, xs)
        method = get_method(t.method)
        stats = self.statistics.inputs(t.others) if method.calibration and self.statistics is not None else None
        return reported(t, lambda: method(others, base, method_params(t), rng=self.rng(t), stream=stream, stats=stats))

    def rng(self, t: OutputTensor) -> TensorRNG:
        return TensorRNG(self.seed, t.name, tuple(x.model for x in t.others))

    # -- observe-then-apply: the passes the engine runs for a method's `Observation` -----------

    def streaming(self, t: OutputTensor, numel: int, cols: int = 0) -> Streaming:
        """The stream of `t`: its method's observation (from the method's declaration), set up."""
        method = get_method(t.method)
        seen = reported(t, lambda: method.observation(method_params(t), self.rng(t), len(t.others)))
        seen = seen if seen is not None else Observation()
        seen.setup(numel)
        return Streaming(numel, seen, cols=cols, width=t.shape[-1] if t.shape else 1)

    def sample(self, t: OutputTensor, xs: list, stream: Streaming) -> None:
        """The observation's sample pass, on the inputs' fixed sample `xs`."""
        base, others = split(t, xs)
        reported(t, lambda: stream.seen.sample(others, base))

    def feed(self, t: OutputTensor, xs: list, at: Streaming) -> None:
        """The observation fed the inputs' chunk `xs` at `at.start`."""
        base, others = split(t, xs)
        reported(t, lambda: at.seen.feed(others, base, at))

    def checked(self, t: OutputTensor, data: np.ndarray) -> np.ndarray:
        """`data` (a chunk of `t`) after the sink's check (the audit's NaN/Inf scan), run here in the
        computing worker, beside the other worker rather than in the one writing thread."""
        if self.sink is not None:
            self.sink.check_chunk(t.name, data, t.dtype)
        return data

    def observe(self, stream: Streaming, observe: Callable, chunks: list) -> None:
        """The observe passes of a streamed merge (`observe(chunk)` on the workers, feeding the
        observation, as often as it asks), then its `finish`: the stream is then ready to merge."""
        run = map if self.pool is None else self.pool.map  # the pruners finish side by side
        while stream.seen.needs_observe:
            for _ in self.in_order(observe, chunks):
                pass
            if stream.finish(run):
                break
        else:
            stream.finish(run)


def split(t: OutputTensor, xs: list) -> tuple:
    """(the base's input or None, the others) of `t`'s inputs `xs`."""
    return (xs[t.base] if t.base is not None else None), [x for i, x in enumerate(xs) if i != t.base]


def method_params(t: OutputTensor) -> dict[str, Any]:
    """The method's parameters for `t`: global ones and the per-model lists."""
    return {**t.params, **{k: list(v) for k, v in t.per_model.items()}}


def reported(t: OutputTensor, call: Callable):
    """`call()`, its errors reported as a MergeError naming tensor `t`."""
    try:
        return call()
    except MergeError as err:
        raise MergeError(err.message, err.where or f"tensor {t.name}") from None
    except (ValueError, RuntimeError) as err:
        raise MergeError(f"{t.method} failed: {err}", f"tensor {t.name}") from None
