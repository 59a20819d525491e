"""When a layer may finish its output in place: inference only, on a tensor it has just made itself."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module_state

from ..kernels.cpu_linear import _is_functorch_wrapped, hookless

__all__ = ["hookless", "may_update_in_place", "plain_call"]


def plain_call(module: nn.Module, cls: type[nn.Module]) -> bool:
    """Whether calling ``module`` runs exactly ``cls.forward``: no hook of any kind (its own or global), no
    subclass or instance ``forward`` and no TorchScript trace, which is the condition of
    ``nn.Module.__call__``'s own shortcut. A caller with validated inputs may then run the computation
    another way (skip the checks, fuse it into a kernel with the module's parameters) without anyone being
    able to tell; otherwise it must call the module."""
    return type(module).forward is cls.forward and "forward" not in module.__dict__ and not (
        torch._C._get_tracing_state()
        or module._forward_hooks or module._forward_pre_hooks
        or module._backward_hooks or module._backward_pre_hooks
        or _module_state._global_forward_hooks or _module_state._global_forward_pre_hooks
        or _module_state._global_backward_hooks or _module_state._global_backward_pre_hooks
    )  # fmt: skip


def may_update_in_place(out: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether ``out.op_(other)`` may stand for ``out op other``. The caller guarantees that ``out`` is a
    tensor it has just made and that nothing else refers to (see :func:`hookless`); this checks the rest:
    autograd records neither (so it needs neither tensor's old value), the result keeps ``out``'s shape and
    dtype (no broadcast to a larger shape, no type promotion, as under autocast), it is not a bfloat16 CPU
    tensor, and no torch.compile or torch.jit trace or torch.func transform is running (they keep the
    out-of-place op).

    On the CPU, aten's in-place ``mul_`` / ``add_`` on bfloat16 ran about 1.5x slower than the out-of-place
    op (0.86-0.91 against 0.58-0.63 ms over 4.8M values; float32 in place 1.6x faster, float16 level), and
    gMLP-S/16 bf16-autocast inference ran 1.02-1.07x faster with the gating product out of place (three
    interleaved A/Bs; benchmarks/RESULTS.md, fourteenth session)."""
    return (
        # first: torch.jit.trace re-traces under no_grad to check its graph, which must come out the same
        # (even the tracer's value names, which reading the tensors' attributes here would change)
        not torch.jit.is_tracing()
        and not (torch.is_grad_enabled() and (out.requires_grad or other.requires_grad))
        and out.dtype == other.dtype
        and not (out.dtype is torch.bfloat16 and out.is_cpu)
        and out.shape == other.shape
        and not torch.compiler.is_compiling()
        and not _is_functorch_wrapped(out)
        and not _is_functorch_wrapped(other)
    )
