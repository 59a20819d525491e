"""CPU fast path for the matrix products of a gMLP block: oneDNN matmuls, with the bias (and GELU) in the
epilogue where autograd does not need the pre-activation.

On the CPU, ``F.linear`` and ``torch.addmm`` run as BLAS calls; ``addmm`` first writes the broadcast bias
into its output, and a GELU after it is one more pass over the activation. oneDNN's matmul
(``torch.ops.mkldnn._linear_pointwise``, the op inductor's CPU backend uses for the same fusion) adds the
bias and applies the GELU while the output tile is still in registers, and on the 2-core AMD EPYC used
here it also runs these shapes faster than the BLAS call: the channel projections by 1.1-1.6x, the
token-mixing products (K = n = 196) by about 1.3x (`benchmarks/cpu_matmul.py`, benchmarks/RESULTS.md). On
the 2-core Intel Xeon of the twelfth session, where MKL's products are about twice as fast, the two are
level on most of these shapes (0.98-1.07x; the token mixing's forward 1.17x, its weight gradient 0.83x),
and whole blocks train at the same speed either way.

* Inference (autograd not recording): :func:`fused_linear` is one oneDNN call with bias and GELU fused.
* Training: :func:`fused_linear` is an autograd function whose forward is the oneDNN product with the bias
  in its epilogue (the GELU stays a separate op: its backward needs the pre-activation) and whose
  backward computes the input gradient with oneDNN and the weight gradient with BLAS (which is the faster
  of the two for that transposed product), in the orientation measured faster (:func:`_weight_grad`).
  :func:`token_mix` does the same for ``W @ Z + b``, except that its weight gradient ``G @ Z.T`` runs on
  oneDNN too: 1.10-1.70x BLAS's speed at 49 to 512 tokens, level (0.97-0.99x) at 196
  (`benchmarks/cpu_matmul.py --tokens N`, benchmarks/RESULTS.md, eighth session).
* A double backward (``create_graph=True``) takes differentiable plain ops in the backward, so it works
  as with ``F.linear``.
* Under CPU bf16 autocast, on a CPU where oneDNN has bf16 (AVX-512; AMX where present),
  :func:`fused_linear` casts its operands to bf16 as autocast would for ``F.linear`` and returns a bf16
  result, with the bias and GELU in the epilogue in inference. On the 2-core Intel Xeon (AMX) that made
  gMLP-S/16 bf16 inference 1.04-1.07x faster than autocast's own ops. :func:`token_mix` leaves the token
  mixing to autocast's ``addmm`` there (1.25-2x faster than oneDNN with the bias added after it).

The fast path is taken for float32 CPU tensors (float32 or bf16 ones under bf16 autocast) outside other
autocast dtypes, torch.compile / torch.export, ``torch.jit.trace``, torch.func transforms, forward-mode AD
and Python dispatch modes (``FlopCounterMode``, fake tensors), with oneDNN available and enabled and
``GMLP_DISABLE_CPU_FUSION`` not ``1``. On a CPU without AVX-512, where oneDNN's fp32 products are slower
than MKL's, only products into :data:`WIDE_OUTPUT_FEATURES` or more outputs (a vocabulary) take it by
default; ``GMLP_DISABLE_CPU_FUSION=0`` sends every product there. Everywhere else the functions run their
``*_reference``, the plain ops they are tested against.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_state
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = [
    "apply_linear",
    "cpu_fusion_enabled",
    "fused_linear",
    "fused_linear_reference",
    "hookless",
    "is_plain_linear",
    "token_mix",
    "token_mix_reference",
]

ACTIVATIONS = (None, "gelu")


def _onednn_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):  # a build without the op
        return False


_HAS_ONEDNN_LINEAR = _onednn_linear_available()


def _onednn_bf16_available() -> bool:
    try:
        return _HAS_ONEDNN_LINEAR and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


#: Whether oneDNN runs bf16 products on this CPU (AVX-512 or newer; AMX where the CPU has it).
_HAS_ONEDNN_BF16 = _onednn_bf16_available()


def _cpu_has_avx512() -> bool:
    try:
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    except (AttributeError, RuntimeError):
        return False


#: Whether the oneDNN path is on by default on this CPU for every product: where ATen's kernels use
#: AVX-512. On the three AVX-512 CPUs measured, gMLP-S/16 inference ran at 0.98-1.16x our plain ops with it;
#: on a 2-core AMD EPYC with AVX2 only (eighteenth session) at 0.71-0.76x, and training steps at 0.89-0.90x:
#: oneDNN's AVX2 fp32 products mostly lose to MKL's there (the token mixing's forward 0.60-0.80x, the
#: projections' 0.64-1.16x, 0.69x for ``fc1``'s half with the GELU fused), except for wide outputs
#: (:data:`WIDE_OUTPUT_FEATURES`).
_ONEDNN_BY_DEFAULT = _cpu_has_avx512()

#: On a CPU without AVX-512, products with at least this many output features still take the oneDNN path:
#: an MLM decoder or LM head over a vocabulary. On the AVX2 EPYC, 1,024 rows of 256 features into 30,522
#: ran 1.4-2.2x faster on oneDNN (1.17x into 16,384, level into 4,096 and 8,192), and the CPU suite's MLM
#: inferred 1.17-1.35x faster with the decoder alone on oneDNN than with plain ops (benchmarks/RESULTS.md).
WIDE_OUTPUT_FEATURES = 16384


def _prefers_onednn(out_features: int) -> bool:
    """Whether this CPU runs a product with ``out_features`` outputs faster on oneDNN (see
    :data:`_ONEDNN_BY_DEFAULT`), or ``GMLP_DISABLE_CPU_FUSION=0`` asks for oneDNN on any CPU."""
    return (
        _ONEDNN_BY_DEFAULT
        or out_features >= WIDE_OUTPUT_FEATURES
        or os.environ.get("GMLP_DISABLE_CPU_FUSION") == "0"
    )


#: The smallest product (FLOPs, ``2 * rows * in * out``) that takes the oneDNN path by default. A oneDNN
#: call through this module costs some 25 us more host time than a BLAS one; on the 2-core CPU, products
#: of 1.3e7 FLOPs ran level (0.89-1.04x) and of 5e7 or more faster on oneDNN (1.05-1.29x), smaller ones up to
#: 5x slower (`benchmarks/cpu_matmul.py --small`, benchmarks/RESULTS.md, eighth session). The gMLP-S/16 and
#: main-job products (1e8 FLOPs and up) are not affected. ``GMLP_ONEDNN_MIN_FLOPS`` overrides it at import
#: (the test suite sets 0 so that its tiny models run the fast path).
_DEFAULT_ONEDNN_MIN_FLOPS = 2.5e7


def _min_flops_from_env() -> float:
    value = os.environ.get("GMLP_ONEDNN_MIN_FLOPS", "")
    if not value:
        return _DEFAULT_ONEDNN_MIN_FLOPS
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"GMLP_ONEDNN_MIN_FLOPS must be a number of FLOPs, got {value!r}") from None


ONEDNN_MIN_FLOPS = _min_flops_from_env()


def _big_enough(flops: int) -> bool:
    """Whether a product of ``flops`` takes the oneDNN path (never asked under torch.compile, where shapes
    may be symbolic and the path is off anyway)."""
    return not torch.compiler.is_compiling() and flops >= ONEDNN_MIN_FLOPS


def _mm(
    a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, attr: str = "none"
) -> torch.Tensor:
    """``attr(a @ b.T + bias)`` as one oneDNN matmul (``attr``: "none" or "gelu")."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, attr, [], "none" if attr == "gelu" else "")


