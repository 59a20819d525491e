"""Shared test set-up: deterministic seeding, small thread pools and a fast hypothesis profile.

The machine running the suite is small and shared, so every test keeps its tensors tiny and property
tests run few examples (``deadline=None``: timings on a loaded machine are meaningless).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sys
from collections.abc import Iterator

# Without a GPU, Triton kernels run in Triton's interpreter; the switch is read when a kernel is defined,
# so it must be set before anything imports gmlp (and with it triton).
import torch  # noqa: E402  (torch itself does not import triton)

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
# The CPU oneDNN path skips small products by default (host cost); the suite's models are tiny, and every
# property test (padding, causality, parity) must run through the fast path too.
os.environ["GMLP_ONEDNN_MIN_FLOPS"] = "0"
# ... and on a CPU without AVX-512, where it is off by default (slower there), it is switched on for the same
# reason; a run with GMLP_DISABLE_CPU_FUSION=1 tests the plain ops instead.
os.environ.setdefault("GMLP_DISABLE_CPU_FUSION", "0")
# A transformers pipeline called on a list sets TOKENIZERS_PARALLELISM=false for the rest of the process where
# it is unset: set here, every test of a process runs with the same value whatever ran before it.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "gmlp",
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile("gmlp-thorough", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gmlp"))

# One intra-op thread per test process: the tensors are tiny, and `scripts/test.sh` runs one pytest worker
# per core (pytest-xdist), which beats two threads contending inside one process.
torch.set_num_threads(1)


# A subnormal double and one, as names (a product of two literals is folded when the file is compiled): their
# product is 0 only while the CPU flushes subnormal results to zero or reads subnormal inputs as zero (the
# MXCSR FTZ/DAZ bits that `torch.set_flush_denormal(True)` or code built with -ffast-math sets). The bits
# belong to the thread (and to threads it starts later), and torch has no getter for them.
_SUBNORMAL, _ONE = 5e-324, 1.0


def _process_float_state() -> dict[str, object]:
    """The process-wide numerics a test could leave changed for the later tests of its process (about 2 us):
    subnormal flushing, torch's default dtype, float32 matmul precision, deterministic algorithms, intra-op
    threads, grad mode, and torch.compile's recompile limit (None until ``torch._dynamo`` is loaded)."""
    dynamo = sys.modules.get("torch._dynamo.config")
    return {
        "flush_denormal": _SUBNORMAL * _ONE == 0.0,
        "default_dtype": torch.get_default_dtype(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic_algorithms": (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        ),
        "num_threads": torch.get_num_threads(),
        "grad_enabled": torch.is_grad_enabled(),
        "recompile_limit": None if dynamo is None else dynamo.recompile_limit,
    }


_PROCESS_FLOAT_STATE = _process_float_state()  # what every test starts from, and must hand back


def _restore_process_float_state(state: dict[str, object]) -> None:
    torch.set_flush_denormal(bool(state["flush_denormal"]))
    torch.set_default_dtype(state["default_dtype"])
    torch.set_float32_matmul_precision(state["float32_matmul_precision"])
    deterministic, warn_only = state["deterministic_algorithms"]
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.set_num_threads(state["num_threads"])
    torch.set_grad_enabled(state["grad_enabled"])
    if state["recompile_limit"] is not None:
        sys.modules["torch._dynamo.config"].recompile_limit = state["recompile_limit"]


@pytest.fixture(autouse=True)
def _process_float_state_handed_back() -> Iterator[None]:
    """After each test (and its fixtures, of any scope, set up for it), the process's numerics
    (:func:`_process_float_state`) must be what the session started with: if not, the test errors at teardown
    naming what changed, and the state is put back. In a single-process run a later test would otherwise run
    under it (a test that left subnormals flushed made a later hypothesis float strategy refuse to draw)."""
    yield
    now, expected = _process_float_state(), dict(_PROCESS_FLOAT_STATE)
    if expected["recompile_limit"] is None and now["recompile_limit"] is not None:  # loaded since: torch's
        expected["recompile_limit"] = sys.modules["torch._dynamo.config"]._config["recompile_limit"].default
    changed = {k: (expected[k], now[k]) for k in expected if expected[k] != now[k]}
    if changed:
        _restore_process_float_state(expected)
        pytest.fail(f"the test left process-wide state changed (put back now), (expected, found): {changed}")


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Every test starts from the same RNG state (torch, numpy, random), so failures reproduce."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


def _dependence(fn, x: torch.Tensor) -> torch.Tensor:
    """``dep[t, b, t', b']`` = sum over channels of ``|d (r . fn(x)[t, b, :]) / d x[t', b', :]|``.

    ``x`` and ``fn(x)`` are token-major ``(seq, batch, channels)``.

    ``r`` is a random vector per output (one backward pass per output token and sample instead of one per
    output channel): a Jacobian block that is exactly zero gives exactly zero, a non-zero block gives a
    non-zero value with probability one.
    """
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    n, batch = out.shape[:2]
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(1234), dtype=out.dtype)
    dep = torch.zeros(n, batch, x.shape[0], x.shape[1], dtype=out.dtype)
    for t in range(n):
        for b in range(batch):
            (grad,) = torch.autograd.grad((out[t, b] * r[t, b]).sum(), x, retain_graph=True)
            dep[t, b] = grad.abs().sum(-1)
    return dep


