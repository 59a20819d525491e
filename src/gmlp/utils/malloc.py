"""glibc allocator tuning for CPU training and inference.

With glibc's default dynamic mmap threshold, the large activation buffers of a training step are mapped
and unmapped on every allocation, costing millions of page faults per batch. Raising the mmap threshold
and the trim threshold keeps freed memory in the heap for reuse. This is what setting
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` in the environment does, applied at run time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["tune_malloc"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit
_done = False


def tune_malloc(mmap_threshold: int = _MMAP_THRESHOLD_MAX, trim_threshold: int = 1 << 30) -> bool:
    """Raise glibc's mmap/trim thresholds (once per process). Returns False where glibc is not in use.

    Does nothing if the user already set ``MALLOC_MMAP_THRESHOLD_`` or ``GMLP_NO_MALLOC_TUNING=1``.
    """
    global _done
    if _done or os.environ.get("GMLP_NO_MALLOC_TUNING") == "1" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return _done
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1 and ok
    except (OSError, AttributeError):
        return False
    _done = ok
    return ok