def _autocast_bf16() -> bool:
    """Whether CPU autocast is on with bfloat16: then the products of this module run in bf16, as
    autocast would run ``F.linear``."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") is torch.bfloat16


def _can_run(*tensors: torch.Tensor) -> bool:
    """The hard requirements of the oneDNN path: the op, non-empty float32 CPU tensors (under bf16 autocast
    float32 or bf16 ones, and oneDNN with bf16 on this CPU), no torch.func transform wrapping them."""
    if not _HAS_ONEDNN_LINEAR:
        return False
    bf16 = _autocast_bf16()
    if bf16 and not _HAS_ONEDNN_BF16:
        return False
    for t in tensors:  # a plain loop: this runs for every projection; host time counts on small models
        if not t.is_cpu or t.numel() == 0 or _is_functorch_wrapped(t):
            return False
        if t.dtype is not torch.float32 and not (bf16 and t.dtype is torch.bfloat16):
            return False
    return True


_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def forward_ad_active() -> bool:
    """Whether a ``torch.autograd.forward_ad.dual_level`` is open: dual tensors are neither functorch
    wrappers nor grad-requiring, so this is the only sign that forward-mode derivatives must flow."""
    return torch.autograd.forward_ad._current_level >= 0


def cpu_fusion_enabled(*tensors: torch.Tensor) -> bool:
    """Whether the functions of this module take the oneDNN path for ``tensors`` by default (see the
    module docstring for the conditions)."""
    return (
        not torch.compiler.is_compiling()  # first: inductor fuses for itself (and shapes may be symbolic)
        and tensors[0].is_cpu  # then the cheapest test, which ends it at once for CUDA tensors
        and not torch.jit.is_tracing()  # traced graphs (TorchScript ONNX export) keep portable ops
        and _get_current_dispatch_mode() is None  # FLOP counters, fake tensors: they see plain aten ops
        and not forward_ad_active()  # the oneDNN op has no forward derivative: a tangent would be lost
        and os.environ.get("GMLP_DISABLE_CPU_FUSION") != "1"
        and (not torch.is_autocast_enabled("cpu") or _autocast_bf16())
        and torch.backends.mkldnn.enabled
        and _can_run(*tensors)
    )


def _linear_shapes_fit(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the oneDNN product takes these shapes as ``F.linear`` would: ``x`` ``(..., in)``, ``weight``
    ``(out, in)``, ``bias`` None or ``(out,)``. Others (a 1-D weight, a broadcast bias, mismatched sizes)
    take the reference, which handles them or raises ``F.linear``'s own error (oneDNN's is a bare
    "could not create a primitive descriptor", or, for a 0-d bias, a wrong result)."""
    return (
        weight.dim() == 2
        and x.dim() >= 1
        and x.shape[-1] == weight.shape[1]
        and (bias is None or bias.shape == weight.shape[:1])
    )


