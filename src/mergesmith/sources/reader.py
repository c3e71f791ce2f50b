"""Reading tensors from input models: memory-mapped safetensors, or weights-only `.bin`."""

from __future__ import annotations

import os
from typing import Any, Protocol

from safetensors import safe_open

from mergesmith.errors import InputChangedError, MergeError
from mergesmith.lazy_torch import torch
from mergesmith.sources.model import ModelInfo


class TensorSource(Protocol):
    """Anything the executor can read input tensors from, by name (a model file, a model with a
    LoRA applied, a vocabulary-aligned view of several models, ...)."""

    def get(self, name: str) -> torch.Tensor: ...


def open_sources(models: dict[str, ModelInfo]) -> dict[str, TensorSource]:
    """One tensor source per model key."""
    return {key: open_source(info) for key, info in models.items()}


def open_source(info: ModelInfo) -> TensorSource:
    """The model's own source when a registered kind gave it one (e.g. base+adapter), else its files."""
    if info.opener is not None:
        return info.opener()
    return TensorReader(info)


class TensorReader:
    """Lazily opens each shard of one model once and reads tensors by name."""

    def __init__(self, info: ModelInfo) -> None:
        self.info = info
        self._handles: dict[str, Any] = {}
        self._sizes: dict[str, int] = {}  # file -> its size when opened

    def _handle(self, file: str) -> Any:
        h = self._handles.get(file)
        path = self.info.directory / file
        if h is None:
            try:
                self._sizes[file] = path.stat().st_size
                h = safe_open(str(path), framework="pt", device="cpu")
            except Exception as err:
                raise MergeError(f"cannot open safetensors file: {err}", str(path)) from None
            self._handles[file] = h
        elif _size(path) != self._sizes[file]:
            # safetensors reads through a memory map: a file truncated since it was opened would end
            # the process with SIGBUS on the first byte past its new end
            raise InputChangedError(
                f"the file changed size during the merge ({self._sizes[file]} -> {_size(path)} bytes):"
                " truncated or replaced by another process (the output is left staged)",
                str(path),
            )
        return h

    def get(self, name: str) -> torch.Tensor:
        meta = self.info.tensors[name]
        if self.info.bin_tensors is not None:
            return self.info.bin_tensors[name]
        try:
            return self._handle(meta.file).get_tensor(name)
        except MergeError:
            raise
        except Exception as err:
            raise MergeError(f"cannot read tensor '{name}': {err}", str(self.info.directory / meta.file)) from None


def _size(path: os.PathLike[str]) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def pread_exact(fd: int, view: memoryview, offset: int, where: str | None = None) -> None:
    """Fill `view` (bytes) from file descriptor `fd` at `offset`; `where` names the file in errors.

    Reads of input tensors go through here, not through their memory maps: a file truncated by
    another process mid-merge then gives a short read, reported naming the file, where touching the
    map past the file's new end would kill the process with SIGBUS."""
    done = 0
    while done < len(view):
        try:
            got = os.preadv(fd, [view[done:]], offset + done)
        except OSError as err:
            raise InputChangedError(f"cannot read the file ({err.strerror})", where or fd_path(fd)) from None
        if got <= 0:
            size = os.fstat(fd).st_size
            raise InputChangedError(
                f"the file ended early: it is {size} bytes now, but the merge needs bytes up to"
                f" {offset + len(view)}; it was truncated or replaced while the merge read it"
                " (the output is left staged; restore the file and run again)",
                where or fd_path(fd),
            )
        done += got


def fd_path(fd: int) -> str:
    """The file that descriptor `fd` reads, for messages (Linux's /proc; else the number)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"input file descriptor {fd}"
