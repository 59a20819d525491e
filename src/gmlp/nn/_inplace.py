"""When a layer may finish its output in place: inference only, on a tensor it has just made itself."""

from __future__ import annotations

import torch

from ..kernels.cpu_linear import _is_functorch_wrapped, hookless

__all__ = ["hookless", "may_update_in_place"]


def may_update_in_place(out: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether ``out.op_(other)`` may stand for ``out op other``. The caller guarantees that ``out`` is a
    tensor it has just made and that nothing else refers to (see :func:`hookless`); this checks the rest:
    autograd records neither (so it needs neither tensor's old value), the result keeps ``out``'s shape and
    dtype (no broadcast to a larger shape, no type promotion, as under autocast), and no torch.compile trace
    or torch.func transform is running (they keep the out-of-place op)."""
    return (
        not (torch.is_grad_enabled() and (out.requires_grad or other.requires_grad))
        and out.dtype == other.dtype
        and out.shape == other.shape
        and not torch.compiler.is_compiling()
        and not _is_functorch_wrapped(out)
        and not _is_functorch_wrapped(other)
    )
