"""Resolution change for vision gMLP: resample the token-mixing W and bias to a new patch grid.

W of a model built on an ``h x w`` grid maps ``h*w`` input tokens to ``h*w`` output tokens. Seen as a 4-D
field ``W[out_y, out_x, in_y, in_x]`` over normalized image coordinates, it is interpolated (bicubic,
``align_corners=False``) over the output pair of axes and over the input pair of axes to the new grid
``H x W``. Because each output then sums over ``H*W`` instead of ``h*w`` inputs, the values are scaled by
``(h*w) / (H*W)`` so that a smooth kernel keeps its total weight (a Riemann-sum normalisation); at the
same grid the scale is 1 and the resampling is the identity. The per-token bias is a 2-D map over the
output grid and is interpolated the same way (no scaling).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .patch import to_2tuple

__all__ = ["resample_spatial_weight", "resample_spatial_bias"]


def _resample_last2(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Interpolate the last two axes of ``x`` to ``size`` (leading axes are flattened into a batch)."""
    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, *x.shape[-2:])
    if flat.dtype != torch.float64:  # interpolate in float32 at least (half types), never below the input
        flat = flat.float()
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    out = F.interpolate(flat, size=size, mode=mode, **kwargs)
    return out.reshape(*lead, *size)


def _check_mode(mode: str) -> None:
    if mode not in ("bicubic", "bilinear", "nearest"):
        raise ValueError(f"mode must be 'bicubic', 'bilinear' or 'nearest', got {mode!r}")


def _check_floating(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        got = f"dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name} must be a floating-point tensor, got {got}")


def resample_spatial_weight(
    weight: torch.Tensor,
    old_grid: int | tuple[int, int],
    new_grid: int | tuple[int, int],
    mode: str = "bicubic",
) -> torch.Tensor:
    """Resample a token-mixing matrix from ``old_grid`` to ``new_grid``.

    Args:
        weight: ``(n, n)`` or ``(heads, n, n)`` with ``n = old_h * old_w``, rows = output tokens.
        old_grid: the ``(h, w)`` patch grid the weight was made for (an int means square).
        new_grid: the target ``(H, W)`` grid.
        mode: ``"bicubic"``, ``"bilinear"`` or ``"nearest"`` (``F.interpolate`` modes).

    Returns:
        ``(N, N)`` or ``(heads, N, N)`` with ``N = H * W``, in ``weight``'s dtype.
    """
    (h, w), (nh, nw) = to_2tuple(old_grid, "old_grid"), to_2tuple(new_grid, "new_grid")
    _check_floating(weight, "weight")
    n = h * w
    if weight.dim() not in (2, 3) or tuple(weight.shape[-2:]) != (n, n):
        raise ValueError(
            f"weight must have shape (n, n) or (heads, n, n) with n = {h}*{w} = {n} for old_grid {(h, w)}, "
            f"got {tuple(weight.shape)}"
        )
    _check_mode(mode)
    lead = weight.shape[:-2]
    field = weight.reshape(*lead, h, w, h, w)
    field = _resample_last2(field, (nh, nw), mode)  # input axes
    field = field.movedim((-4, -3), (-2, -1))  # (..., in_y, in_x, out_y, out_x)
    field = _resample_last2(field, (nh, nw), mode)  # output axes
    field = field.movedim((-2, -1), (-4, -3))  # (..., out_y, out_x, in_y, in_x)
    scale = n / (nh * nw)
    return (field.reshape(*lead, nh * nw, nh * nw) * scale).to(weight.dtype)


def resample_spatial_bias(
    bias: torch.Tensor,
    old_grid: int | tuple[int, int],
    new_grid: int | tuple[int, int],
    mode: str = "bicubic",
) -> torch.Tensor:
    """Resample a per-token bias ``(n,)`` or ``(heads, n)`` as a 2-D map from ``old_grid`` to ``new_grid``."""
    (h, w), (nh, nw) = to_2tuple(old_grid, "old_grid"), to_2tuple(new_grid, "new_grid")
    _check_floating(bias, "bias")
    _check_mode(mode)
    if bias.dim() not in (1, 2) or bias.shape[-1] != h * w:
        raise ValueError(f"bias must have shape (n,) or (heads, n) with n = {h * w}, got {tuple(bias.shape)}")
    lead = bias.shape[:-1]
    out = _resample_last2(bias.reshape(*lead, h, w), (nh, nw), mode)
    return out.reshape(*lead, nh * nw).to(bias.dtype)
