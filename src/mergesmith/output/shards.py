"""Sharded safetensors output, written tensor by tensor in bounded memory.

Every output tensor's name, shape and dtype is known from the plan, so each shard's header (with
all data offsets) is written first and every tensor is then written straight to its offset as
soon as it is computed: nothing accumulates in memory, and tensors may arrive in any order.
Shards are split like mergekit's: a shard is closed before a tensor that would push it past
`max_bytes` (<= 0: one shard). Files carry a `.partial` suffix until `close()`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
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


class ShardWriter:
    """Writes planned shards into `directory`; `write()` may be called from several threads."""

    def __init__(self, directory: Path, shards: list[Shard]) -> None:
        self.directory = directory
        self.shards = shards
        self._where: dict[str, tuple[int, TensorSlot]] = {}
        self._fds: list[int] = []
        for i, shard in enumerate(shards):
            path = directory / (shard.file + PARTIAL)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            data_start = 8 + len(shard.header)
            self._pwrite(fd, len(shard.header).to_bytes(8, "little") + shard.header, 0, path)
            os.ftruncate(fd, shard.size)
            for slot in shard.slots:
                self._where[slot.name] = (
                    i,
                    TensorSlot(slot.name, slot.dtype, slot.shape, data_start + slot.start, data_start + slot.end),
                )

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

    def close(self) -> list[str]:
        """Flush, close and give the shards their final names. Returns the file names."""
        for fd in self._fds:
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
        for fd in self._fds:
            os.close(fd)
        self._fds = []
