"""The safetensors header: an 8-byte little-endian length, then JSON naming each tensor's dtype,
shape and byte range. One parser that checks everything a reader relies on (length within the
file, JSON, known dtypes, byte lengths matching shapes, data within the file), so a corrupt or
truncated file is a clear MergeError before any tensor is read. Local and hub files alike.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from mergesmith.dtypes import DTYPE_BYTES, ST_DTYPES, numel
from mergesmith.errors import MergeError

#: A larger safetensors header is taken as corruption (real ones are a few MB at most).
MAX_HEADER = 100_000_000


@dataclass(frozen=True)
class Entry:
    """One tensor of the header; `start`/`end` count from the first byte after the header."""

    shape: tuple[int, ...]
    dtype: str  # torch's name ("bfloat16")
    start: int
    end: int


def header_length(head: bytes, size: int | None, where: str) -> int:
    """The JSON header's length from a safetensors file's first 8 bytes, checked against `size`."""
    if len(head) < 8:
        raise MergeError("truncated safetensors file (no header)", where)
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or (size is not None and n > size - 8):
        raise MergeError("corrupt safetensors file (header length exceeds the file)", where)
    return n


def parse_entries(raw: bytes, n: int, size: int | None, where: str) -> dict[str, Entry]:
    """Every tensor of a header (`raw`, `n` bytes of JSON), each entry checked, and, with the file's
    `size`, the data it describes checked to fit."""
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MergeError("corrupt safetensors file (header is not JSON)", where) from None
    out: dict[str, Entry] = {}
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = ST_DTYPES[info["dtype"]]
            start, end = info["data_offsets"]
            entry = Entry(tuple(int(s) for s in info["shape"]), dtype, start, end)
        except (KeyError, TypeError, ValueError):
            raise MergeError(f"corrupt safetensors header entry for tensor '{name}'", where) from None
        if end - start != numel(entry.shape) * DTYPE_BYTES[dtype]:
            raise MergeError(f"corrupt safetensors file: tensor '{name}' has the wrong byte length", where)
        data_end = max(data_end, end)
        out[name] = entry
    if size is not None and 8 + n + data_end > size:
        raise MergeError(f"truncated safetensors file: {size} bytes, the header describes {8 + n + data_end}", where)
    return out


def read_header(path: Path) -> tuple[int, dict[str, Entry]]:
    """(offset of the data section, entries) of a local safetensors file, checked against its size."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            n = header_length(f.read(8), size, str(path))
            raw = f.read(n)
    except FileNotFoundError:
        raise MergeError("file not found", str(path)) from None
    return 8 + n, parse_entries(raw, n, size, str(path))
