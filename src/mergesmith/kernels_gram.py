"""The Gram family's compiled kernels (`kernels_gram.c`): the inner products of a few vectors row by
row, the combination of the inputs by coefficients, and sce's energy-weighted sign-consensus merge,
over raw values; NumPy computes the inner products the same way where the library is missing (the
tests compare the two)."""

from __future__ import annotations

import ctypes

import numpy as np

from mergesmith import kernels
from mergesmith.kernels import Raw

#: The most vectors `gram_rows` takes (slerp's: the base and one other model; model_stock's: the models).
MAX_VECTORS = kernels.MAX_INPUTS + 1


_i64, _i32, _ptr, _f32 = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p, ctypes.c_float
_LIB = kernels.bind(
    {
        "ms_gram": [_ptr, _ptr, _ptr, _i32, _ptr, _i32, _i32, _i64, _i64, _ptr],
        "ms_span": [_ptr, _i32, _ptr, _ptr, _ptr, _i32, _ptr, _i32, _i32, _ptr, _i32, _f32, _f32, _i64],
        "ms_sce": [_ptr, _i32, _ptr, _ptr, _ptr, _i32, _ptr, _i32, _i32, _ptr, _i64],
    }
)


def available() -> bool:
    """Whether the compiled kernels are there (else `gram_rows` runs in NumPy and `span` cannot)."""
    return _LIB is not None


def gram_rows(vs: list[Raw], minus: Raw | None, cols: int) -> np.ndarray:
    """Per row of `cols` values, the (m, m) inner products of the vectors v_i = vs[i] (less `minus`,
    in float32, when given): products exact in float64, added as `kernels.eight_sums` adds them.
    Shape (rows, m, m); the same values with or without the compiled library."""
    m, n = len(vs), vs[0].count
    assert 0 < m <= MAX_VECTORS and cols > 0 and n % cols == 0
    assert all(v.count == n for v in vs) and (minus is None or minus.count == n)
    rows = n // cols
    if _LIB is None:
        wide = [_float32(v).reshape(rows, cols) for v in vs]
        return numpy_gram_rows(wide, None if minus is None else _float32(minus).reshape(rows, cols))
    out = np.empty((rows, m, m), dtype=np.float64)
    ptrs, kinds, vias = kernels.raw_arrays(vs)
    bp, bk, bv = kernels.raw_args(minus) if minus is not None else (None, 0, -1)
    _LIB.ms_gram(ptrs, kinds, vias, m, bp, bk, bv, rows, cols, out.ctypes.data)
    return out


def numpy_gram_rows(vs: list[np.ndarray], minus: np.ndarray | None = None) -> np.ndarray:
    """`gram_rows` of float32 matrices (rows, cols), in NumPy."""
    if minus is not None:
        vs = [v - minus for v in vs]
    wide = [v.astype(np.float64) for v in vs]
    m = len(vs)
    out = np.empty((vs[0].shape[0], m, m), dtype=np.float64)
    for i in range(m):
        for j in range(i, m):
            out[:, i, j] = out[:, j, i] = kernels.eight_sums(wide[i] * wide[j])  # exact products
    return out


def _float32(x: Raw) -> np.ndarray:
    """float32 raw values as an array (all the torch lane gives, the only values without the library)."""
    assert x.dtype == "float32" and x.via is None
    return x.data.view(np.float32)


def span(
    out: Raw, xs: list[Raw], base: Raw, coefficients: list[float], divisor: float | None = None, scale: float = 1.0
) -> None:
    """out = b + scale ((sum_i c_i (x_i - b)) / divisor) (no division when `divisor` is None), in
    float32 with torch's operations (`gram.combine` of the task vectors, `div_`, then `addcmul_` or
    `add_` of the base), bit for bit. Needs the compiled library and dtypes among `raw_kinds()`."""
    _onto_base("ms_span", out, xs, base, coefficients, int(divisor is not None), divisor or 1.0, scale)


def combination(out: Raw, xs: list[Raw], base: Raw | None, coefficients: list[float]) -> None:
    """The inputs combined by `coefficients` as the torch lane's `gram.combine` does: of their task
    vectors, the base added (`span`), or, without a base, of the inputs themselves (`kernels.linear`)."""
    if base is None:
        kernels.linear(out, xs, coefficients, None)
    else:
        span(out, xs, base, coefficients)


def sce(out: Raw, xs: list[Raw], base: Raw, weights: list[float]) -> None:
    """sce's merge of the task vectors x_i - b by `weights` (their energies' shares) where their signs
    agree with the elected one, onto the base: torch's float32 operations (`methods.sce`), bit for bit.
    Needs the compiled library and dtypes among `raw_kinds()`."""
    _onto_base("ms_sce", out, xs, base, weights)


def _onto_base(kernel: str, out: Raw, xs: list[Raw], base: Raw, per_input: list[float], *args: object) -> None:
    """The library's `kernel`(out, xs, base, per_input as float32, *args, count): a merge onto `base`."""
    assert _LIB is not None and 0 < len(xs) <= kernels.MAX_INPUTS and len(per_input) == len(xs)
    assert all(x.count == out.count == base.count for x in xs)
    ptrs, kinds, vias = kernels.raw_arrays(xs)
    c = np.asarray(per_input, dtype=np.float32)
    getattr(_LIB, kernel)(
        out.data.ctypes.data, kernels.KINDS[out.dtype], ptrs, kinds, vias, len(xs), *kernels.raw_args(base),
        c.ctypes.data, *args, out.count,
    )  # fmt: skip
