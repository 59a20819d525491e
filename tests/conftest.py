"""Shared test set-up: deterministic seeding, small thread pools and a fast hypothesis profile.

The machine running the suite is small and shared, so every test keeps its tensors tiny and property
tests run few examples (``deadline=None``: timings on a loaded machine are meaningless).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
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

