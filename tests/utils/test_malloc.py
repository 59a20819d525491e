"""gmlp.utils.malloc.tune_malloc: large buffers come from the heap, not from fresh mmaps (glibc only)."""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None, reason="needs glibc"
)

# In a fresh process: tune (or not), then allocate and free a 64 MiB tensor twice, above glibc's 32 MiB mmap
# ceiling, and report what glibc's mallinfo2 says about mmapped chunks while the second one is alive.
PROBE = """
import ctypes, json, torch
from gmlp.utils.malloc import tune_malloc

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
tuned = tune_malloc()
x = torch.ones(16 * 2**20)
del x
y = torch.ones(16 * 2**20)
info = libc.mallinfo2()
print(json.dumps({"tuned": tuned, "mmapped_chunks": info.hblks, "mmapped_bytes": info.hblkhd}))
"""


def probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GMLP_NO_MALLOC"))}
    proc = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tuned_process_keeps_large_buffers_in_the_heap() -> None:
    out = probe()
    assert out["tuned"] is True
    assert out["mmapped_bytes"] < 2**26, out  # the 64 MiB tensor is not a mapping of its own


def test_untuned_process_maps_large_buffers() -> None:
    """The control: opted out, glibc maps the 64 MiB buffer (so the test above can fail)."""
    out = probe(GMLP_NO_MALLOC_TUNING="1")
    assert out["tuned"] is False
    assert out["mmapped_chunks"] >= 1 and out["mmapped_bytes"] >= 2**26, out


def test_users_mmap_max_is_left_alone() -> None:
    """A user's own MALLOC_MMAP_MAX_ wins: the thresholds are still raised, large buffers still mapped."""
    out = probe(MALLOC_MMAP_MAX_="65536")
    assert out["tuned"] is True
    assert out["mmapped_bytes"] >= 2**26, out
