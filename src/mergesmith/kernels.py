"""The compiled kernels of `_kernels.c`, or NumPy computing the same values where it is missing.

(Over 400 lines: each kernel keeps its ctypes binding and its NumPy twin side by side, because the
tests compare the two and a change to one must be seen next to the other.)

The extension is built when mergesmith is installed from source (optional: a machine without a C
compiler still installs, and gets the NumPy versions, ~10x slower for DARE masks). `available()`
says which one runs; `MERGESMITH_NO_KERNELS=1` forces NumPy (the tests compare the two).

The random stream of a 64-bit key: output j = SplitMix64's finaliser of key + (j + 1) * gamma,
word w = low (even w) or high (odd w) 32 bits of output w // 2.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from mergesmith.dtypes import DTYPE_BYTES
from mergesmith.lazy_torch import torch

GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _load() -> ctypes.CDLL | None:
    if os.environ.get("MERGESMITH_NO_KERNELS"):
        return None
    spec = importlib.util.find_spec("mergesmith._kernels")
    if spec is None or not spec.origin or not spec.origin.endswith((".so", ".pyd", ".dylib")):
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError:
        return None
    u64, i64, u32, i32, ptr = ctypes.c_uint64, ctypes.c_int64, ctypes.c_uint32, ctypes.c_int32, ctypes.c_void_p
    lib.ms_words.argtypes = [u64, u64, i64, ptr]
    lib.ms_keep_mask.argtypes = [u64, u64, i64, u32, ptr]
    lib.ms_keep_apply.argtypes = [u64, u64, i64, u32, ptr]
    lib.ms_uniform.argtypes = [u64, u64, i64, ptr]
    for f in (lib.ms_words, lib.ms_keep_mask, lib.ms_keep_apply, lib.ms_uniform):
        f.restype = None
    lib.ms_row_l1.argtypes = [ptr, i64, i64, ptr]
    lib.ms_row_l1.restype = None
    lib.ms_keep_apply_l1.argtypes = [u64, u64, i64, i64, u32, ptr, ptr, ptr]
    lib.ms_keep_apply_l1.restype = None
    lib.ms_ties_combine.argtypes = [ptr, ctypes.c_int32, ptr, ctypes.c_int32, ctypes.c_float, i64]
    lib.ms_ties_combine.restype = None
    lib.ms_bracket.argtypes = [ptr, i64, ctypes.c_float, ctypes.c_float, ptr, ptr]
    lib.ms_bracket.restype = i64
    lib.ms_linear.argtypes = [ptr, i32, ptr, ptr, ptr, i32, ptr, i32, ctypes.c_float, i64]
    lib.ms_linear.restype = None
    lib.ms_nearswap.argtypes = [ptr, i32, ptr, i32, i32, ptr, i32, i32, ctypes.c_float, ctypes.c_float, i64]
    lib.ms_nearswap.restype = None
    lib.ms_nonfinite.argtypes = [ptr, i32, i64]
    lib.ms_nonfinite.restype = i64
    lib.ms_has_f16.restype = i32
    lib.ms_delta_bracket.argtypes = [ptr, i32, i32, ptr, i32, i32, i64, i32, ctypes.c_float, ctypes.c_float, ptr, ptr]
    lib.ms_delta_bracket.restype = i64
    lib.ms_delta_keep_l1.argtypes = [ptr, i32, i32, ptr, i32, i32, i64, i64, u64, u64, u64, ptr, ptr]
    lib.ms_delta_keep_l1.restype = None
    f32 = ctypes.c_float
    lib.ms_task_merge.argtypes = [ptr, i32, ptr, ptr, ptr, i32, ptr, i32, i32, ptr, i32, i32, f32, f32, f32, i64]
    lib.ms_task_merge.restype = None
    try:  # newer than the rest: a library built before it still loads (its callers use NumPy)
        lib.ms_row_ranks.argtypes = [ptr, i64, i64, ptr]
        lib.ms_row_ranks.restype = i32
    except AttributeError:
        pass
    try:  # ram's kernels (kernels_ram.c): a library built before them still loads (ram then uses torch)
        lib.ms_ram_overlap.argtypes = [ptr, ptr, ptr, i32, ptr, i32, i32, f32, i64, ptr, ptr]
        lib.ms_ram_overlap.restype = None
        lib.ms_ramplus.argtypes = [ptr, i32, ptr, ptr, ptr, i32, ptr, i32, i32, f32, ptr, i64]
        lib.ms_ramplus.restype = None
    except AttributeError:
        pass
    return lib


_LIB = _load()


def available() -> bool:
    return _LIB is not None


def bind(signatures: dict[str, list]) -> ctypes.CDLL | None:
    """The compiled library with these kernels' argument types set (each returns nothing), or None
    where it is missing or was built before them: for the kernels' sibling modules (`kernels_gram`,
    `kernels_fusion`)."""
    if _LIB is None or not all(hasattr(_LIB, name) for name in signatures):
        return None
    for name, argtypes in signatures.items():
        kernel = getattr(_LIB, name)
        kernel.argtypes, kernel.restype = argtypes, None
    return _LIB


def _outputs(key: int, first: int, count: int) -> np.ndarray:
    """64-bit outputs first .. first + count (NumPy; uint64 arithmetic wraps like C's)."""
    z = np.arange(first + 1, first + count + 1, dtype=np.uint64)
    z *= GAMMA
    z += np.uint64(key)
    t = np.empty_like(z)
    for shift, mult in ((30, _M1), (27, _M2)):
        np.right_shift(z, np.uint64(shift), out=t)
        z ^= t
        z *= mult
    np.right_shift(z, np.uint64(31), out=t)
    z ^= t
    return z


def words(key: int, start: int, count: int) -> np.ndarray:
    """32-bit words start .. start + count of the stream of `key`."""
    if _LIB is None:
        return numpy_words(key, start, count)
    out = np.empty(count, dtype=np.uint32)
    _LIB.ms_words(key, start, count, out.ctypes.data)
    return out


def numpy_words(key: int, start: int, count: int) -> np.ndarray:
    """`words` computed with NumPy (the fallback, and the tests' cross-check of the C code)."""
    out = np.empty(count, dtype=np.uint32)
    first = start // 2
    z = _outputs(key, first, (start + count + 1) // 2 - first)
    both = np.empty(2 * z.size, dtype=np.uint32)
    both[0::2] = z & np.uint64(0xFFFFFFFF)
    both[1::2] = z >> np.uint64(32)
    out[:] = both[start % 2 : start % 2 + count]
    return out


def keep_mask(key: int, start: int, count: int, cut: int) -> np.ndarray:
    """word < cut for each word (a boolean array)."""
    if _LIB is not None:
        out = np.empty(count, dtype=np.bool_)
        _LIB.ms_keep_mask(key, start, count, cut, out.ctypes.data)
        return out
    return words(key, start, count) < np.uint32(cut)


def keep_apply(x: np.ndarray, key: int, start: int, cut: int) -> None:
    """x *= (word < cut), in place, for a contiguous float32 array (its flat order)."""
    assert x.dtype == np.float32 and x.flags.c_contiguous
    if _LIB is not None:
        _LIB.ms_keep_apply(key, start, x.size, cut, x.ctypes.data)
        return
    flat = x.reshape(-1)
    np.multiply(flat, keep_mask(key, start, flat.size, cut), out=flat)


def uniform(key: int, start: int, count: int) -> np.ndarray:
    """Float32 uniforms in [0, 1): (word >> 8) * 2**-24."""
    out = np.empty(count, dtype=np.float32)
    if _LIB is not None:
        _LIB.ms_uniform(key, start, count, out.ctypes.data)
        return out
    np.multiply((words(key, start, count) >> np.uint32(8)).astype(np.float32), np.float32(2**-24), out=out)
    return out


class Bracket(NamedTuple):
    """Values against a bracket [lo, hi]: counted below and at its ends, gathered strictly inside.
    Model deltas are discrete: many of them equal lo or hi, and are only counted."""

    below: int  # not >= lo (NaN among them)
    at_lo: int  # equal to lo
    inside: np.ndarray  # strictly between lo and hi (above lo without hi), in order
    at_hi: int  # equal to hi, and not to lo

    @property
    def total(self) -> int:
        return self.below + self.at_lo + len(self.inside) + self.at_hi


def _counts() -> ctypes.Array:
    return (ctypes.c_int64 * 3)(0, 0, 0)


def bracket(a: np.ndarray, lo: float, hi: float | None) -> Bracket:
    """The `Bracket` of magnitudes `a` (contiguous float32); hi None: no upper bound."""
    flat = a.reshape(-1)
    assert flat.dtype == np.float32 and flat.flags.c_contiguous
    if _LIB is None:
        return numpy_bracket(flat, lo, hi)
    out = np.empty(flat.size, dtype=np.float32)
    counts = _counts()
    k = _LIB.ms_bracket(flat.ctypes.data, flat.size, lo, np.nan if hi is None else hi, out.ctypes.data, counts)
    return Bracket(counts[0], counts[1], out[:k].copy(), counts[2])


def numpy_bracket(a: np.ndarray, lo: float, hi: float | None) -> Bracket:
    ge = a >= np.float32(lo)
    at_lo = a == np.float32(lo)
    at_hi = (a == np.float32(hi)) & ~at_lo if hi is not None else np.zeros(a.shape, dtype=bool)
    inside = ge & ~at_lo & ~at_hi
    if hi is not None:
        inside &= a <= np.float32(hi)
    return Bracket(a.size - int(np.count_nonzero(ge)), int(np.count_nonzero(at_lo)), a[inside], int(at_hi.sum()))


def row_l1(x: np.ndarray) -> np.ndarray:
    """Per-row sums of |x| (float64) of a contiguous float32 matrix: eight running sums per row
    (column c into sum c % 8, in order), added pairwise; the same in C and NumPy, bit for bit."""
    assert x.ndim == 2 and x.dtype == np.float32 and x.flags.c_contiguous
    if _LIB is None:
        return numpy_row_l1(x)
    out = np.empty(x.shape[0], dtype=np.float64)
    _LIB.ms_row_l1(x.ctypes.data, x.shape[0], x.shape[1], out.ctypes.data)
    return out


def row_ranks(x: np.ndarray) -> np.ndarray:
    """Per row of a contiguous float32 matrix, each element's place (float32) in the order of |x|,
    ties by position: a per-row radix sort in C (~10x NumPy's sort here), else `numpy_row_ranks`."""
    assert x.ndim == 2 and x.dtype == np.float32 and x.flags.c_contiguous and x.shape[1] < 1 << 24
    ranks = getattr(_LIB, "ms_row_ranks", None) if _LIB is not None else None
    if ranks is None:
        return numpy_row_ranks(x)
    out = np.empty_like(x)
    if ranks(x.ctypes.data, x.shape[0], x.shape[1], out.ctypes.data) != 0:
        return numpy_row_ranks(x)  # no scratch memory for the C sort
    return out


def numpy_row_ranks(x: np.ndarray) -> np.ndarray:
    """`row_ranks` by one NumPy sort of the unique keys (|x|'s bits << 32 | position) and a scatter."""
    n = x.shape[1]
    a = np.abs(x)  # non-negative floats order as their bit patterns
    keys = (a.view(np.uint32).astype(np.uint64) << np.uint64(32)) | np.arange(n, dtype=np.uint64)
    keys.sort(axis=1)
    order = (keys & np.uint64(0xFFFFFFFF)).astype(np.intp)
    places = np.broadcast_to(np.arange(n, dtype=np.float32), order.shape)
    np.put_along_axis(a, order, places, axis=1)
    return a


def numpy_row_l1(x: np.ndarray) -> np.ndarray:
    return eight_sums(np.abs(x.astype(np.float64)))


def eight_sums(a: np.ndarray) -> np.ndarray:
    """Per row of a float64 matrix, the sum the C kernels take: column c into running sum c % 8, in
    order, the eight added pairwise (NumPy's own sums are pairwise, in another order)."""
    rows, cols = a.shape
    k = cols // 8
    sums = np.zeros((rows, 8), dtype=np.float64)
    for i in range(k):
        sums += a[:, 8 * i : 8 * i + 8]
    tail = cols - 8 * k
    sums[:, :tail] += a[:, 8 * k :]
    return ((sums[:, 0] + sums[:, 1]) + (sums[:, 2] + sums[:, 3])) + (
        (sums[:, 4] + sums[:, 5]) + (sums[:, 6] + sums[:, 7])
    )


def keep_apply_l1(x: np.ndarray, key: int, start: int, cut: int) -> tuple[np.ndarray, np.ndarray]:
    """`keep_apply` on a contiguous float32 matrix, returning its per-row L1 norms before and after."""
    assert x.ndim == 2 and x.dtype == np.float32 and x.flags.c_contiguous
    if _LIB is None:
        before = numpy_row_l1(x)
        keep_apply(x, key, start, cut)
        return before, numpy_row_l1(x)
    before = np.empty(x.shape[0], dtype=np.float64)
    after = np.empty(x.shape[0], dtype=np.float64)
    _LIB.ms_keep_apply_l1(key, start, x.shape[0], x.shape[1], cut, x.ctypes.data, before.ctypes.data, after.ctypes.data)
    return before, after


def ties_combine(deltas: list[np.ndarray], weights: list[float], normalize: bool, floor: float) -> np.ndarray | None:
    """TIES' sign consensus and disjoint merge of weighted task vectors (contiguous float32 arrays of
    one size), in place into deltas[0], as `task_vectors.merge_task_vectors` computes it with torch;
    None (nothing done) without the compiled library."""
    if _LIB is None:
        return None
    n = deltas[0].size
    assert all(d.dtype == np.float32 and d.flags.c_contiguous and d.size == n for d in deltas)
    ptrs = (ctypes.c_void_p * len(deltas))(*[d.ctypes.data for d in deltas])
    w = np.asarray(weights, dtype=np.float32)
    _LIB.ms_ties_combine(ptrs, len(deltas), w.ctypes.data, int(normalize), floor, n)
    return deltas[0]


#: The raw float formats of model files the kernels read and write (torch's dtype names).
KINDS = {"float32": 0, "bfloat16": 1, "float16": 2}
#: Per floating dtype, the bits that make a value NaN or infinite: (word, mask), the value's bits
#: `& mask == mask` (all exponent bits set; float8_e4m3fn has no infinities, its NaN is S.1111.111).
_NONFINITE = {
    "float32": (np.uint32, 0x7F800000),
    "bfloat16": (np.uint16, 0x7F80),
    "float16": (np.uint16, 0x7C00),
    "float64": (np.uint64, 0x7FF0000000000000),
    "float8_e5m2": (np.uint8, 0x7C),
    "float8_e4m3fn": (np.uint8, 0x7F),
}
#: Values per step of the NumPy scan: bounds its temporaries (the masked words and the comparison).
SCAN_CHUNK = 1 << 24


def raw_kinds() -> frozenset[str]:
    """The dtypes `linear` reads and writes here (float16 needs a compiler with `_Float16`)."""
    if _LIB is None:
        return frozenset()
    return frozenset(KINDS) if _LIB.ms_has_f16() else frozenset(("float32", "bfloat16"))


@dataclass(frozen=True)
class Raw:
    """Values as the bytes of a model file: `data` (contiguous bytes), their dtype (torch's name),
    and the dtype they are rounded through when read (the recipe's `dtype`), if any."""

    data: np.ndarray
    dtype: str
    via: str | None = None

    @property
    def count(self) -> int:
        return self.data.nbytes // DTYPE_BYTES[self.dtype]


def raw_args(x: Raw) -> tuple[int, int, int]:
    """(address, kind, via kind or -1) of raw values, as the kernels take them."""
    return x.data.ctypes.data, KINDS[x.dtype], KINDS[x.via] if x.via else -1


def raw_arrays(xs: list[Raw]) -> tuple[ctypes.Array, ctypes.Array, ctypes.Array]:
    """`raw_args` of several inputs, as the C arrays (addresses, kinds, via kinds) the kernels take."""
    m = len(xs)
    args = [raw_args(x) for x in xs]
    ptrs = (ctypes.c_void_p * m)(*[a[0] for a in args])
    kinds = (ctypes.c_int32 * m)(*[a[1] for a in args])
    vias = (ctypes.c_int32 * m)(*[a[2] for a in args])
    return ptrs, kinds, vias


def linear(out: Raw, xs: list[Raw], weights: list[float], divisor: float | None) -> None:
    """out = (x_0 w_0 + x_1 w_1 + ...) / divisor (no division when `divisor` is None), in float32
    with the operations of `methods.linear` in torch, bit for bit. Needs the compiled library, and
    every dtype among `raw_kinds()`."""
    assert _LIB is not None and {out.dtype, *(x.dtype for x in xs), *(x.via for x in xs if x.via)} <= raw_kinds()
    n = out.count
    assert all(x.count == n for x in xs)
    m = len(xs)
    ptrs, kinds, vias = raw_arrays(xs)
    w = np.asarray(weights, dtype=np.float32)
    norm = divisor is not None
    _LIB.ms_linear(
        out.data.ctypes.data, KINDS[out.dtype], ptrs, kinds, vias, m, w.ctypes.data, int(norm), divisor or 1.0, n
    )


def nearswap(out: Raw, x: Raw, base: Raw, t: float) -> None:
    """out = b + d clamp(t / max(|d|, 1e-6), 0, 1) with d = x - b, in float32 with the operations of
    `methods.nearswap` in torch, bit for bit. Needs the compiled library and dtypes among `raw_kinds()`."""
    assert _LIB is not None and {out.dtype, x.dtype, base.dtype, *(r.via for r in (x, base) if r.via)} <= raw_kinds()
    assert x.count == base.count == out.count
    (xp, xk, xv), (bp, bk, bv) = raw_args(x), raw_args(base)
    _LIB.ms_nearswap(out.data.ctypes.data, KINDS[out.dtype], xp, xk, xv, bp, bk, bv, t, 1e-6, out.count)


def has_ram() -> bool:
    """Whether the compiled library has ram's kernels (`ram_overlap`, `ramplus`)."""
    return _LIB is not None and hasattr(_LIB, "ms_ramplus")


def ram_overlap(xs: list[Raw], base: Raw, epsilon: float) -> list[tuple[int, int]]:
    """Per model, (its active values that other models change too, those only it changes), active
    meaning |x_i - b| > epsilon in float32, as `methods.ram.Overlap` counts them in torch."""
    assert has_ram() and 0 < len(xs) <= MAX_INPUTS and all(x.count == base.count for x in xs)
    m = len(xs)
    ptrs, kinds, vias = raw_arrays(xs)
    bp, bk, bv = raw_args(base)
    shared, unique = np.zeros(m, dtype=np.int64), np.zeros(m, dtype=np.int64)
    _LIB.ms_ram_overlap(ptrs, kinds, vias, m, bp, bk, bv, epsilon, base.count, shared.ctypes.data, unique.ctypes.data)
    return [(int(s), int(u)) for s, u in zip(shared, unique, strict=True)]


def ramplus(out: Raw, xs: list[Raw], base: Raw, epsilon: float, boosts: list[float]) -> None:
    """ramplus_tl's merge over raw values: out = b + sum_i tau_i w_i (w_i: `boosts[i]` where only
    model i is active, 1/c where c > 1 are), in float32 with torch's operations, bit for bit."""
    assert has_ram() and 0 < len(xs) <= MAX_INPUTS and all(x.count == out.count == base.count for x in xs)
    m = len(xs)
    ptrs, kinds, vias = raw_arrays(xs)
    bp, bk, bv = raw_args(base)
    b = np.asarray(boosts, dtype=np.float32)
    _LIB.ms_ramplus(
        out.data.ctypes.data, KINDS[out.dtype], ptrs, kinds, vias, m, bp, bk, bv, epsilon, b.ctypes.data, out.count
    )


def nonfinite(data: np.ndarray | memoryview | torch.Tensor, dtype: str | None = None) -> int:
    """How many NaN or infinite values `data` holds: raw bytes (an array or memoryview) of `dtype`,
    or a tensor of its own dtype, scanned as its bytes (copied only where it is not contiguous or
    not on the CPU). 0 for integer and bool dtypes. The one NaN scan: the audit checks every chunk
    the engine writes with it, `verify` and resumed shards every tensor read back."""
    if not isinstance(data, np.ndarray | memoryview):
        dtype = str(data.dtype).removeprefix("torch.")
        if dtype not in _NONFINITE:
            return 0
        data = data.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    assert dtype is not None
    if dtype not in _NONFINITE:
        return 0
    raw = np.frombuffer(data, dtype=np.uint8) if isinstance(data, memoryview) else data
    if _LIB is not None and dtype in KINDS:  # (per chunk of a merge: nothing else on this path)
        return int(_LIB.ms_nonfinite(raw.ctypes.data, KINDS[dtype], raw.nbytes // DTYPE_BYTES[dtype]))
    word, mask = _NONFINITE[dtype]  # without the compiled kernel (or for its dtypes): NumPy, in steps
    values, bits, bad = raw.reshape(-1).view(np.uint8).view(word), word(mask), 0
    for start in range(0, values.size, SCAN_CHUNK):
        bad += int(np.count_nonzero((values[start : start + SCAN_CHUNK] & bits) == bits))
    return bad


def delta(x: Raw, base: Raw) -> np.ndarray:
    """x - base as float32 (each rounded through its `via` first): torch's `x.sub_(base)`, bit for bit."""
    out = Raw(np.empty(x.count, dtype=np.float32), "float32")
    linear(out, [x, base], [1.0, -1.0], None)  # x * 1, then fma(base, -1, x): one rounding of x - base
    return out.data


def delta_bracket(x: Raw, base: Raw, lo: float | None, hi: float | None) -> Bracket:
    """`bracket` of the magnitudes |x - base|, without storing them. Without `lo` nothing counts as
    below or at lo, those equal to `hi` are counted and those under it gathered (every one, NaN
    included, without `hi` either), as `sparsify._TopK.observe` does."""
    assert _LIB is not None and x.count == base.count
    out = np.empty(x.count, dtype=np.float32)
    counts = _counts()
    k = _LIB.ms_delta_bracket(
        *raw_args(x), *raw_args(base), x.count, lo is not None, lo or 0.0, np.nan if hi is None else hi,
        out.ctypes.data, counts,
    )  # fmt: skip
    return Bracket(counts[0], counts[1], out[:k].copy(), counts[2])


def delta_keep_l1(x: Raw, base: Raw, cols: int, key: int, start: int, cut: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row (of `cols` values) of x - base, the L1 norms (as `row_l1` sums them) before and after
    keeping the values whose word of the stream of `key` (from word `start`) is below `cut`."""
    assert _LIB is not None and x.count == base.count and x.count % cols == 0
    rows = x.count // cols
    before = np.empty(rows, dtype=np.float64)
    after = np.empty(rows, dtype=np.float64)
    _LIB.ms_delta_keep_l1(
        *raw_args(x), *raw_args(base), rows, cols, key, start, cut, before.ctypes.data, after.ctypes.data
    )
    return before, after


class Rule(ctypes.Structure):
    """How the merging pass (`task_merge`) prunes and weighs one input's delta d:
    KEEP d; ZERO d * 0; SHRINK 0 where -t <= d <= t (torch's `hardshrink`); BUDGET d * keep, keep
    where |d| > t and for the first `budget` values with |d| == t; DROP d * (word < cut) over the
    stream of `key` from word `start`, then d * ratio if `rescale`. Then d * weight."""

    KEEP, ZERO, SHRINK, BUDGET, DROP = range(5)
    _fields_ = [
        ("mode", ctypes.c_int32),
        ("t", ctypes.c_float),
        ("budget", ctypes.c_int64),
        ("key", ctypes.c_uint64),
        ("start", ctypes.c_uint64),
        ("cut", ctypes.c_uint64),
        ("rescale", ctypes.c_int32),
        ("ratio", ctypes.c_float),
        ("weight", ctypes.c_float),
    ]


#: The most inputs (besides the base) `task_merge` takes.
MAX_INPUTS = 16


def task_merge(
    out: Raw,
    xs: list[Raw],
    base: Raw,
    rules: list[Rule],
    *,
    consensus: bool,
    normalize: bool,
    floor: float = 0.0,
    divisor: float = 1.0,
    lambda_: float = 1.0,
) -> None:
    """out = base + lambda * combine(prune_i(x_i - base) * w_i) by `rules` (`methods.task_vectors`'s
    pipeline with torch, bit for bit): TIES' sign consensus and disjoint sum (normalised, divisors
    raised to `floor`) or the plain sum (divided by `divisor` when `normalize`)."""
    m = len(xs)
    assert _LIB is not None and 0 < m <= MAX_INPUTS and len(rules) == m
    assert all(x.count == out.count for x in (*xs, base))
    ptrs, kinds, vias = raw_arrays(xs)
    table = (Rule * m)(*rules)
    _LIB.ms_task_merge(
        out.data.ctypes.data, KINDS[out.dtype], ptrs, kinds, vias, m, *raw_args(base), table,
        int(consensus), int(normalize), floor, divisor, lambda_, out.count,
    )  # fmt: skip