def _recording(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _Linear(torch.autograd.Function):
    """``x @ weight.T + bias`` for 2-D ``x``: oneDNN forward (bias in the epilogue), oneDNN input gradient
    (aten's in bf16), aten weight gradient; plain differentiable ops in a double backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _mm(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: differentiable ops
            dx = grad @ weight if need_x else None
            dw = grad.t() @ x if need_w else None
        else:
            # bf16: aten's own oneDNN call for the input gradient ran 1.03-1.45x faster than this one
            # (`benchmarks/cpu_matmul.py --dtype bf16`, twelfth-session machine, thirteenth session)
            if need_x:
                dx = grad @ weight if grad.dtype is torch.bfloat16 else _mm(grad, weight.t())
            else:
                dx = None
            dw = _weight_grad(grad, x) if need_w else None
        db = grad.sum(0) if need_b and ctx.has_bias else None
        return dx, dw, db


def _intel_cpu() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return "GenuineIntel" in f.read(4096)
    except OSError:
        return False


#: Whether fp32 weight gradients put the shorter side of the weight as the product's rows (see
#: :func:`_weight_grad`): on Intel CPUs; the longer side elsewhere.
_FP32_WEIGHT_GRAD_SHORT_ROWS = _intel_cpu()
#: Weight gradients are only computed as a transposed product (:func:`_weight_grad`) for weights of at most
#: this many elements (the copy into the parameter's layout stays cheap) ...
_TRANSPOSED_WEIGHT_GRAD_MAX_ELEMENTS = 1 << 20
#: ... over at least this many rows: at ~0.7 ns per element for the copy and a 9% gain on a 350 GFLOP/s
#: product, the break-even is about 1,400 rows.
_TRANSPOSED_WEIGHT_GRAD_MIN_ROWS = 2048


def _weight_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad.T @ x`` with aten, in the orientation measured faster: computed as ``(x.T @ grad).T`` when
    that puts the preferred side of the weight as the product's rows. Interleaved timings of
    `benchmarks/cpu_matmul.py --weight-grad` (benchmarks/RESULTS.md) over 3,136 rows, gMLP-S/16's ``fc2``
    (256 x 768) and ``fc1`` halves (768 x 256):

    * fp32 on the 2-core AMD EPYC (tenth session): the longer side as rows, 1.03-1.07x faster for ``fc2``
      (and for 128 x 192 over 6,272 rows), 0.86-0.98x for the ``fc1`` halves.
    * fp32 on the 2-core Intel Xeon (thirteenth session): the shorter side as rows, 1.08-1.10x for both.
    * bf16 (aten's oneDNN call) on the Intel Xeon with AMX: the shorter side as rows, 1.5x for both.

    So the shorter side in bf16 and on Intel CPUs, the longer side otherwise. The transposed result is a
    view, which autograd's accumulation copies into the parameter's layout: 0.4-0.8 ns per element for
    weights up to 2.4M elements, and for the MLM's decoder (30,522 x 256, tied to the embedding, whose
    gradient it is added to) 44-50 ms per step, more than the product itself. So the product is only
    transposed for weights of at most :data:`_TRANSPOSED_WEIGHT_GRAD_MAX_ELEMENTS` over at least
    :data:`_TRANSPOSED_WEIGHT_GRAD_MIN_ROWS` rows, where a 9% faster product pays for the copy."""
    out_features, in_features = grad.shape[1], x.shape[1]
    if (
        out_features * in_features <= _TRANSPOSED_WEIGHT_GRAD_MAX_ELEMENTS
        and grad.shape[0] >= _TRANSPOSED_WEIGHT_GRAD_MIN_ROWS
        and (out_features < in_features) != (grad.dtype is torch.bfloat16 or _FP32_WEIGHT_GRAD_SHORT_ROWS)
    ):
        return torch.mm(x.t(), grad).t()
    return torch.mm(grad.t(), x)


class _TokenMix(torch.autograd.Function):
    """``w @ z + b[:, None]`` (``w`` (n, n), ``z`` (n, columns)): oneDNN forward and both gradients; plain
    differentiable ops in a double backward."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, z: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(w, z)
        return _mm(w, z.t()).add_(b.unsqueeze(1))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        w, z = ctx.saved_tensors
        grad = grad.contiguous()
        need_w, need_z, need_b = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: differentiable ops
            dw = grad @ z.t() if need_w else None
            dz = w.t() @ grad if need_z else None
        else:
            dw = _mm(grad, z) if need_w else None  # grad @ z.T
            dz = _mm(w.t().contiguous(), grad.t()) if need_z else None
        db = grad.sum(1) if need_b else None
        return dw, dz, db


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
        use_onednn: True takes the oneDNN path wherever it can run (non-empty float32 CPU tensors), whatever
            the switches of :func:`cpu_fusion_enabled`; False the reference; None (default) picks it by
            :func:`cpu_fusion_enabled`, for products of at least :data:`ONEDNN_MIN_FLOPS` (on a CPU
            without AVX-512 only into :data:`WIDE_OUTPUT_FEATURES` or more outputs).

    Raises:
        ValueError: ``activation`` is not one of None, ``"gelu"``, or ``use_onednn=True`` where the oneDNN
            path cannot run (or with shapes other than those above); ``weight`` is on the meta device and
            ``x`` is not (``F.linear`` would return uninitialised memory). Elsewhere, shapes that do not fit
            raise ``F.linear``'s error.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or 'gelu', got {activation!r}")
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if use_onednn is None:
        use_onednn = (
            _linear_shapes_fit(x, weight, bias)
            and _big_enough(2 * x.numel() * weight.shape[0])
            and cpu_fusion_enabled(*tensors)
            and _prefers_onednn(weight.shape[0])
        )
    elif use_onednn and not _linear_shapes_fit(x, weight, bias):
        raise ValueError(
            "use_onednn=True needs x (..., in_features), weight (out_features, in_features) and bias None or "
            f"(out_features,); got x {tuple(x.shape)}, weight {tuple(weight.shape)}, bias "
            f"{None if bias is None else tuple(bias.shape)}"
        )
    elif use_onednn and not _can_run(*tensors):
        raise ValueError(
            "use_onednn=True needs non-empty float32 CPU tensors (under bf16 autocast float32 or bf16 ones, "
            f"and oneDNN bf16 on this CPU) and a torch built with oneDNN; got x {tuple(x.shape)} {x.dtype} "
            f"on {x.device}, weight {weight.dtype}, oneDNN linear "
            f"{'available' if _HAS_ONEDNN_LINEAR else 'missing'}, bf16 autocast {_autocast_bf16()}, oneDNN "
            f"bf16 {'available' if _HAS_ONEDNN_BF16 else 'missing'}"
        )
    if not use_onednn:  # (the oneDNN path has taken CPU tensors only)
        if weight.is_meta and not x.is_meta:  # F.linear takes them and returns uninitialised memory
            raise ValueError(
                f"weight is on meta but x is on {x.device}: a parameter on meta holds no values (load or "
                f"initialise it, or run x on meta too for shapes only)"
            )
        return fused_linear_reference(x, weight, bias, activation)
    if _autocast_bf16():  # what autocast does for F.linear: every operand in bf16, a bf16 result
        x, weight = x.to(torch.bfloat16), weight.to(torch.bfloat16)
        bias = None if bias is None else bias.to(torch.bfloat16)
    x2 = x.reshape(-1, x.shape[-1])
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    if _recording(x, weight, bias):  # the GELU's backward needs the pre-activation: not fused
        y = _Linear.apply(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])
        return F.gelu(y) if activation == "gelu" else y
    return _mm(x2, weight, bias, activation or "none").view(*x.shape[:-1], weight.shape[0])


def token_mix_reference(w: torch.Tensor, z: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``w @ z + b[:, None]`` with ``torch.addmm``."""
    return torch.addmm(b.unsqueeze(1), w, z)


def token_mix(w: torch.Tensor, z: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The token mixing ``w @ z + b[:, None]`` of a dense ``(n, n)`` W over ``z`` ``(n, columns)`` (all
    tokens of a batch side by side): oneDNN products where :func:`cpu_fusion_enabled`, the product has at
    least :data:`ONEDNN_MIN_FLOPS`, CPU autocast is off and the CPU has AVX-512 (or n is at least
    :data:`WIDE_OUTPUT_FEATURES`, or ``GMLP_DISABLE_CPU_FUSION=0``), else :func:`token_mix_reference`
    (also for shapes other than ``w`` ``(m, n)``, ``z`` ``(n, columns)``, ``b`` ``(m,)``, which then raise
    ``torch.addmm``'s error rather than oneDNN's)."""
    if torch.is_autocast_enabled("cpu") or not (
        w.dim() == 2
        and z.dim() == 2
        and w.shape[1] == z.shape[0]
        and b.shape == w.shape[:1]
        and _big_enough(2 * w.shape[0] * z.numel())
        and cpu_fusion_enabled(w, z, b)
        and _prefers_onednn(w.shape[0])
    ):  # under bf16 autocast addmm stays (see the module docstring)
        return token_mix_reference(w, z, b)
    w, z = w.contiguous(), z.contiguous()
    if _recording(w, z, b):
        return _TokenMix.apply(w, z, b)
    return _mm(w, z.t()).add_(b.unsqueeze(1))


def hookless(*modules: nn.Module) -> bool:
    """Whether none of ``modules`` has a forward hook or pre-hook, and no global one is registered: then no
    hook can see or replace what they are given and return (nor keep a reference to it)."""
    if _module_state._global_forward_hooks or _module_state._global_forward_pre_hooks:
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def is_plain_linear(module: nn.Module) -> bool:
    """Whether ``module`` is exactly ``nn.Linear``, with no forward or backward hooks (its own or global)
    and no ``forward`` set on the instance: then its weight and bias may be used directly (split into
    halves, fused with a GELU) without changing what calling the module would do. A subclass, a wrapper (a
    LoRA layer, a quantized linear), a patched forward (accelerate's offloading hooks, say) or a module
    with a backward hook (which only runs when the module is called) is not."""
    return (
        type(module) is nn.Linear
        and hookless(module)
        and "forward" not in module.__dict__
        and not (module._backward_hooks or module._backward_pre_hooks)
        and not (_module_state._global_backward_hooks or _module_state._global_backward_pre_hooks)
    )


def apply_linear(fc: nn.Module, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
    """``activation(fc(x))``: through :func:`fused_linear` when ``fc`` :func:`is_plain_linear`, else by
    calling the module."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or 'gelu', got {activation!r}")
    if not is_plain_linear(fc):
        y = fc(x)
        return F.gelu(y) if activation == "gelu" else y
    return fused_linear(x, fc.weight, fc.bias, activation)
