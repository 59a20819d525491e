"""LayerNorm that writes its output in the compute dtype: one Triton kernel each way, for a block's pre-norm.

Under bf16 autocast, ``torch.nn.LayerNorm`` runs in float32 on the float32 residual stream and writes a
float32 output, which every consumer (``fc1``, the tiny attention) then casts to bf16; in backward the
bf16 gradients are cast back and the weight/bias gradients take a separate column-reduction kernel.
:func:`layer_norm` instead writes ``LayerNorm(x)`` straight in ``out_dtype`` (statistics in float32, the
same values the cast would give) and its backward produces ``dx`` in ``x``'s dtype together with
per-program partial sums of the weight and bias gradients, in one pass over ``x`` and ``dy``.

With ``return_residual=True`` it also hands back ``x`` itself for the block's residual sum
(``h, x = layer_norm(x, ...); out = x + branch(h)``): ``x`` then has one consumer, this function, and its
backward kernel adds the residual's gradient into ``dx`` as it writes it. Without it, autograd sums the
two gradients of ``x`` (the residual's and the LayerNorm's) in a separate kernel that reads two
activation-sized tensors and writes a third.

:func:`layer_norm_reference` is the plain path it is tested against (on CPU with ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .sgu_triton import _HAS_TRITON, _block_c, _bwd_split, _norm_affine, _on_device, _warps, launch_config

if _HAS_TRITON:
    from .sgu_triton import _ln_input_grad, _ln_rows

__all__ = ["layer_norm", "layer_norm_reference"]

if _HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _norm_fwd_kernel(X, Y, W, B, Mean, Rstd, R, D, eps, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_D)
        rvalid = rows < R
        valid = rvalid[:, None] & (cols < D)[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        x = tl.load(X + offs, mask=valid, other=0.0).to(tl.float32)
        mean, diff, rstd = _ln_rows(x, valid, D, eps)
        w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=cols < D, other=0.0).to(tl.float32)
        y = diff * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=valid)
        tl.store(Mean + rows, mean, mask=rvalid)
        tl.store(Rstd + rows, rstd, mask=rvalid)

    @triton.jit
    def _norm_bwd_kernel(X, DY, DRES, W, Mean, Rstd, DX, DW, DB, R, D, ROWS_PER_PROG, BLOCK_D: tl.constexpr,
                         HAS_RES: tl.constexpr):
        # a contiguous run of rows per program; weight/bias gradients leave as one partial sum per program;
        # HAS_RES: dx += DRES (the gradient of the residual x handed back by the forward)
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        cvalid = cols < D
        w = tl.load(W + cols, mask=cvalid, other=0.0).to(tl.float32)
        dw_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        db_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        start = pid * ROWS_PER_PROG
        for r in range(0, ROWS_PER_PROG):
            row = start + r
            rvalid = row < R
            valid = cvalid & rvalid
            offs = row.to(tl.int64) * D + cols
            x = tl.load(X + offs, mask=valid, other=0.0).to(tl.float32)
            dy = tl.load(DY + offs, mask=valid, other=0.0).to(tl.float32)
            mean = tl.load(Mean + row, mask=rvalid, other=0.0)
            rstd = tl.load(Rstd + row, mask=rvalid, other=0.0)
            xhat = tl.where(valid, (x - mean) * rstd, 0.0)
            dx = _ln_input_grad(dy * w, xhat, rstd, D)
            if HAS_RES:
                dx += tl.load(DRES + offs, mask=valid, other=0.0).to(tl.float32)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=valid)
            dw_acc += dy * xhat
            db_acc += dy
        tl.store(DW + pid * D + cols, dw_acc, mask=cvalid)
        tl.store(DB + pid * D + cols, db_acc, mask=cvalid)


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype, return_residual):  # type: ignore[override]
        shape = x.shape
        x2d = x.reshape(-1, shape[-1]).contiguous()
        rows, d = x2d.shape
        y = torch.empty(rows, d, dtype=out_dtype, device=x.device)
        mean = torch.empty(rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        block_d = _block_c(d)
        per = launch_config.fwd_rows or 1
        _norm_fwd_kernel[(triton.cdiv(rows, per),)](
            x2d, y, weight, bias, mean, rstd, rows, d, eps, ROWS=per, BLOCK_D=block_d,
            num_warps=launch_config.fwd_warps or _warps(block_d * per),
        )  # fmt: skip
        ctx.save_for_backward(x2d, weight, mean, rstd)
        ctx.shape = shape
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not as zeros
        # x returned as it is: autograd hands it out as a view whose gradient comes to backward's dres
        return (y.view(shape), x) if return_residual else y.view(shape)

    @staticmethod
    @once_differentiable  # Triton kernels: a double backward (create_graph) raises, never silently wrong
    def backward(ctx, dy, dres=None):  # type: ignore[override]
        x2d, weight, mean, rstd = ctx.saved_tensors
        rows, d = x2d.shape
        if dy is None:  # only the residual was used
            return dres, None, None, None, None, None
        dy = dy.reshape(rows, d).contiguous()
        if dres is not None:
            dres = dres.reshape(rows, d).contiguous()
        dx = torch.empty_like(x2d)
        block_d = _block_c(d)
        rows_per_prog, progs = _bwd_split(rows, x2d.device)
        dw = torch.empty(progs, d, dtype=torch.float32, device=x2d.device)
        db = torch.empty_like(dw)
        _norm_bwd_kernel[(progs,)](
            x2d, dy, dy if dres is None else dres, weight, mean, rstd, dx, dw, db, rows, d, rows_per_prog,
            BLOCK_D=block_d, HAS_RES=dres is not None, num_warps=launch_config.bwd_warps or _warps(block_d),
        )  # fmt: skip
        dw, db = dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype)
        return dx.view(ctx.shape), dw, db, None, None, None


def layer_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The reference path: ``F.layer_norm`` in ``x``'s dtype, then cast to ``out_dtype``."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps).to(out_dtype)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype | None = None,
    use_triton: bool = True,
    return_residual: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last axis of ``x``, written in ``out_dtype`` (default: ``x``'s dtype).

    Args:
        x: input ``(..., D)``; statistics are computed in float32 whatever its dtype.
        weight, bias: affine parameters ``(D,)``, or None (as ``F.layer_norm``: an ``nn.LayerNorm`` without
            ``elementwise_affine`` or without a bias).
        eps: added to the variance.
        out_dtype: dtype of the output (e.g. the autocast dtype); the gradient w.r.t. ``x`` comes back in
            ``x``'s dtype.
        use_triton: the Triton kernels (True) or :func:`layer_norm_reference` (False).
        return_residual: return ``(LayerNorm(x), x)``, the second to be used in place of ``x`` for a
            residual sum: on the Triton path its gradient is added to ``dx`` inside the backward kernel
            (no separate add of the two gradients of ``x``). Values and gradients are those of using ``x``.

    Raises:
        ValueError: (Triton path) ``weight`` or ``bias`` is not ``(D,)``.
    """
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if not use_triton:
        y = layer_norm_reference(x, weight, bias, eps, out_dtype)
        return (y, x) if return_residual else y
    if not _HAS_TRITON:
        raise RuntimeError("use_triton=True but the triton package is not installed")
    weight, bias = _norm_affine(weight, bias, x.shape[-1], x, "layer_norm: x")
    with torch.autocast(x.device.type, enabled=False), _on_device(x):
        return _LayerNorm.apply(x, weight, bias, eps, out_dtype, return_residual)
