"""Where the executor's results go: a sink of byte chunks or a sink of whole tensors.

The executor's lanes differ by what the receiver can take, so the receiver says it by its type:
- a `ChunkSink` (the shard writer, or the audit around it) takes a tensor's bytes chunk by chunk at
  byte offsets, and pure copies as file-to-file jobs: every lane streams into it in bounded memory;
- a `TensorSink` (the `--as-lora` adapter builder, `ResidentSink`: search's resident model) keeps
  what it gets, so it receives each finished output tensor, freshly allocated.

A sink that is neither (a missing or misspelt method) is refused by `sink_kind`, not run slower.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from mergesmith.errors import MergeError
from mergesmith.lazy_torch import torch


class ChunkJob(NamedTuple):
    """Bytes `data` of output tensor `name` (of `dtype`), `offset` bytes into it."""

    name: str
    offset: int
    data: np.ndarray
    dtype: str


class CopyJob(NamedTuple):
    """A pure copy: the `nbytes` of output tensor `name` (of `dtype`) are the bytes at `src_offset`
    of the open file `fd` (an input file); the sink reads them straight into its output."""

    name: str
    dtype: str
    fd: int
    src_offset: int
    nbytes: int


@runtime_checkable
class ChunkSink(Protocol):
    """Receives output tensors as byte chunks, from the executor's writer thread (in any order of
    tensors' chunks it likes to write them in: the executor writes each tensor front to back)."""

    def check_chunk(self, name: str, data: np.ndarray, dtype: str) -> None:
        """Check a chunk's bytes before they are written; the executor calls it in its computing
        workers (beside the other workers, not in the one writing thread). May do nothing."""

    def write_chunk(self, job: ChunkJob) -> None:
        """Write a chunk (already checked with `check_chunk`)."""

    def copy_file(self, job: CopyJob, check: Callable[[memoryview], None] | None = None) -> None:
        """Copy a pure copy's bytes; `check` sees them before they can be written."""


@runtime_checkable
class TensorSink(Protocol):
    """Receives each finished output tensor, freshly allocated: it may keep it."""

    def put_tensor(self, name: str, tensor: torch.Tensor) -> None: ...


Sink = ChunkSink | TensorSink

_MEMBERS: dict[type, tuple[str, ...]] = {
    ChunkSink: ("check_chunk", "write_chunk", "copy_file"),
    TensorSink: ("put_tensor",),
}


def sink_kind(sink: object) -> type:
    """`ChunkSink` or `TensorSink`, whichever `sink` implements; a TypeError naming what it lacks
    otherwise (a sink must not silently lose its lane)."""
    if isinstance(sink, ChunkSink):
        return ChunkSink
    if isinstance(sink, TensorSink):
        return TensorSink
    partial = [(k, ms) for k, ms in _MEMBERS.items() if any(hasattr(sink, m) for m in ms)]
    if partial:
        kind, members = partial[0]
        missing = [m for m in members if not callable(getattr(sink, m, None))]
        raise TypeError(f"{type(sink).__name__} is not a {kind.__name__}: it lacks {', '.join(missing)}")
    wanted = " or ".join(f"{k.__name__} ({', '.join(ms)})" for k, ms in _MEMBERS.items())
    raise TypeError(f"{type(sink).__name__} is not a sink: it implements neither {wanted}")


class ResidentSink:
    """A `TensorSink` that copies each merged tensor into the parameter of that name of a model
    kept in memory (search scores candidates so, with no checkpoint written)."""

    def __init__(self, targets: Mapping[str, torch.Tensor], names: Iterable[str], where: str = "in-memory merge"):
        """`names`: the tensors the merge will put, checked against `targets` before anything is merged."""
        self.targets = targets
        self.where = where
        for name in names:
            if name not in targets:
                raise MergeError(f"the resident model has no parameter '{name}'", where)

    def put_tensor(self, name: str, tensor: torch.Tensor) -> None:
        target = self.targets[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise MergeError(f"merged shape {list(tensor.shape)} differs from the model's {list(target.shape)}", name)
        with torch.no_grad():
            target.copy_(tensor)
