"""Zero-copy reads: tensors as views of memory-mapped safetensors files.

`safe_open(...).get_tensor` copies every tensor into a fresh allocation (page faults on every
byte). Here each file is mapped once (numpy memmap, read-only) and a tensor is a view at the
offsets its header gives, so reading costs nothing until the engine converts the values into its
own reusable float32 buffer, chunk by chunk. Sources that are not plain safetensors readers (a
`.bin`, a LoRA view, ...) fall back to their `get()`. `entry()` says where a tensor's bytes lie
without torch, for the engine's torch-free paths (pure copies, fused kernels).
"""

from __future__ import annotations

import mmap
import os
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mergesmith import safetensors_header
from mergesmith.dtypes import DTYPE_BYTES
from mergesmith.errors import InputChangedError, MergeError
from mergesmith.lazy_torch import torch
from mergesmith.sources.reader import TensorReader, TensorSource, pread_exact

PAGE = mmap.PAGESIZE
_VIEWABLE = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}  # views as torch tensors


@dataclass(frozen=True)
class Entry:
    """Where a tensor's bytes lie in a safetensors file."""

    path: Path
    offset: int  # of the first byte, in the file
    nbytes: int
    dtype: str  # torch's name ("bfloat16")
    shape: tuple[int, ...]


class MappedFiles:
    """Maps each safetensors file once; `view(source, name)` or None when it cannot map."""

    def __init__(self) -> None:
        self._files: dict[Path, tuple[np.memmap, int, dict[str, safetensors_header.Entry]] | None] = {}
        self._fds: dict[Path, int] = {}
        self._spans: dict[Path, tuple[int, int]] = {}  # path -> (address, size) of its map
        self._lock = threading.Lock()

    def _open(self, path: Path) -> tuple[np.memmap, int, dict[str, safetensors_header.Entry]] | None:
        if path not in self._files:
            try:
                start, entries = safetensors_header.read_header(path)
                mm = np.memmap(path, dtype=np.uint8, mode="r")
            except OSError:
                self._files[path] = None  # unreadable here: the source's own reader reports it
                return None
            except MergeError as err:  # its header was read whole when the merge was planned
                raise InputChangedError(
                    f"{err.message}; it was truncated or replaced while the merge read it", str(path)
                ) from None
            self._files[path] = (mm, start, entries)
            self._spans[path] = (mm.ctypes.data, mm.nbytes)  # (NumPy's .ctypes is slow to ask per chunk)
        return self._files[path]

    def _where(self, t: torch.Tensor) -> tuple[Path, int] | None:
        start = t.data_ptr()
        for path, (base, size) in list(self._spans.items()):
            if base <= start < base + size:
                return path, start - base
        return None

    def maps(self, t: torch.Tensor) -> bool:
        """True when `t` is a view of one of the mapped files."""
        return self._where(t) is not None

    def location(self, t: torch.Tensor) -> tuple[int, int]:
        """(file descriptor, byte offset) of `t`, a contiguous view of a mapped file, for `pread`."""
        where = self._where(t)
        assert where is not None and t.is_contiguous()
        path, offset = where
        return self.fd(path), offset

    def fd(self, path: Path) -> int:
        """A descriptor of `path`, opened once, for `pread`."""
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:  # worker threads open files too
                fd = self._fds.get(path)
                if fd is None:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def read_entry(self, entry: Entry, start: int, dest: np.ndarray) -> None:
        """Bytes `start` .. `start + dest.nbytes` of tensor `entry` into `dest` (contiguous), with pread."""
        assert start + dest.nbytes <= entry.nbytes
        pread_exact(
            self.fd(entry.path), memoryview(dest.reshape(-1).view(np.uint8)), entry.offset + start, str(entry.path)
        )

    def read_into(self, t: torch.Tensor, dest: torch.Tensor) -> None:
        """Copy the bytes of `t` (a contiguous view of a mapped file) into `dest` with pread: a copy
        from the page cache into memory we own, without faulting the file's pages into this process."""
        assert dest.is_contiguous()
        fd, offset = self.location(t)
        view = memoryview(dest.view(-1).view(torch.uint8).numpy())
        assert view.nbytes == t.numel() * t.element_size()
        pread_exact(fd, view, offset, str(self._where(t)[0]))

    def release(self, t: torch.Tensor) -> None:
        """Drop the mapped pages under `t` from this process (the page cache keeps them), so reading
        a whole model through the map does not pile up in the resident set."""
        where = self._where(t)
        if where is not None:
            self._drop(where[0], where[1], t.numel() * t.element_size())

    def _drop(self, path: Path, offset: int, nbytes: int) -> None:
        mm = self._files[path][0]
        lo = offset // PAGE * PAGE
        hi = min(-(-(offset + nbytes) // PAGE) * PAGE, mm.nbytes)
        raw = getattr(mm, "_mmap", None)
        if raw is not None and hi > lo and hasattr(mmap, "MADV_DONTNEED"):
            raw.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def entry(self, source: TensorSource, name: str) -> Entry | None:
        """Where tensor `name` of `source` lies, if `source` reads a plain safetensors file."""
        if not isinstance(source, TensorReader) or source.info.format != "safetensors":
            return None
        meta = source.info.tensors.get(name)
        if meta is None:
            return None
        path = source.info.directory / meta.file
        opened = self._open(path)
        if opened is None:
            return None
        _, start, entries = opened
        e = entries.get(name)
        if e is None or (start + e.start) % DTYPE_BYTES[e.dtype]:
            return None  # not in this file, or its bytes not aligned for a view
        return Entry(path, start + e.start, e.end - e.start, e.dtype, e.shape)

    def view(self, source: TensorSource, name: str) -> torch.Tensor | None:
        entry = self.entry(source, name)
        if entry is None or entry.dtype not in _VIEWABLE:
            return None
        mm = self._files[entry.path][0]
        arr = mm[entry.offset : entry.offset + entry.nbytes].view(_VIEWABLE[entry.dtype]).reshape(entry.shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only memory: we never write through these views
            t = torch.from_numpy(arr)
        return t.view(torch.bfloat16) if entry.dtype == "bfloat16" else t


def read_entries(
    files: MappedFiles, readers: Mapping[str, TensorSource], refs: list[tuple[str, str]]
) -> list[Entry | None]:
    """Where each (model key, tensor name) lies (None where it is not in a plain safetensors file)."""
    return [files.entry(readers[model], name) for model, name in refs]


def read_views(files: MappedFiles, readers: Mapping[str, TensorSource], refs: list[tuple[str, str]]) -> list:
    """A view (or a loaded tensor, as fallback) for each (model key, tensor name)."""
    out = []
    for model, name in refs:
        v = files.view(readers[model], name)
        out.append(v if v is not None else readers[model].get(name))
    return out
