"""Sharded safetensors output, written tensor by tensor in bounded memory.

Every output tensor's name, shape and dtype is known from the plan, so each shard's header (with
all data offsets) is written first and every tensor is then written straight to its offset as
soon as it is computed: nothing accumulates in memory, and tensors may arrive in any order.
Shards are split like mergekit's: a shard is closed before a tensor that would push it past
`max_bytes` (<= 0: one shard). Files carry a `.partial` suffix until `close()`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mergesmith.errors import MergeError
from mergesmith.sources.model import DTYPE_BYTES, ST_DTYPES

TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
PARTIAL = ".partial"


@dataclass(frozen=True)
class TensorSlot:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # offset inside the data section
    end: int


@dataclass(frozen=True)
class Shard:
    file: str
    slots: tuple[TensorSlot, ...]
    header: bytes

    @property
    def size(self) -> int:
        return 8 + len(self.header) + (self.slots[-1].end if self.slots else 0)


def layout_shards(tensors: Sequence[tuple[str, str, tuple[int, ...]]], max_bytes: int) -> list[Shard]:
    """Assign (name, dtype, shape) tensors to shards and build each shard's header."""
    groups: list[list[tuple[str, str, tuple[int, ...], int]]] = [[]]
    used = 0
    for name, dtype, shape in tensors:
        n = DTYPE_BYTES[dtype]
        for s in shape:
            n *= s
        if groups[-1] and max_bytes > 0 and used + n > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append((name, dtype, shape, n))
        used += n
    count = len(groups)
    shards = []
    for k, group in enumerate(groups, start=1):
        file = "model.safetensors" if count == 1 else f"model-{k:05d}-of-{count:05d}.safetensors"
        slots, offset = [], 0
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        for name, dtype, shape, n in group:
            slots.append(TensorSlot(name, dtype, shape, offset, offset + n))
            header[name] = {"dtype": TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        shards.append(Shard(file, tuple(slots), raw))
    return shards


class _Hasher:
    """SHA-256 of each shard computed while it is written, so nothing is read back at the end.

    Writes that arrive in offset order (the executor's) are read back by a thread from the page cache
    (where they are still hot) and hashed, overlapping the writes; a shard written out of
    order gets no digest (`digest()` None) and whoever needs one reads the file back."""

    def __init__(self, fds: list[int], shards: list[Shard]) -> None:
        self.fds = fds
        self.shards = shards
        self.hashes = [hashlib.sha256(len(s.header).to_bytes(8, "little") + s.header) for s in shards]
        self.next = [8 + len(s.header) for s in shards]  # next byte expected in order
        self.ordered = [True] * len(shards)
        self.digests: dict[str, str] = {}
        self.on_hashed: Callable[[Shard, str], None] | None = None
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._jobs: queue.Queue[tuple[int, int, int] | None] = queue.Queue()
        self._buffer = memoryview(bytearray(1 << 24))
        self._thread = threading.Thread(target=self._loop, daemon=True, name="mergesmith-hasher")
        self._thread.start()
        for i, s in enumerate(shards):
            if self.next[i] == s.size:  # no tensor data: complete already
                self._jobs.put((i, self.next[i], 0))

    def wrote(self, i: int, start: int, nbytes: int) -> None:
        with self._lock:
            if self.on_hashed is None:  # nobody wants digests (writers outside `run`): no hashing
                self.ordered[i] = False
            if not self.ordered[i]:
                return
            if start != self.next[i]:
                self.ordered[i] = False
                return
            self.next[i] += nbytes
            self._jobs.put((i, start, nbytes))

    def in_order(self, i: int) -> bool:
        with self._lock:
            return self.ordered[i]

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            i, start, nbytes = job
            if self.error is not None:
                continue
            try:
                self._hash(i, start, nbytes)
            except BaseException as err:  # re-raised by close()
                self.error = err

    def _hash(self, i: int, start: int, nbytes: int) -> None:
        shard = self.shards[i]
        done = 0
        while done < nbytes:  # read back from the page cache (hot) into a reused buffer, hash it
            got = os.preadv(self.fds[i], [self._buffer[: nbytes - done]], start + done)
            if got <= 0:
                raise OSError(f"short read from {shard.file}")
            self.hashes[i].update(self._buffer[:got])
            done += got
        if start + nbytes == shard.size:
            digest = self.hashes[i].hexdigest()
            self.digests[shard.file] = digest
            if self.on_hashed is not None:
                self.on_hashed(shard, digest)

    def finish(self) -> None:
        self._jobs.put(None)
        self._thread.join()


class ShardWriter:
    """Writes planned shards into `directory`; `write()` may be called from several threads.

    Each shard's SHA-256 is computed as it is written (`digest(file)`, `on_hashed`), when written in order."""

    def __init__(self, directory: Path, shards: list[Shard], fsync: bool = True) -> None:
        self.directory = directory
        self.shards = shards
        self.fsync = fsync
        self._where: dict[str, tuple[int, TensorSlot]] = {}
        self._fds: list[int] = []
        for i, shard in enumerate(shards):
            path = directory / (shard.file + PARTIAL)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            data_start = 8 + len(shard.header)
            self._pwrite(fd, len(shard.header).to_bytes(8, "little") + shard.header, 0, path)
            os.ftruncate(fd, shard.size)
            self._reserve(fd, shard.size, path)
            for slot in shard.slots:
                self._where[slot.name] = (
                    i,
                    TensorSlot(slot.name, slot.dtype, slot.shape, data_start + slot.start, data_start + slot.end),
                )
        self._hasher = _Hasher(self._fds, shards)

    @property
    def on_hashed(self) -> Callable[[Shard, str], None] | None:
        return self._hasher.on_hashed

    @on_hashed.setter
    def on_hashed(self, callback: Callable[[Shard, str], None] | None) -> None:
        """Called (from the hashing thread) with each shard and its SHA-256 once all its bytes are written."""
        self._hasher.on_hashed = callback

    def hashing(self, file: str) -> bool:
        """True while shard `file` is written in order, so `on_hashed` will report its digest."""
        i = next(k for k, s in enumerate(self.shards) if s.file == file)
        return self._hasher.in_order(i)

    @staticmethod
    def _reserve(fd: int, size: int, path: Path) -> None:
        """Allocate the shard's blocks up front: writing into allocated blocks is several times faster
        than into a sparse file on ext4 (measured 0.34 s vs 1.3-5 s for 2.2 GB), and a full disk
        shows now rather than midway."""
        if not hasattr(os, "posix_fallocate") or size <= 0:
            return
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise MergeError(f"not enough disk space for the output ({size / 1e9:.2f} GB)", str(path)) from None
            # other errors (a file system without fallocate): write into the sparse file

    @staticmethod
    def _pwrite(fd: int, data: bytes | memoryview, offset: int, path: Path | str) -> None:
        view = memoryview(data).cast("B")
        try:
            while view:
                n = os.pwrite(fd, view, offset)
                view = view[n:]
                offset += n
        except OSError as err:
            raise MergeError(f"cannot write output: {err.strerror}", str(path)) from None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        i, slot = self._where[name]
        if tuple(tensor.shape) != slot.shape or str(tensor.dtype).removeprefix("torch.") != slot.dtype:
            raise MergeError(
                f"internal error: computed {list(tensor.shape)} {tensor.dtype}, planned {list(slot.shape)} {slot.dtype}",
                f"tensor {name}",
            )
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._pwrite(self._fds[i], data, slot.start, self.shards[i].file)
        self._hasher.wrote(i, slot.start, data.nbytes)

    def write_at(self, name: str, offset: int, part: torch.Tensor) -> None:
        """Write `part`, a piece of tensor `name` starting `offset` bytes into it (chunked output)."""
        i, slot = self._where[name]
        data = part.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        if str(part.dtype).removeprefix("torch.") != slot.dtype or slot.start + offset + data.nbytes > slot.end:
            raise MergeError(
                f"internal error: chunk of {data.nbytes} bytes {part.dtype} at {offset} does not fit the planned"
                f" {list(slot.shape)} {slot.dtype}",
                f"tensor {name}",
            )
        self._pwrite(self._fds[i], data, slot.start + offset, self.shards[i].file)
        self._hasher.wrote(i, slot.start + offset, data.nbytes)

    def close(self) -> list[str]:
        """Flush, close and give the shards their final names. Returns the file names."""
        self._hasher.finish()
        if self._hasher.error is not None:
            self.abort()
            raise self._hasher.error
        for fd in self._fds:
            if self.fsync:
                os.fsync(fd)
            os.close(fd)
        self._fds = []
        for shard in self.shards:
            os.replace(self.directory / (shard.file + PARTIAL), self.directory / shard.file)
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.slots[-1].end for s in self.shards if s.slots)},
                "weight_map": {slot.name: shard.file for shard in self.shards for slot in shard.slots},
            }
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return [s.file for s in self.shards]

    def abort(self) -> None:
        self._hasher.finish()
        for fd in self._fds:
            os.close(fd)
        self._fds = []
