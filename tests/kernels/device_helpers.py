"""Shared by the kernel tests: a stand-in for the kernels' ``_on_device`` that records, while a launch runs,
the tensor whose device it was asked to run on."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


def recording_on_device(
    current: list[torch.Tensor],
) -> Callable[[torch.Tensor], contextlib.AbstractContextManager[None]]:
    """An ``_on_device`` replacement: inside it, ``current[-1]`` is the tensor it was given."""

    @contextlib.contextmanager
    def on_device(t: torch.Tensor) -> Iterator[None]:
        current.append(t)
        try:
            yield
        finally:
            current.pop()

    return on_device
