"""arcee_fusion's compiled kernels (`kernels_fusion.c`) over raw values: each row's KL divergence of the
two softmaxes, the importance scores (all, or at sampled positions), and the merge by a threshold."""

from __future__ import annotations

import ctypes

import numpy as np

from mergesmith import kernels
from mergesmith.kernels import Raw

_i64, _i32, _ptr, _f32 = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p, ctypes.c_float
_LIB = kernels.bind(
    {
        "ms_fusion_kl": [_ptr, _i32, _i32, _ptr, _i32, _i32, _i64, _i64, _ptr, _ptr],
        "ms_fusion_scores": [_ptr, _i32, _i32, _ptr, _i32, _i32, _ptr, _i64, _ptr, _i64, _ptr],
        "ms_fusion": [_ptr, _i32, _ptr, _i32, _i32, _ptr, _i32, _i32, _ptr, _i64, _i64, _f32, _ptr],
    }
)


def available() -> bool:
    return _LIB is not None


def _rows(x: Raw, width: int) -> int:
    assert _LIB is not None and width > 0 and x.count % width == 0
    return x.count // width


def row_kl(x: Raw, base: Raw, width: int, out: np.ndarray | None = None) -> np.ndarray:
    """Per row of `width` values: KL(softmax(x) + 1e-8 || softmax(b) + 1e-8), float32 (NaN for rows
    with a NaN or +Inf), into `out` (contiguous float32, one per row) where given."""
    rows = _rows(x, width)
    assert base.count == x.count
    scratch = np.empty(2 * width, dtype=np.float32)
    kl = np.empty(rows, dtype=np.float32) if out is None else out
    assert kl.shape == (rows,) and kl.dtype == np.float32 and kl.flags.c_contiguous
    _LIB.ms_fusion_kl(*kernels.raw_args(x), *kernels.raw_args(base), rows, width, scratch.ctypes.data, kl.ctypes.data)
    return kl


def scores(x: Raw, base: Raw, kl: np.ndarray, width: int, at: np.ndarray | None = None) -> np.ndarray:
    """|x - b| kl[row] (float32): at the flat positions `at` of the chunk (int64), or everywhere."""
    rows = _rows(x, width)
    assert len(kl) == rows and kl.dtype == np.float32 and base.count == x.count
    if at is None:
        out = np.empty(x.count, dtype=np.float32)
        _LIB.ms_fusion(
            None, 0, *kernels.raw_args(x), *kernels.raw_args(base), kl.ctypes.data, rows, width, 0.0, out.ctypes.data
        )
        return out
    where = np.ascontiguousarray(at, dtype=np.int64)
    out = np.empty(len(where), dtype=np.float32)
    _LIB.ms_fusion_scores(
        *kernels.raw_args(x),
        *kernels.raw_args(base),
        kl.ctypes.data,
        width,
        where.ctypes.data,
        len(where),
        out.ctypes.data,
    )
    return out


def fusion(out: Raw, x: Raw, base: Raw, kl: np.ndarray, width: int, threshold: float) -> None:
    """out = b + (x - b) [|x - b| kl[row] >= threshold], row by row of `width` values."""
    rows = _rows(x, width)
    assert len(kl) == rows and kl.dtype == np.float32 and out.count == x.count == base.count
    _LIB.ms_fusion(
        out.data.ctypes.data, kernels.KINDS[out.dtype], *kernels.raw_args(x), *kernels.raw_args(base),
        kl.ctypes.data, rows, width, threshold, None,
    )  # fmt: skip
