"""glibc allocator tuning for CPU training and inference.

With glibc's default dynamic mmap threshold, the large activation buffers of a training step are mapped
and unmapped on every allocation, costing millions of page faults per batch. Raising the mmap threshold
and the trim threshold keeps freed memory in the heap for reuse. This is what setting
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` in the environment does, applied at run time.

glibc caps the mmap threshold at 32 MiB, so a buffer above that (an MLM's logits over a 30k vocabulary:
128 MiB at 1,024 tokens) is still mapped, zero-filled page by page and unmapped on every call. With
``disable_mmap`` (``M_MMAP_MAX = 0``, as ``MALLOC_MMAP_MAX_=0`` does) such buffers come from the heap too
and are reused. On the 2-core Intel Xeon of the twelfth session that made the CPU suite's MLM inference
1.44x faster (70.2 to 101.3 sequences/s; the peers, in the same process, 1.22-1.23x) and left gMLP-S/16,
whose buffers are under 32 MiB, unchanged (benchmarks/RESULTS.md). The cost: freed memory goes back to the
system only from the top of the heap (above ``trim_threshold``), as with any caching allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import numbers
import os

__all__ = ["tune_malloc"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit
_INT_MAX = 2**31 - 1  # mallopt takes a C int (ctypes would silently wrap a larger value)
_done = False


def _user_set(env: str, tunable: str) -> bool:
    """Whether the environment sets a malloc parameter (``MALLOC_X_``, or ``glibc.malloc.x`` in
    ``GLIBC_TUNABLES``)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "").split(":")
    return env in os.environ or any(t.split("=", 1)[0].strip() == f"glibc.malloc.{tunable}" for t in tunables)


def tune_malloc(
    mmap_threshold: int = _MMAP_THRESHOLD_MAX, trim_threshold: int = 1 << 30, disable_mmap: bool = True
) -> bool:
    """Raise glibc's mmap/trim thresholds and (``disable_mmap``) serve every allocation from the heap, once
    per process. Returns False where glibc is not in use.

    The setting is the whole process's and stays after the training run that made it returns (glibc has no
    call that reads it back, so it is not restored): a caller that trains from its own process keeps the
    larger heap for its own allocations too.

    Does nothing if the user already set ``MALLOC_MMAP_THRESHOLD_`` or ``GMLP_NO_MALLOC_TUNING=1``; leaves
    the trim threshold alone if ``MALLOC_TRIM_THRESHOLD_`` is set and the mmap count if ``MALLOC_MMAP_MAX_``
    is set (each also when set as its ``GLIBC_TUNABLES`` alias, e.g. ``glibc.malloc.mmap_max``).

    Raises:
        ValueError: a threshold outside ``0 .. 2**31 - 1`` (what ``mallopt`` takes).
    """
    global _done
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= _INT_MAX:
            raise ValueError(f"{name} must be an int in 0 .. {_INT_MAX} (bytes), got {value!r}")
    opted_out = os.environ.get("GMLP_NO_MALLOC_TUNING") == "1"
    if _done or opted_out or _user_set("MALLOC_MMAP_THRESHOLD_", "mmap_threshold"):
        return _done
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
        if not _user_set("MALLOC_TRIM_THRESHOLD_", "trim_threshold"):
            ok = libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1 and ok
        if disable_mmap and not _user_set("MALLOC_MMAP_MAX_", "mmap_max"):
            ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and ok
    except (OSError, AttributeError):
        return False
    _done = ok
    return ok
