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


def test_users_glibc_tunable_is_left_alone() -> None:
    """GLIBC_TUNABLES=glibc.malloc.mmap_max=N is MALLOC_MMAP_MAX_=N under its modern name: it wins too."""
    out = probe(GLIBC_TUNABLES="glibc.malloc.hugetlb=0:glibc.malloc.mmap_max=65536")
    assert out["tuned"] is True
    assert out["mmapped_bytes"] >= 2**26, out


class FakeLibc:
    """Records the mallopt calls tune_malloc makes, as glibc would accept them."""

    def __init__(self) -> None:
        self.calls: dict[int, int] = {}

    def mallopt(self, param: int, value: int) -> int:
        self.calls[param] = value
        return 1


@pytest.fixture
def fake_libc(monkeypatch: pytest.MonkeyPatch) -> FakeLibc:
    from gmlp.utils import malloc

    libc = FakeLibc()
    monkeypatch.setattr(malloc, "_done", False)
    monkeypatch.setattr(malloc.ctypes, "CDLL", lambda name: libc)
    for key in [k for k in os.environ if k.startswith(("MALLOC_", "GMLP_NO_MALLOC", "GLIBC_TUNABLES"))]:
        monkeypatch.delenv(key)
    return libc


@pytest.mark.parametrize(
    ("env", "untouched"),
    [({}, set()), ({"MALLOC_TRIM_THRESHOLD_": "0"}, {-1}), ({"MALLOC_MMAP_MAX_": "8"}, {-4}),
     ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, {-1}),
     ({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.malloc.mmap_max=8"}, {-4}),
     ({"GLIBC_TUNABLES": "glibc.malloc.mmap_maxx=8"}, set())],
    ids=["none", "trim-env", "mmap-max-env", "trim-tunable", "mmap-max-tunable", "other-tunable"],
)  # fmt: skip
def test_each_parameter_the_user_set_is_left_alone(
    fake_libc: FakeLibc, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], untouched: set[int]
) -> None:
    from gmlp.utils.malloc import tune_malloc

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert tune_malloc(mmap_threshold=1 << 20, trim_threshold=1 << 29) is True
    expected = {-3: 1 << 20, -1: 1 << 29, -4: 0}  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_MMAP_MAX
    assert fake_libc.calls == {k: v for k, v in expected.items() if k not in untouched}
    fake_libc.calls.clear()
    assert tune_malloc() is True and fake_libc.calls == {}  # once per process


@pytest.mark.parametrize("env", [{"MALLOC_MMAP_THRESHOLD_": "1"}, {"GMLP_NO_MALLOC_TUNING": "1"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"}])  # fmt: skip
def test_a_users_mmap_threshold_or_opt_out_means_no_tuning(
    fake_libc: FakeLibc, monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    from gmlp.utils.malloc import tune_malloc

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert tune_malloc() is False and fake_libc.calls == {}


@pytest.mark.parametrize(("kwargs", "name"), [({"trim_threshold": 4 << 30}, "trim_threshold"),
                                              ({"mmap_threshold": -1}, "mmap_threshold"),
                                              ({"mmap_threshold": 2.5e7}, "mmap_threshold")])  # fmt: skip
def test_thresholds_mallopt_cannot_take_are_refused(fake_libc: FakeLibc, kwargs: dict, name: str) -> None:
    """mallopt takes a C int: 4 GiB would reach glibc as 0 (trim on every free) through ctypes' masking."""
    from gmlp.utils.malloc import tune_malloc

    with pytest.raises(ValueError, match=rf"{name} must be an int in 0 \.\. 2147483647.*got"):
        tune_malloc(**kwargs)
    assert fake_libc.calls == {}
