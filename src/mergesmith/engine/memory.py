"""Keep freed memory in the process, so temporaries do not page-fault afresh on every chunk.

Each chunk's temporaries (masks, |delta|, sign tensors: a few MiB each) are freed and allocated
again for the next chunk. glibc returns large blocks to the kernel (mmap'd allocations, heap trimming),
so every new one faults its pages in again: measured, that was 40% of medium ties' system time.
Raising the mmap and trim thresholds keeps them in the heap for reuse; the resident set stays
bounded by the largest working set, which the executor already bounds by chunks.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


@functools.cache
def keep_freed_memory() -> bool:
    """Tune glibc's malloc once per process; False where there is no glibc (macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(M_MMAP_THRESHOLD, 256 << 20) and mallopt(M_TRIM_THRESHOLD, 1 << 30)
    return bool(ok and mallopt(M_TOP_PAD, 64 << 20))
