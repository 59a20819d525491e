"""Fused GELU + split + gate LayerNorm for the SGU, as Triton kernels with forward and backward.

In a gMLP block the channel projection's output ``u`` (rows = tokens x batch, ``2C`` channels) goes
through GELU, is split into the bypass ``z1 = a[:, :C]`` and the gate input ``a[:, C:]``, and the gate
input is LayerNorm-ed. Unfused that is three passes over memory plus a strided copy for the split; the
kernel reads ``u`` once and writes ``z1`` and the normalised gate ``z2n`` once (statistics in float32).
The backward kernel recomputes GELU from ``u`` (nothing but ``u`` and two floats per row are saved) and
produces ``du`` plus per-program partial sums for the LayerNorm weight and bias gradients.

:func:`gelu_split_layernorm_reference` is the plain PyTorch path it is tested against (on CPU with
``TRITON_INTERPRET=1``). :func:`gelu_split_layernorm` picks the kernel on CUDA when Triton is available.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "LaunchConfig",
    "gelu_split_layernorm",
    "gelu_split_layernorm_reference",
    "launch_config",
    "set_launch_config",
    "triton_available",
    "triton_enabled",
]

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    _HAS_TRITON = False


def triton_available() -> bool:
    """True if the Triton package imports (kernels then run on CUDA, or on CPU under TRITON_INTERPRET=1)."""
    return _HAS_TRITON


def gelu_split_layernorm_reference(
    u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference path: ``a = GELU(u)``; ``z1, z2 = a.chunk(2, -1)``; returns ``(z1, LayerNorm(z2))``."""
    z1, z2 = F.gelu(u).chunk(2, dim=-1)
    return z1, F.layer_norm(z2, (z2.shape[-1],), weight, bias, eps)


if _HAS_TRITON:

    @triton.jit
    def _gelu(x):
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))

    @triton.jit
    def _gelu_grad(x):
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
        return cdf + x * pdf

    @triton.jit
    def _fwd_kernel(U, Z1, Z2, W, B, Mean, Rstd, R, C, eps, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
        # ROWS rows per program, one row of 2C inputs per tile row; statistics in float32
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_C)
        rvalid = rows < R
        valid = rvalid[:, None] & (cols < C)[None, :]
        base = rows.to(tl.int64)[:, None] * 2 * C + cols[None, :]
        u1 = tl.load(U + base, mask=valid, other=0.0).to(tl.float32)
        u2 = tl.load(U + base + C, mask=valid, other=0.0).to(tl.float32)
        a2 = _gelu(u2)
        mean = tl.sum(a2, axis=1) / C
        diff = tl.where(valid, a2 - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / C + eps)
        w = tl.load(W + cols, mask=cols < C, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=cols < C, other=0.0).to(tl.float32)
        out = rows.to(tl.int64)[:, None] * C + cols[None, :]
        tl.store(Z1 + out, _gelu(u1).to(Z1.dtype.element_ty), mask=valid)
        z2 = diff * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(Z2 + out, z2.to(Z2.dtype.element_ty), mask=valid)
        tl.store(Mean + rows, mean, mask=rvalid)
        tl.store(Rstd + rows, rstd, mask=rvalid)

    @triton.jit
    def _bwd_kernel(U, DZ1, DZ2, W, Mean, Rstd, DU, DW, DB, R, C, ROWS_PER_PROG, BLOCK_C: tl.constexpr):
        # a contiguous run of ROWS_PER_PROG rows per program; the loop has no branch (rows past R are
        # masked), and the LayerNorm weight/bias gradients leave as one partial sum per program
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_C)
        cvalid = cols < C
        w = tl.load(W + cols, mask=cvalid, other=0.0).to(tl.float32)
        dw_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        db_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        start = pid * ROWS_PER_PROG
        for r in range(0, ROWS_PER_PROG):
            row = start + r
            rvalid = row < R
            valid = cvalid & rvalid
            base = row.to(tl.int64) * 2 * C
            out = row.to(tl.int64) * C
            u1 = tl.load(U + base + cols, mask=valid, other=0.0).to(tl.float32)
            u2 = tl.load(U + base + C + cols, mask=valid, other=0.0).to(tl.float32)
            dz1 = tl.load(DZ1 + out + cols, mask=valid, other=0.0).to(tl.float32)
            dz2 = tl.load(DZ2 + out + cols, mask=valid, other=0.0).to(tl.float32)
            mean = tl.load(Mean + row, mask=rvalid, other=0.0)
            rstd = tl.load(Rstd + row, mask=rvalid, other=0.0)
            xhat = tl.where(valid, (_gelu(u2) - mean) * rstd, 0.0)
            dy = dz2 * w
            c1 = tl.sum(dy * xhat, axis=0) / C
            c2 = tl.sum(dy, axis=0) / C
            da2 = (dy - xhat * c1 - c2) * rstd
            tl.store(DU + base + cols, (dz1 * _gelu_grad(u1)).to(DU.dtype.element_ty), mask=valid)
            tl.store(DU + base + C + cols, (da2 * _gelu_grad(u2)).to(DU.dtype.element_ty), mask=valid)
            dw_acc += dz2 * xhat
            db_acc += dz2
        tl.store(DW + pid * C + cols, dw_acc, mask=cvalid)
        tl.store(DB + pid * C + cols, db_acc, mask=cvalid)


def _block_c(c: int) -> int:
    return max(16, 1 << (c - 1).bit_length())


