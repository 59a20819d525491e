"""The CPU fast path switched on or off for a block of a test (imported by the tests of this folder)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def cpu_fusion(enabled: bool) -> Iterator[None]:
    """The oneDNN fast path on (as the suite runs it) or off (the plain ops) inside, through
    ``GMLP_DISABLE_CPU_FUSION``; the variable as it was after."""
    old = os.environ.get("GMLP_DISABLE_CPU_FUSION")
    os.environ["GMLP_DISABLE_CPU_FUSION"] = "0" if enabled else "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["GMLP_DISABLE_CPU_FUSION"]
        else:
            os.environ["GMLP_DISABLE_CPU_FUSION"] = old
