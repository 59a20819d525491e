"""Fused Triton kernels for the SGU: GELU + split + gate LayerNorm, and the whole gating around the GEMM.

In a gMLP block the channel projection's output ``u`` (rows = tokens x batch, ``2C`` channels) goes
through GELU, is split into the bypass ``z1 = a[:, :C]`` and the gate input ``a[:, C:]``, the gate input
is LayerNorm-ed, mixed along tokens (``W z2n + b``) and multiplied into the bypass.

- :func:`gelu_split_layernorm`: reads ``u`` once and writes ``z1`` and the normalised gate ``z2n`` once
  (statistics in float32). Its backward recomputes GELU from ``u`` (nothing but ``u`` and two floats per
  row are saved) and produces ``du`` plus per-program partial sums for the LayerNorm weight and bias.
- :func:`spatial_gating`: the whole unit after ``fc1``. ``z1`` is never written (the gating kernel
  recomputes GELU(u1)), the token-mixing GEMM runs on zero-padded, 16-byte aligned sizes, and the
  backward gating kernel writes the bypass half of ``du`` and the gate gradient in one pass.

Each has a plain PyTorch reference (``*_reference``) it is tested against (on CPU with
``TRITON_INTERPRET=1``); the kernels are picked on CUDA when Triton is available (:func:`triton_enabled`).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    "LaunchConfig",
    "compiled_kernels_enabled",
    "fold_fc1_bias_enabled",
    "gelu_split_layernorm",
    "gelu_split_layernorm_reference",
    "FUSED_GATING_MIN_ELEMENTS",
    "GATE_COLS",
    "fused_gating_enabled",
    "fused_gating_min_elements",
    "launch_config",
    "prefer_fused_gating",
    "set_launch_config",
    "spatial_gating",
    "spatial_gating_reference",
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
    u: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
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
    def _ln_rows(x, valid, n, eps):
        # LayerNorm statistics of each row of a (rows, block) tile: mean, centred values (0 off mask), rstd
        mean = tl.sum(x, axis=1) / n
        diff = tl.where(valid, x - mean[:, None], 0.0)
        return mean, diff, 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / n + eps)

    @triton.jit
    def _ln_input_grad(dyw, xhat, rstd, n):
        # gradient w.r.t. one row's LayerNorm input from dyw = dy * weight and xhat = (x - mean) * rstd
        c1 = tl.sum(dyw * xhat, axis=0) / n
        c2 = tl.sum(dyw, axis=0) / n
        return (dyw - xhat * c1 - c2) * rstd

    @triton.jit
    def _vec(P, cols, C):
        # a float32 row vector of length C at ``cols`` (0 past C)
        return tl.load(P + cols, mask=cols < C, other=0.0).to(tl.float32)

    @triton.jit
    def _bias_halves(UB, cols, C, HAS_UB: tl.constexpr):
        # the channel projection's bias (2C) at ``cols`` of its bypass and gate halves; zeros without UB
        ub1 = tl.zeros_like(cols).to(tl.float32)
        ub2 = ub1
        if HAS_UB:
            ub1 = _vec(UB, cols, C)
            ub2 = _vec(UB + C, cols, C)
        return ub1, ub2

    @triton.jit
    def _fwd_loads(U, rows, R, C, cols, WITH_Z1: tl.constexpr):
        # the raw loads of one forward tile's columns ``cols`` (rows past R masked off): the gate half u2,
        # and the bypass half u1 with Z1 (else u2 again)
        valid = (rows < R)[:, None] & (cols < C)[None, :]
        base = rows.to(tl.int64)[:, None] * 2 * C + cols[None, :]
        u2 = tl.load(U + base + C, mask=valid, other=0.0)
        u1 = u2
        if WITH_Z1:
            u1 = tl.load(U + base, mask=valid, other=0.0)
        return u2, u1

    @triton.jit
    def _biased(u, ub, HAS_UB: tl.constexpr):
        # a raw tile in float32, plus the channel projection's bias (a row of the tile's columns) with UB
        x = u.to(tl.float32)
        if HAS_UB:
            x += ub[None, :]
        return x

    @triton.jit
    def _fwd_stores(Z1, Z2, rows, R, C, cols, diff, rstd, w, b, kept, u1, ub1,
                    WITH_Z1: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_UB: tl.constexpr):  # fmt: skip
        # one piece of a forward tile's outputs: the normalised gate (0 on rows not kept) and GELU(u1)
        valid = (rows < R)[:, None] & (cols < C)[None, :]
        out = rows.to(tl.int64)[:, None] * C + cols[None, :]
        if WITH_Z1:
            tl.store(Z1 + out, _gelu(_biased(u1, ub1, HAS_UB)).to(Z1.dtype.element_ty), mask=valid)
        z2 = diff * rstd[:, None] * w[None, :] + b[None, :]
        if HAS_KEEP:
            z2 = tl.where(kept[:, None], z2, 0.0)
        tl.store(Z2 + out, z2.to(Z2.dtype.element_ty), mask=valid)

    @triton.jit
    def _fwd_kernel(
        U, UB, Z1, Z2, W, B, Keep, Mean, Rstd, R, C, eps, TILES_PER_PROG,
        ROWS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, WITH_Z1: tl.constexpr,
        HAS_KEEP: tl.constexpr, HAS_UB: tl.constexpr, PREFETCH: tl.constexpr,
    ):  # fmt: skip
        # TILES_PER_PROG consecutive tiles of ROWS rows per program (the LayerNorm weight and bias loaded
        # once), one row of 2C inputs per tile row; statistics in float32. Without Z1 only the gate half is
        # read; with Keep, rows whose keep is 0 (padding) get a normalised gate of 0. With UB (the channel
        # projection's bias, 2C), u is read without its bias and the bias is added on load. PREFETCH: the
        # next tile's loads are issued before this tile's GELU, statistics and stores, so that a program
        # keeps a tile of loads in flight while it computes (as the backward's PREFETCH). BLOCK_B > 0: a
        # row is held as two pieces, columns [0, BLOCK_C) and [BLOCK_C, BLOCK_C + BLOCK_B) (1024 + 512
        # for C = 1536), so that no lanes compute GELU on the padding of one power-of-two block (2048).
        cols = tl.arange(0, BLOCK_C)
        w, b = _vec(W, cols, C), _vec(B, cols, C)
        ub1, ub2 = _bias_halves(UB, cols, C, HAS_UB)
        if BLOCK_B > 0:
            cols_b = BLOCK_C + tl.arange(0, BLOCK_B)
            w_b, b_b = _vec(W, cols_b, C), _vec(B, cols_b, C)
            ub1_b, ub2_b = _bias_halves(UB, cols_b, C, HAS_UB)
        first = tl.program_id(0) * TILES_PER_PROG
        if PREFETCH:
            n_u2, n_u1 = _fwd_loads(U, first * ROWS + tl.arange(0, ROWS), R, C, cols, WITH_Z1)
            if BLOCK_B > 0:
                n_u2_b, n_u1_b = _fwd_loads(U, first * ROWS + tl.arange(0, ROWS), R, C, cols_b, WITH_Z1)
        for t in range(0, TILES_PER_PROG):
            rows = (first + t) * ROWS + tl.arange(0, ROWS)
            if PREFETCH:
                u2, u1 = n_u2, n_u1
                # the next tile of this program; past its last tile every row is masked off (row R)
                later = tl.where(t + 1 < TILES_PER_PROG, rows + ROWS, R)
                n_u2, n_u1 = _fwd_loads(U, later, R, C, cols, WITH_Z1)
                if BLOCK_B > 0:
                    u2_b, u1_b = n_u2_b, n_u1_b
                    n_u2_b, n_u1_b = _fwd_loads(U, later, R, C, cols_b, WITH_Z1)
            else:
                u2, u1 = _fwd_loads(U, rows, R, C, cols, WITH_Z1)
                if BLOCK_B > 0:
                    u2_b, u1_b = _fwd_loads(U, rows, R, C, cols_b, WITH_Z1)
            rvalid = rows < R
            # the LayerNorm statistics of GELU(u2) over the row's pieces (masked lanes hold GELU(0) = 0)
            g = _gelu(_biased(u2, ub2, HAS_UB))
            total = tl.sum(g, axis=1)
            if BLOCK_B > 0:
                g_b = _gelu(_biased(u2_b, ub2_b, HAS_UB))
                total += tl.sum(g_b, axis=1)
            mean = total / C
            diff = tl.where(rvalid[:, None] & (cols < C)[None, :], g - mean[:, None], 0.0)
            squares = tl.sum(diff * diff, axis=1)
            if BLOCK_B > 0:
                diff_b = tl.where(rvalid[:, None] & (cols_b < C)[None, :], g_b - mean[:, None], 0.0)
                squares += tl.sum(diff_b * diff_b, axis=1)
            rstd = 1.0 / tl.sqrt(squares / C + eps)
            kept = rvalid
            if HAS_KEEP:
                kept = tl.load(Keep + rows, mask=rvalid, other=0.0) != 0
            _fwd_stores(Z1, Z2, rows, R, C, cols, diff, rstd, w, b, kept, u1, ub1, WITH_Z1, HAS_KEEP, HAS_UB)
            if BLOCK_B > 0:
                _fwd_stores(Z1, Z2, rows, R, C, cols_b, diff_b, rstd, w_b, b_b, kept, u1_b, ub1_b,
                            WITH_Z1, HAS_KEEP, HAS_UB)  # fmt: skip
            tl.store(Mean + rows, mean, mask=rvalid)
            tl.store(Rstd + rows, rstd, mask=rvalid)

    @triton.jit
    def _bwd_row(Keep, Mean, Rstd, row, end, HAS_KEEP: tl.constexpr):
        # one backward row's statistics (masked off when row >= end) and whether the row is real (rvalid)
        # and kept (rkeep; padding rows are not)
        rvalid = row < end
        rkeep = rvalid
        if HAS_KEEP:
            rkeep = rvalid & (tl.load(Keep + row, mask=rvalid, other=0.0) != 0)
        mean = tl.load(Mean + row, mask=rkeep, other=0.0)
        rstd = tl.load(Rstd + row, mask=rkeep, other=0.0)
        return mean, rstd, rvalid, rkeep

    @triton.jit
    def _bwd_loads(U, DZ1, DZ2, row, C, cols, rvalid, rkeep, ub1, ub2,
                   WITH_Z1: tl.constexpr, HAS_UB: tl.constexpr):  # fmt: skip
        # the loads of one backward row's columns ``cols`` in float32: u2 and dz2 (0 on rows not kept),
        # u1 and dz1 with Z1 (else u2 and dz2 again); with UB the bias is added to u on load
        cvalid = cols < C
        kvalid = cvalid & rkeep
        base = row.to(tl.int64) * 2 * C
        out = row.to(tl.int64) * C
        u2 = tl.load(U + base + C + cols, mask=kvalid, other=0.0).to(tl.float32)
        if HAS_UB:
            u2 += ub2
        dz2 = tl.load(DZ2 + out + cols, mask=kvalid, other=0.0).to(tl.float32)
        u1 = u2
        dz1 = dz2
        if WITH_Z1:
            valid = cvalid & rvalid
            u1 = tl.load(U + base + cols, mask=valid, other=0.0).to(tl.float32)
            if HAS_UB:
                u1 += ub1
            dz1 = tl.load(DZ1 + out + cols, mask=valid, other=0.0).to(tl.float32)
        return u2, dz2, u1, dz1

    @triton.jit
    def _bwd_sums(u2, dz2, w, mean, rstd, kvalid):
        # one piece of a row: xhat, dz2 * w, and its shares of the LayerNorm input gradient's two sums
        xhat = tl.where(kvalid, (_gelu(u2) - mean) * rstd, 0.0)
        dyw = dz2 * w
        return xhat, dyw, tl.sum(dyw * xhat, axis=0), tl.sum(dyw, axis=0)

    @triton.jit
    def _bwd_stores(DU, row, C, cols, rvalid, kvalid, u2, u1, dz1, xhat, dyw, c1, c2, rstd,
                    WITH_Z1: tl.constexpr):  # fmt: skip
        # one piece of a row's du (the gate half; the bypass half with Z1), returned as stored, in float32
        valid = (cols < C) & rvalid
        base = row.to(tl.int64) * 2 * C
        du2 = tl.where(kvalid, (dyw - xhat * c1 - c2) * rstd * _gelu_grad(u2), 0.0)
        du2 = du2.to(DU.dtype.element_ty)
        tl.store(DU + base + C + cols, du2, mask=valid)
        du1 = du2
        if WITH_Z1:
            du1 = tl.where(valid, dz1 * _gelu_grad(u1), 0.0).to(DU.dtype.element_ty)
            tl.store(DU + base + cols, du1, mask=valid)
        return du2.to(tl.float32), du1.to(tl.float32)

    @triton.jit
    def _bwd_kernel(
        U, UB, DZ1, DZ2, W, Keep, Mean, Rstd, DU, DW, DB, DUB, R, C, ROWS_PER_PROG,
        BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, WITH_Z1: tl.constexpr, HAS_KEEP: tl.constexpr,
        PREFETCH: tl.constexpr, HAS_UB: tl.constexpr,
    ):  # fmt: skip
        # a contiguous run of ROWS_PER_PROG rows per program; the loop has no branch (rows past R are
        # masked), and the LayerNorm weight/bias gradients leave as one partial sum per program. Rows whose
        # keep is 0 (padding) get a zero gate-half gradient and add nothing to the weight/bias gradients.
        # PREFETCH: the next row's loads are issued before this row's reductions and stores, so that each
        # program keeps a row of loads in flight (more memory parallelism, twice the load registers).
        # HAS_UB: u is read without the channel projection's bias UB (2C), added on load, and the program's
        # partial sums of du (the bias gradient: the gate half, and the bypass half with Z1) go to DUB.
        # BLOCK_B > 0: a row in two pieces, as in the forward kernel.
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_C)
        w = _vec(W, cols, C)
        dw_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        db_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        dub1_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        dub2_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        ub1, ub2 = _bias_halves(UB, cols, C, HAS_UB)
        if BLOCK_B > 0:
            cols_b = BLOCK_C + tl.arange(0, BLOCK_B)
            w_b = _vec(W, cols_b, C)
            dw_acc_b = tl.zeros((BLOCK_B,), dtype=tl.float32)
            db_acc_b = tl.zeros((BLOCK_B,), dtype=tl.float32)
            dub1_acc_b = tl.zeros((BLOCK_B,), dtype=tl.float32)
            dub2_acc_b = tl.zeros((BLOCK_B,), dtype=tl.float32)
            ub1_b, ub2_b = _bias_halves(UB, cols_b, C, HAS_UB)
        start = pid * ROWS_PER_PROG
        end = tl.minimum(start + ROWS_PER_PROG, R)
        if PREFETCH:
            n_mean, n_rstd, n_rvalid, n_rkeep = _bwd_row(Keep, Mean, Rstd, start, end, HAS_KEEP)
            n_u2, n_dz2, n_u1, n_dz1 = _bwd_loads(
                U, DZ1, DZ2, start, C, cols, n_rvalid, n_rkeep, ub1, ub2, WITH_Z1, HAS_UB
            )
            if BLOCK_B > 0:
                n_u2_b, n_dz2_b, n_u1_b, n_dz1_b = _bwd_loads(
                    U, DZ1, DZ2, start, C, cols_b, n_rvalid, n_rkeep, ub1_b, ub2_b, WITH_Z1, HAS_UB
                )
        for r in range(0, ROWS_PER_PROG):
            row = start + r
            if PREFETCH:
                mean, rstd, rvalid, rkeep = n_mean, n_rstd, n_rvalid, n_rkeep
                u2, dz2, u1, dz1 = n_u2, n_dz2, n_u1, n_dz1
                n_mean, n_rstd, n_rvalid, n_rkeep = _bwd_row(Keep, Mean, Rstd, row + 1, end, HAS_KEEP)
                n_u2, n_dz2, n_u1, n_dz1 = _bwd_loads(
                    U, DZ1, DZ2, row + 1, C, cols, n_rvalid, n_rkeep, ub1, ub2, WITH_Z1, HAS_UB
                )
                if BLOCK_B > 0:
                    u2_b, dz2_b, u1_b, dz1_b = n_u2_b, n_dz2_b, n_u1_b, n_dz1_b
                    n_u2_b, n_dz2_b, n_u1_b, n_dz1_b = _bwd_loads(
                        U, DZ1, DZ2, row + 1, C, cols_b, n_rvalid, n_rkeep, ub1_b, ub2_b, WITH_Z1, HAS_UB
                    )
            else:
                mean, rstd, rvalid, rkeep = _bwd_row(Keep, Mean, Rstd, row, end, HAS_KEEP)
                u2, dz2, u1, dz1 = _bwd_loads(
                    U, DZ1, DZ2, row, C, cols, rvalid, rkeep, ub1, ub2, WITH_Z1, HAS_UB
                )
                if BLOCK_B > 0:
                    u2_b, dz2_b, u1_b, dz1_b = _bwd_loads(
                        U, DZ1, DZ2, row, C, cols_b, rvalid, rkeep, ub1_b, ub2_b, WITH_Z1, HAS_UB
                    )
            kvalid = (cols < C) & rkeep
            xhat, dyw, c1, c2 = _bwd_sums(u2, dz2, w, mean, rstd, kvalid)
            if BLOCK_B > 0:
                kvalid_b = (cols_b < C) & rkeep
                xhat_b, dyw_b, c1_b, c2_b = _bwd_sums(u2_b, dz2_b, w_b, mean, rstd, kvalid_b)
                c1 += c1_b
                c2 += c2_b
            c1 = c1 / C
            c2 = c2 / C
            du2, du1 = _bwd_stores(DU, row, C, cols, rvalid, kvalid, u2, u1, dz1, xhat, dyw, c1, c2, rstd,
                                   WITH_Z1)  # fmt: skip
            dub2_acc += du2
            if WITH_Z1:
                dub1_acc += du1
            dw_acc += dz2 * xhat
            db_acc += dz2
            if BLOCK_B > 0:
                du2_b, du1_b = _bwd_stores(DU, row, C, cols_b, rvalid, kvalid_b, u2_b, u1_b, dz1_b, xhat_b,
                                           dyw_b, c1, c2, rstd, WITH_Z1)  # fmt: skip
                dub2_acc_b += du2_b
                if WITH_Z1:
                    dub1_acc_b += du1_b
                dw_acc_b += dz2_b * xhat_b
                db_acc_b += dz2_b
        tl.store(DW + pid * C + cols, dw_acc, mask=cols < C)
        tl.store(DB + pid * C + cols, db_acc, mask=cols < C)
        if HAS_UB:  # the bias gradient sums the gradient as stored (rounded to du's dtype), as autograd does
            tl.store(DUB + pid * 2 * C + cols, dub1_acc, mask=cols < C)
            tl.store(DUB + pid * 2 * C + C + cols, dub2_acc, mask=cols < C)
        if BLOCK_B > 0:
            tl.store(DW + pid * C + cols_b, dw_acc_b, mask=cols_b < C)
            tl.store(DB + pid * C + cols_b, db_acc_b, mask=cols_b < C)
            if HAS_UB:
                tl.store(DUB + pid * 2 * C + cols_b, dub1_acc_b, mask=cols_b < C)
                tl.store(DUB + pid * 2 * C + C + cols_b, dub2_acc_b, mask=cols_b < C)

    @triton.jit
    def _token_biased(G, TB, rows, R, out, valid, BATCH, HAS_TB: tl.constexpr):
        # a gate tile in float32, plus (HAS_TB) the token bias of each row's token (row // BATCH): the
        # token-mixing GEMM then runs without a bias, so no broadcast copy of it is written for the GEMM
        g = tl.load(G + out, mask=valid, other=0.0).to(tl.float32)
        if HAS_TB:
            g += tl.load(TB + rows // BATCH, mask=rows < R, other=0.0).to(tl.float32)[:, None]
        return g

    @triton.jit
    def _gate_fwd_kernel(
        U, UB, G, TB, S, R, C, BATCH,
        ROWS: tl.constexpr, BLOCK_C: tl.constexpr, HAS_UB: tl.constexpr, HAS_TB: tl.constexpr,
    ):  # fmt: skip
        # s = GELU(u1) * gate on a ROWS x BLOCK_C tile: the bypass half z1 = GELU(u1) is never stored
        # (HAS_UB: u1 is read without the channel projection's bias, added on load; HAS_TB: the gate
        # without the token bias, likewise)
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        valid = (rows < R)[:, None] & (cols < C)[None, :]
        out = rows.to(tl.int64)[:, None] * C + cols[None, :]
        u1 = tl.load(U + rows.to(tl.int64)[:, None] * 2 * C + cols[None, :], mask=valid, other=0.0)
        u1 = u1.to(tl.float32)
        if HAS_UB:
            u1 += tl.load(UB + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
        g = _token_biased(G, TB, rows, R, out, valid, BATCH, HAS_TB)
        tl.store(S + out, (_gelu(u1) * g).to(S.dtype.element_ty), mask=valid)

    @triton.jit
    def _gate_bwd_kernel(
        U, UB, G, TB, DS, DU, DG, DGSUM, DUB, R, C, BATCH,
        ROWS: tl.constexpr, BLOCK_C: tl.constexpr, HAS_UB: tl.constexpr, HAS_TB: tl.constexpr,
    ):  # fmt: skip
        # du1 = ds * gate * GELU'(u1) into the bypass half of du; dgate = ds * GELU(u1), and the tile's row
        # sums of it in float32, one per (row, column tile) (the token bias gradient sums these over the
        # batch: no second pass over dgate). HAS_UB: u1 is read without the channel projection's bias
        # (added on load), and the tile's column sums of du1 (its bias gradient) go to DUB, one per row tile.
        # HAS_TB: the gate is read without the token bias (added on load, as in the forward).
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        valid = (rows < R)[:, None] & (cols < C)[None, :]
        out = rows.to(tl.int64)[:, None] * C + cols[None, :]
        wide = rows.to(tl.int64)[:, None] * 2 * C + cols[None, :]
        u1 = tl.load(U + wide, mask=valid, other=0.0).to(tl.float32)
        if HAS_UB:
            u1 += tl.load(UB + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
        g = _token_biased(G, TB, rows, R, out, valid, BATCH, HAS_TB)
        ds = tl.load(DS + out, mask=valid, other=0.0).to(tl.float32)
        du1 = (ds * g * _gelu_grad(u1)).to(DU.dtype.element_ty)
        tl.store(DU + wide, du1, mask=valid)
        if HAS_UB:
            tl.store(DUB + tl.program_id(0) * C + cols, tl.sum(du1.to(tl.float32), axis=0), mask=cols < C)
        dg = ds * _gelu(u1)
        tl.store(DG + out, dg.to(DG.dtype.element_ty), mask=valid)
        tl.store(DGSUM + rows * tl.num_programs(1) + tl.program_id(1), tl.sum(dg, axis=1), mask=rows < R)


def _block_c(c: int) -> int:
    return max(16, 1 << (c - 1).bit_length())


def _row_pieces(c: int) -> tuple[int, int]:
    """The LayerNorm kernels' row blocks for a row of ``c`` columns: ``(BLOCK_C, BLOCK_B)``. One power-of-two
    block and no second piece by default; with ``launch_config.ln_split`` and a ``c`` that is not a power of
    two, the largest power of two below ``c`` and the rest rounded up to one (1536 -> 1024 + 512: no lanes
    on padding, where one block would be 2048 wide)."""
    whole = _block_c(c)
    if not launch_config.ln_split or whole == c:
        return whole, 0
    first = whole // 2
    return first, _block_c(c - first)


#: Columns per program of the gating kernels by default (``LaunchConfig.gate_cols``): the best tile of the
#: sixth session's H200 sweep (``benchmarks/results/gpu-h200-kernel-sweep-2026-11-27c.txt``).
GATE_COLS = 512


@dataclass
class LaunchConfig:
    """Launch parameters of the fused kernels (``None`` = the built-in choice for the row width).

    The built-in choice (one row per forward program, 4 warps for rows up to 2048 columns, 32 backward
    programs per multiprocessor) is the fastest total of ``benchmarks/kernel_sweep.py`` on an H200 at the
    gMLP-B/16 and gMLP-base MLM shapes, and the gating tile (one row by 512 columns) that of a later sweep
    on the same card; other cards or widths may prefer others.

    Attributes:
        fwd_rows: rows per forward program (a power of two).
        fwd_warps: warps per forward program.
        bwd_warps: warps per backward program.
        bwd_programs_per_sm: backward programs per multiprocessor; each program takes a contiguous run of
            rows and leaves one partial sum of the LayerNorm weight/bias gradients.
        gate_rows: rows per program of the elementwise gating kernels of :func:`spatial_gating` (a power of
            two; None = ``fwd_rows``).
        gate_cols: columns per gating program (a power of two, at most the row's padded width; None =
            :data:`GATE_COLS`, 512). ``benchmarks/kernel_sweep.py`` times a grid of both. On an H200 (sixth
            session, benchmarks/RESULTS.md) 512 columns took 0.89x the time of the whole row in one
            program for the gating forward and backward at gMLP-B/16's 196 x 256 x 1536, and 0.99x at the
            MLM's 512 x 32 x 1536; at C = 1536 it also leaves no lanes on padding (2048).
        bwd_prefetch: 1 = the backward loop issues the next row's loads before it reduces and stores the
            current one (None or 0 = one row at a time, the timed default). Not yet timed on a GPU;
            ``kernel_sweep.py`` sweeps it.
        fwd_programs_per_sm: forward programs per multiprocessor, each looping over a run of row tiles
            with the LayerNorm weight and bias loaded once (None = one tile per program, the timed
            default). Not yet timed on a GPU; ``kernel_sweep.py`` sweeps it.
        fwd_prefetch: 1 = that loop issues the next tile's loads before it computes and stores the
            current one (None or 0 = one tile at a time). Only a program with more than one tile (set
            ``fwd_programs_per_sm``) has a next tile. Not yet timed on a GPU; ``kernel_sweep.py`` sweeps it.
        ln_split: 1 = the LayerNorm kernels (forward and backward) hold a row whose width is not a power of
            two as two power-of-two pieces (1024 + 512 for the 1536 of gMLP-B and the MLM, 512 + 256 for
            gMLP-S's 768) instead of one block padded to the next power of two, whose padding lanes
            compute GELU and the LayerNorm like the others (a quarter of the work at these widths). Not yet
            timed on a GPU; ``kernel_sweep.py`` sweeps it.
    """

    fwd_rows: int | None = None
    fwd_warps: int | None = None
    bwd_warps: int | None = None
    bwd_programs_per_sm: int | None = None
    gate_rows: int | None = None
    gate_cols: int | None = None
    bwd_prefetch: int | None = None
    fwd_programs_per_sm: int | None = None
    fwd_prefetch: int | None = None
    ln_split: int | None = None


launch_config = LaunchConfig()


def set_launch_config(**kwargs: int | None) -> LaunchConfig:
    """Override launch parameters of the fused kernels (for tuning, e.g. ``benchmarks/kernel_sweep.py``).

    Unknown names raise ``TypeError``; values must be positive ints (``fwd_rows``, ``gate_rows`` and
    ``gate_cols`` powers of two) or None.
    Returns the configuration now in force.
    """
    for name, value in kwargs.items():
        if name not in LaunchConfig.__dataclass_fields__:
            known = ", ".join(LaunchConfig.__dataclass_fields__)
            raise TypeError(f"unknown launch parameter {name!r}; expected one of: {known}")
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"launch parameter {name} must be a positive int or None, got {value!r}")
        if name in ("fwd_rows", "gate_rows", "gate_cols") and value is not None and value & (value - 1):
            raise ValueError(f"launch parameter {name} must be a power of two, got {value}")
        setattr(launch_config, name, value)
    return launch_config


def _warps(block_c: int) -> int:
    """Default warps for a row of ``block_c`` columns: 4 up to 2048 columns (best of the sweep on an H200
    at C = 1536, see benchmarks/RESULTS.md), then 4 more per 2048 columns, at most 16."""
    return min(16, max(4, block_c // 512))


def _on_device(t: torch.Tensor) -> contextlib.AbstractContextManager[object]:
    """``t``'s CUDA device made the current one while the kernels launch. Triton launches a kernel on the
    current device and its current stream, not on its arguments' device: for a model on another GPU than
    the current one (``.to("cuda:1")``, or the text models split over GPUs by ``device_map``) it would hand
    that GPU's pointers to a kernel on the current one ("cannot be accessed from Triton"). The backward
    needs none: autograd runs it on a thread whose current device is the gradients'."""
    if t.is_cuda and not torch.compiler.is_compiling() and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter on CPU: any small number


def _bwd_split(rows: int, device: torch.device) -> tuple[int, int]:
    """Rows per backward program and the number of programs: about ``bwd_programs_per_sm`` programs per
    multiprocessor, each over a contiguous run of rows (one partial sum of the weight gradients each)."""
    target = _sm_count(device) * (launch_config.bwd_programs_per_sm or 32)
    rows_per_prog = max(1, math.ceil(rows / target))
    return rows_per_prog, math.ceil(rows / rows_per_prog)


def _ln_forward(
    u2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    z2: torch.Tensor,
    z1: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    u_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: ``LayerNorm(GELU(u2))`` into ``z2`` (and ``GELU(u1)`` into ``z1`` if
    given) for the rows of ``u2d`` (plus ``u_bias``, 2C, added on load, if given); ``z2`` may have more
    rows (they are left alone). Returns mean, rstd."""
    rows, width = u2d.shape
    c = width // 2
    mean = torch.empty(rows, dtype=torch.float32, device=u2d.device)
    rstd = torch.empty_like(mean)
    block_c, block_b = _row_pieces(c)
    per = launch_config.fwd_rows or 1
    tiles = triton.cdiv(rows, per)
    per_prog = 1  # tiles per program
    if launch_config.fwd_programs_per_sm:
        per_prog = max(1, math.ceil(tiles / (_sm_count(u2d.device) * launch_config.fwd_programs_per_sm)))
    _fwd_kernel[(triton.cdiv(tiles, per_prog),)](
        u2d, weight if u_bias is None else u_bias, z2 if z1 is None else z1, z2, weight, bias,
        mean if keep is None else keep, mean, rstd, rows, c, eps, per_prog, ROWS=per, BLOCK_C=block_c,
        BLOCK_B=block_b, WITH_Z1=z1 is not None, HAS_KEEP=keep is not None, HAS_UB=u_bias is not None,
        PREFETCH=bool(launch_config.fwd_prefetch) and per_prog > 1,
        num_warps=launch_config.fwd_warps or _warps(_block_c(c) * per),
    )  # fmt: skip
    return mean, rstd


def _ln_backward(
    u2d: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dz2: torch.Tensor,
    du: torch.Tensor,
    dz1: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    u_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the backward kernel: the gate half of ``du`` (and the bypass half if ``dz1`` is given) from
    the rows of ``dz2``; returns the LayerNorm weight and bias gradients (in the weight's dtype) and, with
    ``u_bias`` (2C, added to ``u2d`` on load), the float32 column sums of the ``du`` it wrote (2C; the
    bypass half is zero without ``dz1``), else None."""
    rows, width = u2d.shape
    c = width // 2
    block_c, block_b = _row_pieces(c)
    rows_per_prog, progs = _bwd_split(rows, u2d.device)
    dw = torch.empty(progs, c, dtype=torch.float32, device=u2d.device)
    db = torch.empty_like(dw)
    dub = None if u_bias is None else torch.empty(progs, 2 * c, dtype=torch.float32, device=u2d.device)
    _bwd_kernel[(progs,)](
        u2d, weight if u_bias is None else u_bias, dz2 if dz1 is None else dz1, dz2, weight,
        mean if keep is None else keep, mean, rstd, du, dw, db, dw if dub is None else dub, rows, c,
        rows_per_prog, BLOCK_C=block_c, BLOCK_B=block_b, WITH_Z1=dz1 is not None, HAS_KEEP=keep is not None,
        PREFETCH=bool(launch_config.bwd_prefetch), HAS_UB=u_bias is not None,
        num_warps=launch_config.bwd_warps or _warps(_block_c(c)),
    )  # fmt: skip
    return dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype), None if dub is None else dub.sum(0)


def _gate_grid(rows: int, c: int) -> tuple[tuple[int, int], int, int, int]:
    """Grid (row tiles x column tiles), rows and columns per program, and warps of the gating kernels."""
    block_c = min(launch_config.gate_cols or GATE_COLS, _block_c(c))
    per = launch_config.gate_rows or launch_config.fwd_rows or 1
    grid = (triton.cdiv(rows, per), triton.cdiv(c, block_c))
    return grid, per, block_c, launch_config.fwd_warps or _warps(block_c * per)


class _GeluSplitLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, *u_bias):  # type: ignore[override]
        """``u_bias``: nothing, or the channel projection's bias (2C), which ``u`` does not contain yet."""
        shape = u.shape
        u2d = u.reshape(-1, shape[-1]).contiguous()
        c = shape[-1] // 2
        z1 = u2d.new_empty(u2d.shape[0], c)
        z2 = torch.empty_like(z1)
        ub = u_bias[0] if u_bias else None
        mean, rstd = _ln_forward(u2d, weight, bias, eps, z2, z1=z1, u_bias=ub)
        ctx.save_for_backward(u2d, weight, mean, rstd, ub)
        ctx.shape = shape
        ctx.with_u_bias = bool(u_bias)
        return z1.view(*shape[:-1], c), z2.view(*shape[:-1], c)

    @staticmethod
    @once_differentiable  # Triton kernels: a double backward (create_graph) raises, never silently wrong
    def backward(ctx, dz1: torch.Tensor, dz2: torch.Tensor):  # type: ignore[override]
        u2d, weight, mean, rstd, ub = ctx.saved_tensors
        rows, width = u2d.shape
        dz1 = dz1.reshape(rows, width // 2).contiguous()
        dz2 = dz2.reshape(rows, width // 2).contiguous()
        du = torch.empty_like(u2d)
        dw, db, dub = _ln_backward(u2d, weight, mean, rstd, dz2, du, dz1=dz1, u_bias=ub)
        grads = (du.view(ctx.shape), dw, db, None)
        return (*grads, dub.to(ub.dtype)) if ctx.with_u_bias else grads


def _padded(n: int) -> int:
    """``n`` rounded up to a multiple of 8, so token-mixing GEMM sizes and row strides are 16-byte aligned
    in 16-bit dtypes. The H200 profile in benchmarks/RESULTS.md shows the unpadded 196-token GEMMs of
    gMLP-B/16 running in cuBLAS's ``align2`` fallback kernels, the usual result of unaligned sizes."""
    return -(-n // 8) * 8


def _norm_affine(
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    c: int,
    like: torch.Tensor,
    what: str,
    names: tuple[str, str] = ("weight", "bias"),
) -> tuple[torch.Tensor, torch.Tensor]:
    """A LayerNorm's weight and bias as the kernels read them: dense ``(c,)`` vectors (a strided view is
    copied; the kernels index them as contiguous), ones and zeros for None (an ``nn.LayerNorm`` without
    ``elementwise_affine`` or without a bias, as ``F.layer_norm`` takes them). ``what`` names the input
    ``like`` in the error (e.g. ``"spatial_gating: u"``).

    Raises:
        ValueError: a given weight or bias is not ``(c,)``.
    """
    if weight is None:
        weight = torch.ones(c, dtype=torch.float32, device=like.device)
    if bias is None:
        bias = torch.zeros(c, dtype=weight.dtype, device=like.device)
    if weight.shape != (c,) or bias.shape != (c,):
        fn, _, arg = what.partition(": ")
        raise ValueError(
            f"{fn}: {names[0]} and {names[1]} must have shape ({c},) for {arg} of shape {tuple(like.shape)}, "
            f"got {tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    return weight.contiguous(), bias.contiguous()


def _gating_forward(
    u: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor,
    keep: torch.Tensor | None,
    gate_bias: torch.Tensor | None,
    u_bias: torch.Tensor | None = None,
    bias_in_gemm: bool = False,
) -> tuple[torch.Tensor, ...]:
    """The fused forward (see :class:`_SpatialGating`): returns ``s`` (n, batch, C) and what the backward
    needs: ``u2d``, ``mean``, ``rstd``, ``z2n``, ``w_pad``, ``gate`` and ``token_bias``. ``u_bias`` (2C): the
    channel projection's bias, which ``u`` does not contain yet; the kernels add it on load.

    The token bias ``b`` is added by the gating kernels as they load the gate (``token_bias`` is then
    ``bias``, and ``gate`` holds ``W z2n`` without it): the GEMM runs as a plain ``mm``. With
    ``bias_in_gemm`` (:func:`token_bias_in_gemm_enabled`, an ablation) it is the GEMM's ``addmm`` input as
    before, which on CUDA first writes the bias broadcast over all ``batch * C`` columns into the output
    and then reads it back in the GEMM; ``token_bias`` is then None."""
    n, batch, width = u.shape
    c = width // 2
    n_pad = _padded(n)
    u2d = u.reshape(n * batch, width).contiguous()
    with torch.autocast(u.device.type, enabled=False):
        z2n = u2d.new_empty(n_pad, batch * c)
        mean, rstd = _ln_forward(u2d, norm_weight, norm_bias, eps, z2n, keep=keep, u_bias=u_bias)
        if n_pad == n:  # already aligned: no padded copies (fewer launches for the host to issue)
            w_pad = weight.contiguous()
        else:
            z2n[n:].zero_()
            w_pad = u2d.new_zeros(n_pad, n_pad)
            w_pad[:n, :n] = weight
        token_bias = None if bias_in_gemm else bias.contiguous()
        if bias_in_gemm:
            b_pad = bias.unsqueeze(1) if n_pad == n else F.pad(bias, (0, n_pad - n)).unsqueeze(1)
            gate = torch.addmm(b_pad, w_pad, z2n)
        else:
            gate = torch.mm(w_pad, z2n)
        if n_pad != n:
            gate = gate[:n]
        if gate_bias is not None:
            gate += gate_bias.reshape(n, batch * c)
        s = u2d.new_empty(n * batch, c)
        grid, per, block_c, warps = _gate_grid(n * batch, c)
        _gate_fwd_kernel[grid](
            u2d, gate if u_bias is None else u_bias, gate, gate if token_bias is None else token_bias, s,
            n * batch, c, batch, ROWS=per, BLOCK_C=block_c, HAS_UB=u_bias is not None,
            HAS_TB=token_bias is not None, num_warps=warps,
        )  # fmt: skip
    return s.view(n, batch, c), u2d, mean, rstd, z2n, w_pad, gate, token_bias


def _gating_backward(
    ds: torch.Tensor,
    u2d: torch.Tensor,
    norm_weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    keep: torch.Tensor | None,
    z2n: torch.Tensor,
    w_pad: torch.Tensor,
    gate: torch.Tensor,
    n: int,
    need_dweight: bool = True,
    need_dbias: bool = True,
    u_bias: torch.Tensor | None = None,
    token_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """The fused backward (see :class:`_SpatialGating`): ``du`` (rows, 2C), the gate LayerNorm's weight and
    bias gradients, ``dweight`` (n, n), ``dbias`` (n,), the gate gradient ``dgate`` (n, batch*C) and, with
    ``u_bias`` (the channel projection's bias, added on load), its gradient (2C, the column sums of
    ``du``, reduced inside the two kernels), else None. ``token_bias``: as returned by
    :func:`_gating_forward` (the bias the gating kernel adds to ``gate`` on load, or None)."""
    rows, width = u2d.shape
    c = width // 2
    with torch.autocast(u2d.device.type, enabled=False):
        ds = ds.reshape(rows, c).contiguous()
        du = torch.empty_like(u2d)
        dgate = u2d.new_empty(z2n.shape)
        if z2n.shape[0] != n:
            dgate[n:].zero_()
        grid, per, block_c, warps = _gate_grid(rows, c)
        row_sums = torch.empty(rows, grid[1], dtype=torch.float32, device=u2d.device)
        dub1 = None if u_bias is None else torch.empty(grid[0], c, dtype=torch.float32, device=u2d.device)
        _gate_bwd_kernel[grid](
            u2d, gate if u_bias is None else u_bias, gate, gate if token_bias is None else token_bias, ds, du,
            dgate, row_sums, row_sums if dub1 is None else dub1, rows, c, rows // n, ROWS=per,
            BLOCK_C=block_c, HAS_UB=u_bias is not None, HAS_TB=token_bias is not None, num_warps=warps,
        )  # fmt: skip
        dweight = None
        if need_dweight:
            dweight = torch.mm(dgate, z2n.t())
            if z2n.shape[0] != n:
                dweight = dweight[:n, :n]
        dbias = row_sums.view(n, -1).sum(1).to(u2d.dtype) if need_dbias else None
        dz2n = torch.mm(w_pad.t(), dgate)
        dnw, dnb, dub = _ln_backward(u2d, norm_weight, mean, rstd, dz2n, du, keep=keep, u_bias=u_bias)
        du_bias = None
        if dub is not None and dub1 is not None:  # (both given with u_bias) the bypass half from the gating
            dub[:c] = dub1.sum(0)
            du_bias = dub.to(u_bias.dtype)  # type: ignore[union-attr]
    return du, dnw, dnb, dweight, dbias, dgate[:n], du_bias


class _SpatialGating(torch.autograd.Function):
    """``GELU(u1) * (W LayerNorm(GELU(u2)) + b [+ gate_bias])`` for token-major ``u`` (n, batch, 2C).

    Forward: the LayerNorm kernel reads only the gate half and writes the normalised gate into a buffer of
    ``n_pad`` token rows (rows past n are zero), the token mixing is one ``(n_pad, n_pad) @ (n_pad, batch*C)``
    GEMM with a zero-padded W, and the gating kernel multiplies GELU(u1) (recomputed, never stored) by the
    gate. Saved for backward: u, the normalised gate, the gate and the padded W. Backward: the gating
    kernel writes the bypass half of du, the gate gradient and its row sums (for the token bias), two GEMMs
    give dW and the gradient of the normalised gate, and the LayerNorm kernel writes the gate half of du.
    Under torch.compile the same two halves run as the custom ops ``gmlp::spatial_gating_fwd`` / ``_bwd``.
    """

    @staticmethod
    def forward(ctx, *args: torch.Tensor | float | None) -> torch.Tensor:  # type: ignore[override]
        """``args``: those of :func:`_gating_forward`."""
        u_bias = args[8] if len(args) > 8 else None
        s, u2d, mean, rstd, z2n, w_pad, gate, token_bias = _gating_forward(
            *args[:8], u_bias, token_bias_in_gemm_enabled()  # type: ignore[arg-type]
        )
        norm_weight, keep, gate_bias = args[1], args[6], args[7]
        ctx.save_for_backward(u2d, norm_weight, mean, rstd, keep, z2n, w_pad, gate, u_bias, token_bias)
        ctx.gate_bias_dtype = None if gate_bias is None else gate_bias.dtype  # type: ignore[union-attr]
        ctx.with_u_bias = len(args) > 8
        return s

    @staticmethod
    @once_differentiable  # Triton kernels: a double backward (create_graph) raises, never silently wrong
    def backward(ctx, ds: torch.Tensor):  # type: ignore[override]
        u2d, norm_weight, mean, rstd, keep, z2n, w_pad, gate, u_bias, token_bias = ctx.saved_tensors
        n = gate.shape[0]
        du, dnw, dnb, dweight, dbias, dgate, du_bias = _gating_backward(
            ds, u2d, norm_weight, mean, rstd, keep, z2n, w_pad, gate, n,
            ctx.needs_input_grad[4], ctx.needs_input_grad[5], u_bias, token_bias,
        )  # fmt: skip
        dgate_bias = None
        if ctx.gate_bias_dtype is not None and ctx.needs_input_grad[7]:
            dgate_bias = dgate.view(ds.shape).to(ctx.gate_bias_dtype)
        grads = (du.view(*ds.shape[:2], u2d.shape[1]), dnw, dnb, None, dweight, dbias, None, dgate_bias)
        return (*grads, du_bias) if ctx.with_u_bias else grads


@torch.library.custom_op("gmlp::spatial_gating_fwd", mutates_args=())
def _spatial_gating_fwd_op(
    u: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor,
    keep: torch.Tensor | None,
    gate_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`spatial_gating`'s fused forward as an opaque op for torch.compile: ``s`` and, for the
    backward op, ``mean``, ``rstd``, ``z2n`` and ``gate`` (new tensors, none aliasing an input). Launched on
    ``u``'s GPU (:func:`_on_device`): a compiled graph sets no current device for an opaque op."""
    with _on_device(u):
        out = _gating_forward(u, norm_weight, norm_bias, eps, weight, bias, keep, gate_bias)
    s, mean, rstd, z2n, gate = out[0], out[2], out[3], out[4], out[6]
    return s, mean, rstd, z2n, gate  # gate without the token bias: the backward op adds it again


@_spatial_gating_fwd_op.register_fake
def _(u, norm_weight, norm_bias, eps, weight, bias, keep, gate_bias):  # noqa: ANN001, ANN202
    n, batch, width = u.shape
    c = width // 2
    stats = u.new_empty(n * batch, dtype=torch.float32)
    return (u.new_empty(n, batch, c), stats, torch.empty_like(stats), u.new_empty(_padded(n), batch * c),
            u.new_empty(n, batch * c))  # fmt: skip


@torch.library.custom_op("gmlp::spatial_gating_bwd", mutates_args=())
def _spatial_gating_bwd_op(
    ds: torch.Tensor,
    u: torch.Tensor,
    norm_weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    keep: torch.Tensor | None,
    z2n: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    gate: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`spatial_gating`'s fused backward as an opaque op: ``du``, the gate LayerNorm's weight and bias
    gradients, ``dweight``, ``dbias`` and ``dgate`` (for a gate bias). ``gate`` is the forward op's (without
    the token bias ``bias``, which the kernel adds on load)."""
    n, batch, width = u.shape
    n_pad = z2n.shape[0]
    w_pad = weight if n_pad == n else F.pad(weight, (0, n_pad - n, 0, n_pad - n))
    u2d = u.reshape(n * batch, width).contiguous()  # dense rows of 2C, as the forward op read them
    with _on_device(u):
        du, dnw, dnb, dweight, dbias, dgate, _ = _gating_backward(
            ds, u2d, norm_weight, mean, rstd, keep, z2n, w_pad.contiguous(), gate, n,
            token_bias=bias.contiguous(),
        )
    # dweight is a slice of the padded product when n is not aligned: contiguous, as the fake promises
    return du.view(n, batch, width), dnw, dnb, dweight.contiguous(), dbias, dgate  # type: ignore[union-attr,return-value]


@_spatial_gating_bwd_op.register_fake
def _(ds, u, norm_weight, mean, rstd, keep, z2n, weight, bias, gate):  # noqa: ANN001, ANN202
    n = u.shape[0]
    return (torch.empty_like(u), torch.empty_like(norm_weight), torch.empty_like(norm_weight),
            u.new_empty(n, n), u.new_empty(n), torch.empty_like(gate))  # fmt: skip


def _spatial_gating_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    u, norm_weight, _, _, weight, bias, keep, gate_bias = inputs
    _, mean, rstd, z2n, gate = output
    ctx.save_for_backward(u, norm_weight, mean, rstd, keep, z2n, weight, bias, gate)
    ctx.gate_bias_dtype = None if gate_bias is None else gate_bias.dtype


def _spatial_gating_op_backward(ctx, ds, *_):  # noqa: ANN001, ANN202
    u, norm_weight, mean, rstd, keep, z2n, weight, bias, gate = ctx.saved_tensors
    du, dnw, dnb, dweight, dbias, dgate = torch.ops.gmlp.spatial_gating_bwd(
        ds, u, norm_weight, mean, rstd, keep, z2n, weight, bias, gate
    )
    dgate_bias = None if ctx.gate_bias_dtype is None else dgate.view(ds.shape).to(ctx.gate_bias_dtype)
    return du, dnw, dnb, None, dweight, dbias, None, dgate_bias


torch.library.register_autograd(
    "gmlp::spatial_gating_fwd", _spatial_gating_op_backward, setup_context=_spatial_gating_setup
)


def triton_enabled(x: torch.Tensor) -> bool:
    """Whether :func:`gelu_split_layernorm` takes the Triton kernel for ``x`` by default: on CUDA, with
    Triton installed, ``GMLP_DISABLE_TRITON`` not ``1`` and no torch.compile tracing (inductor then fuses
    the reference ops itself), and not in float64: the kernels compute their statistics and the gating in
    float32, so a ``model.double()`` would silently get float32 precision (and fail ``gradcheck``); float64
    takes the plain ops, in float64 throughout."""
    return (
        _HAS_TRITON
        and x.is_cuda
        and x.dtype is not torch.float64
        and os.environ.get("GMLP_DISABLE_TRITON") != "1"
        and not torch.compiler.is_compiling()
    )


def compiled_kernels_enabled(x: torch.Tensor) -> bool:
    """Whether a block that torch.compile is tracing keeps the fused gating, as the opaque custom ops
    ``gmlp::spatial_gating_fwd`` / ``_bwd`` that inductor fuses around (otherwise it traces the reference
    ops and generates its own kernels). Opt-in, ``GMLP_TRITON_UNDER_COMPILE=1`` (on an H200 it gained 0.4%
    for gMLP-B/16 and 1.9% for the MLM over inductor's kernels); on CUDA with Triton, not in float64 (see
    :func:`triton_enabled`), and not with ``GMLP_DISABLE_TRITON=1`` or ``GMLP_DISABLE_FUSED_GATING=1``."""
    return _HAS_TRITON and x.is_cuda and x.dtype is not torch.float64 and _kernels_under_compile_requested()


def _kernels_under_compile_requested() -> bool:
    """The device-independent half of :func:`compiled_kernels_enabled`: tracing, opted in, not disabled."""
    return (
        torch.compiler.is_compiling()
        and os.environ.get("GMLP_TRITON_UNDER_COMPILE") == "1"
        and os.environ.get("GMLP_DISABLE_TRITON") != "1"
        and os.environ.get("GMLP_DISABLE_FUSED_GATING") != "1"
    )


#: Default of ``GMLP_FUSED_GATING_MIN_ELEMENTS``: the smallest ``fc1`` output (tokens x batch x d_ffn) that
#: takes the fused gating. Measured on an H200 (benchmarks/RESULTS.md, sixth session): at 5.0e7 (the
#: gMLP-base MLM, 512 tokens x 32) the step is bound by the host's kernel launches and the fused path, with
#: more launch work per block, trained 0.70-0.84x as fast as the split kernel; at 1.54e8 (gMLP-B/16, 196
#: tokens x 256) it trained 1.37x as fast. The seventh session timed single blocks between: the split kernel
#: was faster at 5.8e7 and 7.7e7, the two tied at 7.6e7, the fused path was faster from 1.0e8 on.
FUSED_GATING_MIN_ELEMENTS = 100_000_000


def fused_gating_min_elements() -> int:
    """The threshold of :func:`fused_gating_enabled`: ``GMLP_FUSED_GATING_MIN_ELEMENTS`` (a non-negative
    int; 0 = always fused) or :data:`FUSED_GATING_MIN_ELEMENTS`."""
    raw = os.environ.get("GMLP_FUSED_GATING_MIN_ELEMENTS")
    if raw is None or raw == "":
        return FUSED_GATING_MIN_ELEMENTS
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"GMLP_FUSED_GATING_MIN_ELEMENTS must be a non-negative int, got {raw!r}")
    return value


# nesting depth of prefer_fused_gating() in each thread (a CUDA graph's warm-up in one thread must not send
# another thread's eager blocks down the fused path at every size)
_prefer_fused = threading.local()
# (device index, stream handle) -> nesting depth of _prefer_fused_on_stream(): work queued on these streams
# prefers the fused gating in every thread (autograd runs the backward of CUDA ops, and with it the forward
# that a checkpointed block recomputes, in its own thread of the device, with the forward's stream current)
_prefer_streams: dict[tuple[int, int], int] = {}
_prefer_streams_lock = threading.Lock()


@contextlib.contextmanager
def prefer_fused_gating() -> Iterator[None]:
    """Inside this block, :func:`fused_gating_enabled` says yes at every size (``GMLP_DISABLE_FUSED_GATING=1``
    still switches it off): for steps whose host launch cost does not count, such as a step replayed as a
    CUDA graph (:class:`gmlp.train.cuda_graph.CUDAGraphStep` runs its warm-up steps and its capture in it,
    so that the kernels it captures are those its warm-up compiled). Capture alone also says yes. Here, and
    while capturing, :func:`spatial_gating` without a mask also runs its masked kernel variant (with an
    all-real mask), so that a warm-up whose masks were all real and dropped has compiled the variant that
    a capture with the mask needs. It holds in the calling thread only (another thread's blocks keep the size
    threshold); the graphed callables also mark their warm-up stream, so that autograd's device thread (the
    backward, and a checkpointed block's recomputed forward) takes the same path."""
    _prefer_fused.depth = getattr(_prefer_fused, "depth", 0) + 1
    try:
        yield
    finally:
        _prefer_fused.depth -= 1


@contextlib.contextmanager
def _prefer_fused_on_stream(stream: torch.cuda.Stream) -> Iterator[None]:
    """:func:`prefer_fused_gating` for the work queued on ``stream`` (a CUDA graph's private warm-up stream),
    whichever thread queues it: the calling thread, and autograd's thread of the device, which runs the
    backward of the warm-up's CUDA ops with ``stream`` current. A block recomputed there (gradient
    checkpointing) must take the path its forward took: another path saves other tensors (non-reentrant
    checkpoints raise) or first launches its backward kernels inside the capture (refused)."""
    key = (stream.device_index, stream.cuda_stream)
    with _prefer_streams_lock:
        _prefer_streams[key] = _prefer_streams.get(key, 0) + 1
    try:
        yield
    finally:
        with _prefer_streams_lock:
            if _prefer_streams[key] == 1:
                del _prefer_streams[key]
            else:
                _prefer_streams[key] -= 1


def fused_gating_enabled(elements: int | None = None) -> bool:
    """Whether a block that takes the Triton kernels uses :func:`spatial_gating` and the compute-dtype
    pre-norm (:func:`gmlp.kernels.layer_norm`) rather than :func:`gelu_split_layernorm` with plain gating
    ops and ``nn.LayerNorm`` (the split kernel).

    Args:
        elements: the size of the block's ``fc1`` output (tokens x batch x d_ffn). The fused path saves
            device time and memory but spends more host time per block; it is taken from
            :func:`fused_gating_min_elements` elements on (None = any size). ``GMLP_DISABLE_FUSED_GATING=1``
            switches it off at every size (an ablation for ``benchmarks/run.py``). Inside
            :func:`prefer_fused_gating`, or while a CUDA graph is being captured (a replay has no host
            launch cost), every size takes it.
    """
    if os.environ.get("GMLP_DISABLE_FUSED_GATING") == "1":
        return False
    if elements is None or _graph_warmup_or_capture():
        return True
    return elements >= fused_gating_min_elements()


def _graph_warmup_or_capture() -> bool:
    """Inside :func:`prefer_fused_gating` (a CUDA graph's warm-up calls and capture, see
    :class:`gmlp.train.cuda_graph.CUDAGraphStep`), on a stream of :func:`_prefer_fused_on_stream` (the
    warm-up's, also in autograd's device thread) or while a CUDA graph is being captured."""
    if getattr(_prefer_fused, "depth", 0):
        return True
    if not torch.cuda.is_available():
        return False
    if _prefer_streams:
        current = torch.cuda.current_stream()
        if (current.device_index, current.cuda_stream) in _prefer_streams:
            return True
    return torch.cuda.is_current_stream_capturing()


def fold_fc1_bias_enabled() -> bool:
    """Whether a block on a Triton path hands ``fc1``'s bias to :func:`spatial_gating` or
    :func:`gelu_split_layernorm` (``u_bias``) instead of adding it in the ``fc1`` GEMM: the kernels then add
    it on load and reduce its gradient inside the backward kernels, which saves autograd's separate
    reduction over the ``fc1`` output gradient (a bf16 sum that took 4.4 ms of an 89 ms gMLP-B/16 step in
    the H200 profile of benchmarks/RESULTS.md). Opt-in, ``GMLP_FOLD_FC1_BIAS=1``, until it is timed on a
    GPU (tested on the CPU with the Triton interpreter)."""
    return os.environ.get("GMLP_FOLD_FC1_BIAS") == "1"


def token_bias_in_gemm_enabled() -> bool:
    """Whether the eager fused gating adds the token bias in the token-mixing GEMM (``addmm``) rather than
    in its gating kernels (the default). An ablation, ``GMLP_TOKEN_BIAS_IN_GEMM=1``: on CUDA, ``addmm``
    with a per-row bias first copies the bias broadcast over the whole ``(n, batch * C)`` output and the
    GEMM then reads it back; the H200 profiles of benchmarks/RESULTS.md show a strided copy kernel of
    4.3 ms in an 89 ms gMLP-B/16 step and 2.0 ms in a 62 ms MLM step, in proportion to that output's
    size. (Under torch.compile the kernels always add it.)"""
    return os.environ.get("GMLP_TOKEN_BIAS_IN_GEMM") == "1"


def fuse_residual_grad_enabled() -> bool:
    """Whether a block on the fused-gating path takes its pre-norm from :func:`gmlp.kernels.layer_norm` with
    ``return_residual=True``: the residual gradient is then added into the LayerNorm's input gradient inside
    its backward kernel, instead of autograd summing the two gradients of the block input in a separate
    kernel (reads two activation-sized tensors, writes a third: one per block of a training step). Opt-in,
    ``GMLP_FUSE_RESIDUAL_GRAD=1``, until it is timed on a GPU (tested on the CPU with the Triton
    interpreter)."""
    return os.environ.get("GMLP_FUSE_RESIDUAL_GRAD") == "1"


def gelu_split_layernorm(
    u: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    use_triton: bool | None = None,
    u_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z1, LayerNorm(z2))`` with ``z1, z2 = GELU(u).chunk(2, -1)``: fused Triton kernel or reference.

    Args:
        u: pre-activation of the channel projection, ``(..., 2C)``.
        weight, bias: the gate LayerNorm's affine parameters ``(C,)``, or None (as ``F.layer_norm``: no
            scale, no shift).
        eps: the gate LayerNorm's epsilon.
        use_triton: force the kernel (True) or the reference (False); None = the kernel on CUDA when
            Triton is available, ``GMLP_DISABLE_TRITON`` is not ``1`` and no torch.compile is tracing.
        u_bias: optional ``(2C,)`` bias of the channel projection, not yet added to ``u``: the kernel adds
            it on load and reduces its gradient in its backward (:func:`fold_fc1_bias_enabled`); the
            reference adds it to ``u`` first.

    Raises:
        ValueError: ``u``'s last dimension is not even, ``u_bias`` is not ``(2C,)``, or (kernel) ``weight``
            or ``bias`` is not ``(C,)``.
    """
    if use_triton is None:
        use_triton = triton_enabled(u)
    if u.dim() == 0 or u.shape[-1] % 2:
        raise ValueError(
            f"u must have an even last dimension (2C: the bypass and gate halves), got shape {tuple(u.shape)}"
        )
    if u_bias is not None and u_bias.shape != (u.shape[-1],):
        raise ValueError(
            f"u_bias must have shape ({u.shape[-1]},) like u's last dimension, got {tuple(u_bias.shape)}"
        )
    if use_triton:
        if not _HAS_TRITON:
            raise RuntimeError("use_triton=True but the triton package is not installed")
        weight, bias = _norm_affine(weight, bias, u.shape[-1] // 2, u, "gelu_split_layernorm: u")
        with _on_device(u):
            if u_bias is not None:
                return _GeluSplitLayerNorm.apply(u, weight, bias, eps, u_bias.contiguous())
            return _GeluSplitLayerNorm.apply(u, weight, bias, eps)
    return gelu_split_layernorm_reference(u if u_bias is None else u + u_bias.to(u.dtype), weight, bias, eps)


def spatial_gating_reference(
    u: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mask: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference path of the whole SGU after ``fc1``, token-major ``u`` (n, batch, 2C):
    ``z1, z2 = GELU(u).chunk(2, -1)``, ``gate = W LayerNorm(z2) + b`` (padded tokens zeroed before the
    mixing) ``+ gate_bias``; returns ``z1 * gate`` (n, batch, C). ``weight`` is the dense (n, n) W."""
    n, batch, width = u.shape
    z1, z2n = gelu_split_layernorm_reference(u, norm_weight, norm_bias, eps)
    if mask is not None:
        z2n = z2n.masked_fill(~mask.t().unsqueeze(-1), 0.0)
    gate = torch.addmm(bias.unsqueeze(1), weight, z2n.reshape(n, -1)).view(n, batch, width // 2)
    if gate_bias is not None:
        gate = gate + gate_bias
    return z1 * gate


def spatial_gating(
    u: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mask: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
    use_triton: bool | None = None,
    u_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The spatial gating unit from the channel projection's output ``u`` on: fused kernels or reference.

    ``GELU(u1) * (W LayerNorm(GELU(u2)) + b + gate_bias)`` with ``u1, u2 = u.chunk(2, -1)``. The fused path
    (:class:`_SpatialGating`) never writes ``GELU(u1)`` to memory, runs the token mixing as one GEMM with
    16-byte aligned sizes, and saves one activation tensor fewer for backward than the unfused ops.

    Args:
        u: ``fc1`` output, token-major ``(n, batch, 2C)``, in the compute dtype.
        norm_weight, norm_bias, eps: the gate LayerNorm (``(C,)`` each, or None as in ``F.layer_norm``).
        weight: the dense token-mixing matrix ``(n, n)`` (Toeplitz expansion and causal mask applied, e.g.
            :meth:`gmlp.nn.TokenProjection.matrix`); ``bias``: ``(n,)``. Cast to ``u``'s dtype here.
        mask: optional ``(batch, n)`` bool padding mask, True = real token (its values are the caller's to
            validate; the kernels check its shape).
        gate_bias: optional ``(n, batch, C)`` (or a shape that broadcasts to it) added to the gate (aMLP's
            tiny attention).
        use_triton: force the kernels (True) or the reference (False); None = :func:`triton_enabled`.
        u_bias: optional ``(2C,)`` bias of the channel projection, not yet added to ``u`` (``u`` is then
            ``x @ fc1.weight.T``): the fused kernels add it on load and reduce its gradient inside the
            backward kernels, so autograd runs no separate bias-gradient reduction over ``du``
            (:func:`fold_fc1_bias_enabled`). Elsewhere it is added to ``u`` first.

    Raises:
        ValueError: ``u_bias`` is not ``(2C,)``; on the kernel path also ``u`` is not ``(n, batch, 2C)``,
            ``weight`` not ``(n, n)``, ``bias`` not ``(n,)``, ``norm_weight`` or ``norm_bias`` not ``(C,)``,
            ``mask`` not ``(batch, n)`` or ``gate_bias`` does not broadcast to ``(n, batch, C)`` (the
            reference path raises the plain ops' errors).
    """
    if use_triton is None:
        use_triton = triton_enabled(u)
    weight, bias = weight.to(u.dtype), bias.to(u.dtype)
    if u_bias is not None and u_bias.shape != (u.shape[-1],):
        raise ValueError(
            f"u_bias must have shape ({u.shape[-1]},) like u's last dimension, got {tuple(u_bias.shape)}"
        )
    if u_bias is not None and (not use_triton or torch.compiler.is_compiling()):
        u, u_bias = u + u_bias.to(u.dtype), None  # the bias as the projection would have added it
    if not use_triton:
        return spatial_gating_reference(u, norm_weight, norm_bias, eps, weight, bias, mask, gate_bias)
    if not _HAS_TRITON:
        raise RuntimeError("use_triton=True but the triton package is not installed")
    if u.dim() != 3 or u.shape[-1] % 2 or weight.shape != (u.shape[0], u.shape[0]):
        raise ValueError(
            f"spatial_gating expects u (n, batch, 2C) and weight (n, n); got u {tuple(u.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    n, batch, width = u.shape
    if bias.shape != (n,):
        raise ValueError(
            f"spatial_gating: bias must have shape ({n},) for u of {n} tokens, got {tuple(bias.shape)}"
        )
    norm_weight, norm_bias = _norm_affine(
        norm_weight, norm_bias, width // 2, u, "spatial_gating: u", ("norm_weight", "norm_bias")
    )
    if mask is not None and mask.shape != (batch, n):
        raise ValueError(
            f"spatial_gating: mask must have shape (batch, n) = ({batch}, {n}), got {tuple(mask.shape)}"
        )
    if gate_bias is not None and gate_bias.shape != (n, batch, width // 2):
        try:  # a broadcast gate bias, as the reference's ``gate + gate_bias`` takes it
            gate_bias = gate_bias.expand(n, batch, width // 2)
        except RuntimeError:
            raise ValueError(
                f"spatial_gating: gate_bias must broadcast to (n, batch, C) = ({n}, {batch}, {width // 2}), "
                f"got {tuple(gate_bias.shape)}"
            ) from None
    if u_bias is not None:
        u_bias = u_bias.contiguous()
    keep = None if mask is None else mask.t().reshape(-1).to(torch.float32)
    if keep is None and not torch.compiler.is_compiling() and _graph_warmup_or_capture():
        # a CUDA graph's warm-up and its capture launch the same kernel variants: a Triton kernel first
        # launched inside a capture fails there (its module load is refused while the stream captures), and
        # a caller may drop an all-real mask eagerly but keep it in the capture (gmlp's text models do)
        keep = u.new_ones(u.shape[0] * u.shape[1], dtype=torch.float32)
    args = (u, norm_weight, norm_bias, eps, weight, bias, keep, gate_bias)
    if torch.compiler.is_compiling():  # opaque custom ops: inductor fuses around them
        return torch.ops.gmlp.spatial_gating_fwd(*args)[0]
    with _on_device(u):
        return _SpatialGating.apply(*args) if u_bias is None else _SpatialGating.apply(*args, u_bias)
