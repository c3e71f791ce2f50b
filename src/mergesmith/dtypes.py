"""Dtype facts: names, byte widths, the safetensors codes and the aliases recipes accept.

The ground floor: every layer (recipe, sources, kernels, methods, engine, output) reads these
tables, so they live in a module that imports nothing of ours and nothing heavy.
"""

from __future__ import annotations

from collections.abc import Iterable

ST_DTYPES = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
DTYPE_BYTES = {
    "bfloat16": 2,
    "float16": 2,
    "float32": 4,
    "float64": 8,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}
# Short names recipes and flags accept for a dtype (mergekit accepts the same).
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def numel(shape: Iterable[int]) -> int:
    """Number of elements of a tensor of `shape` (1 for a scalar), without importing torch."""
    n = 1
    for s in shape:
        n *= s
    return n
