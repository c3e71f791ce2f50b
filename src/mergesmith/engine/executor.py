"""Executing a plan: stream output tensors through their merge methods, in bounded memory.

Inputs are zero-copy views of the memory-mapped files (`engine.mapped`). Each is converted (cast
to the recipe's `dtype`, if any, then to float32) into a reusable buffer, the method runs on those
buffers in place, and the result is cast into a reusable output buffer that a writer thread puts
straight into its shard while the next tensor is computed. Methods that work element by element
(`ELEMENTWISE`) run on row chunks of at most `CHUNK_ELEMENTS` values, so memory holds a few chunks
whatever the model size; the others get whole tensors. See docs/performance.md.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping

import torch

from mergesmith.engine.mapped import MappedFiles, read_views
from mergesmith.engine.memory import keep_freed_memory
from mergesmith.errors import MergeError
from mergesmith.methods.registry import get_method
from mergesmith.methods.sparsify import sample_blocks
from mergesmith.methods.task_vectors import Streaming
from mergesmith.plan import OutputTensor, Plan
from mergesmith.rng import TensorRNG
from mergesmith.sources.reader import TensorSource

#: Float values per chunk of an element-wise merge (16 MiB of float32 per input).
CHUNK_ELEMENTS = 1 << 22
#: Values per chunk of a pure copy (written straight from the input file's mapped pages).
COPY_ELEMENTS = 1 << 23


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
    """True when output element j depends only on input elements j (so row chunks merge alike)."""
    if t.method in ("linear", "passthrough"):
        return True
    if t.method == "task_arithmetic":
        return all(d >= 1 for d in t.per_model.get("density", (1.0,)))
    return False


class Buffers:
    """Growable scratch tensors, one per slot, reused from tensor to tensor (no page faults)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._store: dict[object, torch.Tensor] = {}

    def get(self, slot: object, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        nbytes = max(n * dtype.itemsize, 1)
        buf = self._store.get(slot)
        if buf is None or buf.numel() < nbytes:
            self._store.pop(slot, None)
            buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._store[slot] = buf
        return buf[:nbytes].view(dtype)[:n].view(shape)


class _Writer:
    """A thread that writes finished chunks while the next ones are computed. Output buffers come
    from a small ring; a slot is reused only once its bytes are in the file."""

    SLOTS = 3

    def __init__(
        self, write_at: Callable[[str, int, torch.Tensor], None], release: Callable[[torch.Tensor], None]
    ) -> None:
        self.write_at = write_at
        self.release = release  # for chunks that are views of an input file (pure copies)
        self.free: queue.Queue[Buffers] = queue.Queue()
        for _ in range(self.SLOTS):
            self.free.put(Buffers(torch.device("cpu")))
        self.jobs: queue.Queue[tuple[str, int, torch.Tensor, Buffers | None] | None] = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, daemon=True, name="mergesmith-writer")
        self.thread.start()

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            name, offset, tensor, slot = job
            try:
                if self.error is None:
                    self.write_at(name, offset, tensor)
            except BaseException as err:  # re-raised in the computing thread
                self.error = err
            if slot is None:
                self.release(tensor)
            else:
                self.free.put(slot)

    def slot(self) -> Buffers:
        if self.error is not None:
            raise self.error
        return self.free.get()

    def put(self, name: str, offset: int, tensor: torch.Tensor, slot: Buffers | None) -> None:
        self.jobs.put((name, offset, tensor, slot))

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
        self.dtype = torch_dtype(dtype) if dtype else None
        self.device = torch.device(device)
        self.seed = seed
        self.files = MappedFiles()
        self.buffers = Buffers(self.device)
        self.staging = Buffers(torch.device("cpu"))  # raw bytes read from the files

    # -- the maths of one (chunk of a) tensor ------------------------------------------------

    def _apply(self, t: OutputTensor, xs: list[torch.Tensor], stream: Streaming | None = None) -> torch.Tensor:
        base = xs[t.base] if t.base is not None else None
        others = [x for i, x in enumerate(xs) if i != t.base]
        method = get_method(t.method)
        params = {**t.params, **{k: list(v) for k, v in t.per_model.items()}}
        try:
            rng = TensorRNG(self.seed, t.name, tuple(x.model for x in t.others))
            return method(others, base, params, rng=rng, stream=stream)
        except MergeError as err:
            raise MergeError(err.message, err.where or f"tensor {t.name}") from None
        except (ValueError, RuntimeError) as err:
            raise MergeError(f"{t.method} failed: {err}", f"tensor {t.name}") from None

    def _load(self, slot: object, raw: torch.Tensor) -> torch.Tensor:
        """`raw` (a view of the file) as float32 in scratch buffer `slot`, rounded through `dtype`.

        A view of a mapped file is first read with pread into a reused staging buffer: faulting the
        mapped pages in (and dropping them again) costs several times more than the copy."""
        if raw.is_contiguous() and self.files.maps(raw):
            staged = self.staging.get(slot, tuple(raw.shape), raw.dtype)
            self.files.read_into(raw, staged)
            raw = staged
        if self.dtype is not None and raw.dtype != self.dtype:
            mapped, raw = raw, raw.to(self.dtype)
            self.files.release(mapped)
        buf = self.buffers.get(slot, tuple(raw.shape), torch.float32)
        buf.copy_(raw)
        self.files.release(raw)
        return buf

    def compute(self, t: OutputTensor) -> torch.Tensor:
        """The whole output tensor, freshly allocated (for callers that keep it)."""
        out_dtype = torch_dtype(t.dtype)
        out = torch.empty(t.shape, dtype=out_dtype)
        flat = out.view(-1)
        scratch = Buffers(torch.device("cpu"))
        for offset, part in self._parts(t, lambda shape: scratch.get("out", shape, out_dtype)):
            start = offset // out.element_size()
            flat[start : start + part.numel()].copy_(part.reshape(-1))
        return out

    def _pure_copy(self, t: OutputTensor, raw: list[torch.Tensor]) -> bool:
        """A passthrough of one input, unscaled, whose dtype (and the recipe's) is the output's, read
        from a mapped file: no float32 round trip, the writer copies the file's bytes."""
        if t.method != "passthrough" or len(raw) != 1 or any(s != 1.0 for s in t.per_model.get("scale", ())):
            return False
        x = raw[0]
        same = x.dtype == torch_dtype(t.dtype) and (self.dtype is None or self.dtype == x.dtype)
        return same and tuple(x.shape) == t.shape and x.is_contiguous() and self.files.maps(x)

    def _parts(self, t: OutputTensor, target: Callable[[tuple[int, ...]], torch.Tensor]):
        """Yield (byte offset, output chunk) for `t`; chunks are cast into `target(shape)` buffers."""
        raw = read_views(self.files, self.readers, [(x.model, x.name) for x in t.inputs])
        out_dtype = torch_dtype(t.dtype)
        if self._pure_copy(t, raw):  # the input's bytes are the output's: no float32 round trip
            flat = raw[0].reshape(-1)
            for start in range(0, flat.numel(), COPY_ELEMENTS):
                part = flat[start : start + COPY_ELEMENTS]
                dest = target((part.numel(),))
                self.files.read_into(part, dest)
                yield start * flat.element_size(), dest
            return
        if not raw[0].is_floating_point():
            src = raw[t.base if t.base is not None else 0]
            if self.dtype is not None and src.dtype != self.dtype and src.is_floating_point():
                src = src.to(self.dtype)
            dest = target(tuple(src.shape))
            dest.copy_(src)
            yield 0, dest
            return
        if get_method(t.method).streams and len(t.shape) >= 2 and all(tuple(r.shape) == t.shape for r in raw):
            yield from self._streamed(t, raw, target)
            return
        if any(tuple(r.shape) != t.shape for r in raw):  # vocabulary mismatch: whole tensors
            if self.dtype is not None:
                raw = [r.to(self.dtype) for r in raw]
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
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            xs = [self._load(i, r[r0:r1] if t.shape else r) for i, r in enumerate(raw)]
            result = self._apply(t, xs)
            dest = target(tuple(result.shape))
            dest.copy_(result)
            yield r0 * per_row_bytes, dest

    def _streamed(self, t: OutputTensor, raw: list[torch.Tensor], target: Callable[[tuple[int, ...]], torch.Tensor]):
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
        while stream.needs_observe:
            stream.phase = "observe"
            for r0, r1 in chunks:
                stream.start = r0 * per_row
                self._apply(t, [self._load(i, r[r0:r1]) for i, r in enumerate(raw)], stream)
            if stream.finish():
                break
        else:
            stream.finish()
        stream.phase = "apply"
        item = torch.empty((), dtype=torch_dtype(t.dtype)).element_size()
        for r0, r1 in chunks:
            stream.start = r0 * per_row
            result = self._apply(t, [self._load(i, r[r0:r1]) for i, r in enumerate(raw)], stream)
            dest = target(tuple(result.shape))
            dest.copy_(result)
            yield r0 * per_row * item, dest

    # -- the stream ------------------------------------------------------------------------

    def run(
        self, write: Callable[[str, torch.Tensor], None], progress: Callable[[OutputTensor], None] | None = None
    ) -> None:
        owner = getattr(write, "__self__", None)
        write_at = getattr(owner, "write_at", None)
        if write_at is None:  # a plain callback keeps what it is given: fresh tensors
            for t in self.plan.tensors:
                write(t.name, self.compute(t))
                if progress is not None:
                    progress(t)
            return
        writer = _Writer(write_at, self.files.release)
        keep_freed_memory()
        threads = torch.get_num_threads()
        if self.device.type == "cpu" and threads > 1:
            # One intra-op thread: the writer and hashing threads need the other cores, and idle
            # OpenMP workers spin (measured: medium linear 12.1 s -> 8.9 s wall on 2 cores).
            torch.set_num_threads(1)
        try:
            for t in self.plan.tensors:
                out_dtype = torch_dtype(t.dtype)
                slot: list[Buffers] = []

                def target(shape: tuple[int, ...], slot: list[Buffers] = slot, dt: torch.dtype = out_dtype) -> torch.Tensor:
                    slot.append(writer.slot())
                    return slot[-1].get(0, shape, dt)

                for offset, part in self._parts(t, target):
                    writer.put(t.name, offset, part, slot.pop() if slot else None)  # no slot: a file view
                if progress is not None:
                    progress(t)
        finally:
            torch.set_num_threads(threads)
            writer.finish()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
