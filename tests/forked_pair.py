"""Two forked processes of a test (a ``torch.distributed`` gloo group of two, set up by the function run)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest


def run_two_forked(fn: Callable[..., None], args: tuple[Any, ...], timeout_s: float = 60) -> None:
    """``fn(rank, *args)`` in two forked processes (fork: no second import of torch); fails the test, after
    killing them, when they have not ended within ``timeout_s`` (one waits for the other)."""
    import torch.multiprocessing as mp

    context = mp.start_processes(fn, args=args, nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the processes did not end: one waits for the other")