@dataclass
class LaunchConfig:
    """Launch parameters of the fused kernels (``None`` = the built-in choice for the row width).

    The built-in choice (one row per forward program, 4 warps for rows up to 2048 columns, 32 backward
    programs per multiprocessor) is the fastest total of ``benchmarks/kernel_sweep.py`` on an H200 at the
    gMLP-B/16 and gMLP-base MLM shapes; other cards or widths may prefer others.

    Attributes:
        fwd_rows: rows per forward program (a power of two).
        fwd_warps: warps per forward program.
        bwd_warps: warps per backward program.
        bwd_programs_per_sm: backward programs per multiprocessor; each program takes a contiguous run of
            rows and leaves one partial sum of the LayerNorm weight/bias gradients.
    """

    fwd_rows: int | None = None
    fwd_warps: int | None = None
    bwd_warps: int | None = None
    bwd_programs_per_sm: int | None = None


launch_config = LaunchConfig()


def set_launch_config(**kwargs: int | None) -> LaunchConfig:
    """Override launch parameters of the fused kernels (for tuning, e.g. ``benchmarks/kernel_sweep.py``).

    Unknown names raise ``TypeError``; values must be positive ints (``fwd_rows`` a power of two) or None.
    Returns the configuration now in force.
    """
    for name, value in kwargs.items():
        if name not in LaunchConfig.__dataclass_fields__:
            known = ", ".join(LaunchConfig.__dataclass_fields__)
            raise TypeError(f"unknown launch parameter {name!r}; expected one of: {known}")
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"launch parameter {name} must be a positive int or None, got {value!r}")
        if name == "fwd_rows" and value is not None and value & (value - 1):
            raise ValueError(f"launch parameter fwd_rows must be a power of two, got {value}")
        setattr(launch_config, name, value)
    return launch_config


def _warps(block_c: int) -> int:
    """Default warps for a row of ``block_c`` columns: 4 up to 2048 columns (best of the sweep on an H200
    at C = 1536, see benchmarks/RESULTS.md), then 4 more per 2048 columns, at most 16."""
    return min(16, max(4, block_c // 512))


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter on CPU: any small number


class _GeluSplitLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):  # type: ignore[override]
        shape = u.shape
        u2d = u.reshape(-1, shape[-1]).contiguous()
        rows, width = u2d.shape
        c = width // 2
        z1 = torch.empty(rows, c, dtype=u.dtype, device=u.device)
        z2 = torch.empty_like(z1)
        mean = torch.empty(rows, dtype=torch.float32, device=u.device)
        rstd = torch.empty_like(mean)
        block_c = _block_c(c)
        per = launch_config.fwd_rows or 1
        _fwd_kernel[(triton.cdiv(rows, per),)](
            u2d, z1, z2, weight, bias, mean, rstd, rows, c, eps, ROWS=per, BLOCK_C=block_c,
            num_warps=launch_config.fwd_warps or _warps(block_c * per),
        )  # fmt: skip
        ctx.save_for_backward(u2d, weight, mean, rstd)
        ctx.shape = shape
        return z1.view(*shape[:-1], c), z2.view(*shape[:-1], c)

    @staticmethod
    def backward(ctx, dz1: torch.Tensor, dz2: torch.Tensor):  # type: ignore[override]
        u2d, weight, mean, rstd = ctx.saved_tensors
        rows, width = u2d.shape
        c = width // 2
        dz1 = dz1.reshape(rows, c).contiguous()
        dz2 = dz2.reshape(rows, c).contiguous()
        du = torch.empty_like(u2d)
        block_c = _block_c(c)
        target = _sm_count(u2d.device) * (launch_config.bwd_programs_per_sm or 32)
        rows_per_prog = max(1, math.ceil(rows / target))
        progs = math.ceil(rows / rows_per_prog)
        dw = torch.empty(progs, c, dtype=torch.float32, device=u2d.device)
        db = torch.empty_like(dw)
        _bwd_kernel[(progs,)](
            u2d, dz1, dz2, weight, mean, rstd, du, dw, db, rows, c, rows_per_prog, BLOCK_C=block_c,
            num_warps=launch_config.bwd_warps or _warps(block_c),
        )  # fmt: skip
        return du.view(ctx.shape), dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype), None


def triton_enabled(x: torch.Tensor) -> bool:
    """Whether :func:`gelu_split_layernorm` takes the Triton kernel for ``x`` by default: on CUDA, with
    Triton installed, ``GMLP_DISABLE_TRITON`` not ``1`` and no torch.compile tracing (inductor then fuses
    the reference ops itself)."""
    return (
        _HAS_TRITON
        and x.is_cuda
        and os.environ.get("GMLP_DISABLE_TRITON") != "1"
        and not torch.compiler.is_compiling()
    )


def gelu_split_layernorm(
    u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, use_triton: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z1, LayerNorm(z2))`` with ``z1, z2 = GELU(u).chunk(2, -1)``: fused Triton kernel or reference.

    Args:
        u: pre-activation of the channel projection, ``(..., 2C)``.
        weight, bias: the gate LayerNorm's affine parameters ``(C,)``.
        eps: the gate LayerNorm's epsilon.
        use_triton: force the kernel (True) or the reference (False); None = the kernel on CUDA when
            Triton is available, ``GMLP_DISABLE_TRITON`` is not ``1`` and no torch.compile is tracing.
    """
    if use_triton is None:
        use_triton = triton_enabled(u)
    if use_triton:
        if not _HAS_TRITON:
            raise RuntimeError("use_triton=True but the triton package is not installed")
        return _GeluSplitLayerNorm.apply(u, weight, bias, eps)
    return gelu_split_layernorm_reference(u, weight, bias, eps)
