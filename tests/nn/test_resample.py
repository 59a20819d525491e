"""Resolution change: resampling the spatial W and bias to a new patch grid."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gmlp.nn import resample_spatial_bias, resample_spatial_weight

grids = st.tuples(st.integers(1, 7), st.integers(1, 7))
modes = st.sampled_from(["bicubic", "bilinear", "nearest"])


def centers(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised (y, x) coordinates in [0, 1] of the centres of an h x w grid, flattened row-major."""
    y = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    x = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    return yy.reshape(-1), xx.reshape(-1)


def smooth_map(h: int, w: int) -> torch.Tensor:
    """A smooth, non-symmetric function of position (a transposed or mis-ordered grid would not fit)."""
    y, x = centers(h, w)
    return torch.sin(math.pi * y) * torch.cos(math.pi * x) + 0.5 * y


def smooth_kernel(h: int, w: int, width: float = 0.15) -> torch.Tensor:
    """A local kernel W[out, in] = g(pos_out - pos_in) / n, with a shifted centre (non-symmetric)."""
    y, x = centers(h, w)
    d2 = (y[:, None] - y[None, :] - 0.05) ** 2 + (x[:, None] - x[None, :]) ** 2
    return torch.exp(-d2 / (2 * width**2)) / (h * w)


@given(grid=grids, heads=st.sampled_from([None, 1, 3]), mode=modes)
def test_same_grid_is_identity(grid, heads, mode) -> None:
    n = grid[0] * grid[1]
    shape = (n, n) if heads is None else (heads, n, n)
    w = torch.randn(shape)
    out = resample_spatial_weight(w, grid, grid, mode=mode)
    assert out.shape == w.shape and out.dtype == w.dtype
    assert (out - w).abs().max() <= 1e-6
    b = torch.randn(shape[:-1])
    assert (resample_spatial_bias(b, grid, grid, mode=mode) - b).abs().max() <= 1e-6


def test_same_grid_is_identity_in_float64() -> None:
    """No round trip through float32: a float64 W comes back to float64 precision."""
    w = torch.randn(2, 35, 35, dtype=torch.float64)
    out = resample_spatial_weight(w, (5, 7), (5, 7))
    assert out.dtype == torch.float64
    assert (out - w).abs().max() <= 1e-12
    b = torch.randn(35, dtype=torch.float64)
    assert (resample_spatial_bias(b, (5, 7), (5, 7)) - b).abs().max() <= 1e-12


def test_half_precision_is_supported() -> None:
    w = torch.randn(16, 16).to(torch.bfloat16)
    out = resample_spatial_weight(w, 4, 6)
    assert out.dtype == torch.bfloat16 and out.shape == (36, 36)
    assert torch.isfinite(out.float()).all()


@given(old=grids, new=grids, mode=modes,
       c=st.floats(-2, 2, allow_nan=False, allow_subnormal=False).filter(lambda v: abs(v) > 1e-3))
def test_constant_weight_stays_constant_scaled_by_n_ratio(old, new, c, mode) -> None:
    n, big_n = old[0] * old[1], new[0] * new[1]
    w = torch.full((n, n), c)
    out = resample_spatial_weight(w, old, new, mode=mode)
    assert out.shape == (big_n, big_n)
    torch.testing.assert_close(out, torch.full_like(out, c * n / big_n), atol=1e-6, rtol=1e-5)
    # each output token keeps the total weight of its row (Riemann-sum normalisation)
    torch.testing.assert_close(out.sum(-1), torch.full((big_n,), c * n), atol=1e-4, rtol=1e-5)


@given(old=grids, new=grids, mode=modes)
def test_constant_bias_stays_constant_unscaled(old, new, mode) -> None:
    b = torch.full((2, old[0] * old[1]), 1.25)
    out = resample_spatial_bias(b, old, new, mode=mode)
    assert out.shape == (2, new[0] * new[1])
    torch.testing.assert_close(out, torch.full_like(out, 1.25))


@pytest.mark.parametrize(
    ("old", "new"), [(14, 20), (14, 10), ((10, 14), (14, 20)), (16, 12), ((12, 8), (9, 6))]
)
def test_smooth_bias_stays_close_to_its_function(old, new) -> None:
    old, new = (old, old) if isinstance(old, int) else old, (new, new) if isinstance(new, int) else new
    out = resample_spatial_bias(smooth_map(*old).float(), old, new)
    expected = smooth_map(*new).float()
    assert (out - expected).abs().max() < 0.05
    # a transposed reading of the grid is far off (so this test can fail)
    wrong = smooth_map(new[1], new[0]).reshape(new[1], new[0]).t().reshape(-1).float()
    assert (wrong - expected).abs().max() > 0.3


@pytest.mark.parametrize(("old", "new"), [(14, 20), (14, 10), ((8, 12), (12, 16))])
def test_smooth_kernel_keeps_its_shape_and_action(old, new) -> None:
    old, new = (old, old) if isinstance(old, int) else old, (new, new) if isinstance(new, int) else new
    out = resample_spatial_weight(smooth_kernel(*old).float(), old, new).double()
    expected = smooth_kernel(*new)
    assert (out - expected).abs().max() < 0.1 * expected.abs().max()
    img = smooth_map(*new)
    assert (out @ img - expected @ img).abs().max() < 0.05 * (expected @ img).abs().max()


def test_heads_are_resampled_independently() -> None:
    w = torch.randn(3, 16, 16)
    stacked = resample_spatial_weight(w, 4, (5, 6))
    for h in range(3):
        torch.testing.assert_close(stacked[h], resample_spatial_weight(w[h], 4, (5, 6)))
    b = torch.randn(3, 16)
    stacked_b = resample_spatial_bias(b, 4, (5, 6))
    for h in range(3):
        torch.testing.assert_close(stacked_b[h], resample_spatial_bias(b[h], 4, (5, 6)))


def test_input_and_output_axes_are_both_resampled() -> None:
    """A W that depends only on the output token (rows) resamples like a bias map on rows; likewise cols."""
    row_map = smooth_map(6, 6).float()
    w_rows = row_map[:, None].expand(36, 36).contiguous()
    out = resample_spatial_weight(w_rows, 6, 9)
    torch.testing.assert_close(out, (resample_spatial_bias(row_map, 6, 9) * 36 / 81)[:, None].expand(81, 81),
                               atol=1e-6, rtol=1e-5)
    w_cols = row_map[None, :].expand(36, 36).contiguous()
    out = resample_spatial_weight(w_cols, 6, 9)
    torch.testing.assert_close(out, (resample_spatial_bias(row_map, 6, 9) * 36 / 81)[None, :].expand(81, 81),
                               atol=1e-6, rtol=1e-5)


def test_bad_shapes_and_modes() -> None:
    with pytest.raises(ValueError, match=r"n = 4\*4 = 16.*\(15, 15\)"):
        resample_spatial_weight(torch.randn(15, 15), 4, 5)
    with pytest.raises(ValueError, match=r"\(16, 15\)"):
        resample_spatial_weight(torch.randn(16, 15), 4, 5)
    with pytest.raises(ValueError, match="'area'"):
        resample_spatial_weight(torch.randn(16, 16), 4, 5, mode="area")
    with pytest.raises(ValueError, match="n = 16"):
        resample_spatial_bias(torch.randn(15), 4, 5)
    with pytest.raises(ValueError, match="new_grid"):
        resample_spatial_weight(torch.randn(16, 16), 4, (5, 0))