def _assert_causal(dep: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Check a dependence tensor from :func:`_dependence` of a causal layer.

    - output t never depends on an input t' > t: EXACTLY zero (``== 0``), not approximately;
    - no sample depends on another sample;
    - a real output depends on no padded input, and on every real input t' <= t (non-zero: this half
      makes the check able to fail when a layer ignores the past or is constant).
    """
    n, batch = dep.shape[0], dep.shape[1]
    same = dep.diagonal(dim1=1, dim2=3).permute(2, 0, 1)  # (batch, t, t')
    future = torch.ones(n, n, dtype=torch.bool).triu(1)
    assert torch.all(same[:, future] == 0), "an output depends on a later token"
    other = ~torch.eye(batch, dtype=torch.bool)
    assert torch.all(dep.permute(1, 3, 0, 2)[other] == 0), "an output depends on another sample"
    real = torch.ones(batch, n, dtype=torch.bool) if mask is None else mask.bool()
    past = ~future
    real_pairs = real[:, :, None] & real[:, None, :] & past  # (batch, t, t')
    assert torch.all(same[real_pairs] > 0), "a real output does not depend on a real earlier token"
    real_on_pad = real[:, :, None] & ~real[:, None, :]
    assert torch.all(same[real_on_pad] == 0), "a real output depends on a padded token"


@pytest.fixture(scope="session")
def dependence():
    """Jacobian-based token dependence, see :func:`_dependence`."""
    return _dependence


@pytest.fixture(scope="session")
def assert_causal():
    """Exact causality / padding-independence check on a dependence tensor, see :func:`_assert_causal`."""
    return _assert_causal


@contextlib.contextmanager
def _recording_onednn_products() -> Iterator[list[torch.dtype]]:
    """Inside: the dtype of the first operand of every oneDNN product of ``gmlp.kernels.cpu_linear``, in
    call order (each product still runs)."""
    from gmlp.kernels import cpu_linear

    calls: list[torch.dtype] = []
    real = cpu_linear._mm

    def spy(a: torch.Tensor, b: torch.Tensor, *rest):
        calls.append(a.dtype)
        return real(a, b, *rest)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_linear, "_mm", spy)
        yield calls


@pytest.fixture(scope="session")
def onednn_products():
    """A context manager recording the oneDNN products made inside it, see
    :func:`_recording_onednn_products` (session-scoped, so that hypothesis tests can use it too)."""
    return _recording_onednn_products


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``inductor`` compile real C++ kernels (torch.compile's CPU backend): skip them, saying
    why, on a machine without a C++ compiler rather than fail."""
    if any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
        return
    skip = pytest.mark.skip(reason="torch.compile's CPU backend (inductor) needs a C++ compiler (g++, $CXX)")
    for item in items:
        if "inductor" in item.keywords:
            item.add_marker(skip)

