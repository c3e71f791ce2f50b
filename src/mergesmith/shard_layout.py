"""Where each output tensor lies: the shard files, their safetensors headers, every tensor's offsets.

A pure function of the tensors' names, dtypes and shapes (known from the plan before a value is
computed), so the shard writer, the resume journal and the distributed scheduler all lay the same
merge out identically, whoever computes it. The ground floor: the engine (scheduling) and the
output (writing) both read it. Shards are split like mergekit's: a shard is closed before a tensor
that would push it past `max_bytes` (<= 0: one shard).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from mergesmith.dtypes import DTYPE_BYTES, ST_DTYPES, numel

TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}


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
        n = numel(shape) * DTYPE_BYTES[dtype]
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
