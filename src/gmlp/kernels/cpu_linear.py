"""CPU inference fast path for the channel projections: one oneDNN matmul with the bias (and GELU) in its
epilogue.

On the CPU, ``F.linear`` runs as BLAS ``addmm``, which first writes the broadcast bias into its output and
then accumulates the product onto it, and a GELU after it is one more pass over the activation. oneDNN's
matmul (``torch.ops.mkldnn._linear_pointwise``, the op inductor's CPU backend uses for the same fusion)
adds the bias and applies the GELU while the output tile is still in registers. On the 2-core AMD EPYC
used here it also runs the product itself faster than the BLAS call (benchmarks/RESULTS.md).

The fast path is taken only where autograd is not recording (inference: ``torch.no_grad`` /
``torch.inference_mode``), for float32 CPU tensors outside autocast, torch.compile / torch.export and
``torch.jit.trace``, with oneDNN available and enabled and ``GMLP_DISABLE_CPU_FUSION`` not ``1``. Everywhere
else :func:`fused_linear` runs :func:`fused_linear_reference`, the plain ops it is tested against.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_state

__all__ = ["apply_linear", "cpu_fusion_enabled", "fused_linear", "fused_linear_reference", "is_plain_linear"]

ACTIVATIONS = (None, "gelu")


def _onednn_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):  # a build without the op
        return False


_HAS_ONEDNN_LINEAR = _onednn_linear_available()


def _can_run(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The hard requirements of the oneDNN path: the op, float32 CPU tensors, autograd not recording."""
    return (
        _HAS_ONEDNN_LINEAR
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.numel() > 0
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def cpu_fusion_enabled(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`fused_linear` takes the oneDNN path for ``x`` and ``weight`` by default (see the
    module docstring for the conditions)."""
    return (
        not torch.compiler.is_compiling()  # first: inductor fuses for itself (and shapes may be symbolic)
        and not torch.jit.is_tracing()  # traced graphs (TorchScript ONNX export) keep portable ops
        and os.environ.get("GMLP_DISABLE_CPU_FUSION") != "1"
        and not torch.is_autocast_enabled("cpu")
        and torch.backends.mkldnn.enabled
        and _can_run(x, weight)
    )


def fused_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, then ``F.gelu`` (exact, erf form) when ``activation == "gelu"``."""
    y = F.linear(x, weight, bias)
    return F.gelu(y) if activation == "gelu" else y


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None = None,
    use_onednn: bool | None = None,
) -> torch.Tensor:
    """``activation(x @ weight.T + bias)`` for ``x`` of shape ``(..., in_features)``.

    Args:
        x: input, ``(..., in_features)``.
        weight: ``(out_features, in_features)``.
        bias: ``(out_features,)`` or None.
        activation: None or ``"gelu"`` (exact GELU, as ``F.gelu``).
        use_onednn: True takes the oneDNN path wherever it can run (float32 CPU tensors, autograd not
            recording), whatever the switches of :func:`cpu_fusion_enabled`; False the reference; None
            (default) picks it by :func:`cpu_fusion_enabled`.

    Raises:
        ValueError: ``activation`` is not one of None, ``"gelu"``, or ``use_onednn=True`` where the oneDNN
            path cannot run (autograd recording, not float32 on the CPU, oneDNN missing).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or 'gelu', got {activation!r}")
    if use_onednn is None:
        use_onednn = cpu_fusion_enabled(x, weight)
    elif use_onednn and not _can_run(x, weight):
        recording = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        raise ValueError(
            "use_onednn=True needs float32 CPU tensors, no autograd recording (torch.no_grad) and a torch "
            f"built with oneDNN; got x {x.dtype} on {x.device}, weight {weight.dtype}, autograd recording "
            f"{recording}, oneDNN linear {'available' if _HAS_ONEDNN_LINEAR else 'missing'}"
        )
    if not use_onednn:
        return fused_linear_reference(x, weight, bias, activation)
    attr, algorithm = ("gelu", "none") if activation == "gelu" else ("none", "")
    bias = None if bias is None else bias.contiguous()
    out = torch.ops.mkldnn._linear_pointwise(
        x.reshape(-1, x.shape[-1]), weight.contiguous(), bias, attr, [], algorithm
    )
    return out.view(*x.shape[:-1], weight.shape[0])


def is_plain_linear(module: nn.Module) -> bool:
    """Whether ``module`` is exactly ``nn.Linear`` with no forward hooks (its own or global): then its
    weight and bias may be used directly (split into halves, fused with a GELU) without changing what the
    module computes. A subclass or a wrapper (a LoRA layer, a quantized linear) is not."""
    return (
        type(module) is nn.Linear
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and not _module_state._global_forward_hooks
        and not _module_state._global_forward_pre_hooks
    )


def apply_linear(fc: nn.Module, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
    """``activation(fc(x))``: through :func:`fused_linear` when ``fc`` :func:`is_plain_linear` (on the CPU
    without autograd recording, one oneDNN matmul with the bias and GELU in its epilogue), else by calling
    the module."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or 'gelu', got {activation!r}")
    if not is_plain_linear(fc):
        y = fc(x)
        return F.gelu(y) if activation == "gelu" else y
    return fused_linear(x, fc.weight, fc.bias, activation)
