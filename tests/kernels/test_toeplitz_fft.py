"""The FFT Toeplitz path equals the dense reference path (forward and gradients)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gmlp.kernels.toeplitz import _fft_size, toeplitz_mix_fft
from gmlp.nn import TokenProjection


def _pair(seq_len: int, heads: int, causal: bool) -> tuple[TokenProjection, TokenProjection]:
    dense = TokenProjection(seq_len, toeplitz=True, causal=causal, heads=heads)
    torch.nn.init.normal_(dense.weight)
    torch.nn.init.normal_(dense.bias)
    fft = TokenProjection(seq_len, toeplitz=True, causal=causal, heads=heads, fft_threshold=1)
    fft.load_state_dict(dense.state_dict())
    return dense, fft


@settings(max_examples=25, deadline=None)
@given(
    seq_len=st.integers(1, 40),
    frac=st.floats(0.05, 1.0, allow_subnormal=False),
    heads=st.sampled_from([1, 2, 4]),
    causal=st.just(False),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_fft_path_matches_dense_forward_and_grad(
    seq_len: int, frac: float, heads: int, causal: bool, batch: int, seed: int
) -> None:
    torch.manual_seed(seed)
    n = max(1, round(frac * seq_len))
    dense, fft = _pair(seq_len, heads, causal)
    z = torch.randn(n, batch, 4 * heads, requires_grad=True)
    mask = torch.rand(batch, n) > 0.3
    y_ref = dense(z, mask)
    y_fft = fft(z, mask)
    scale = y_ref.abs().max().item() + 1.0
    torch.testing.assert_close(y_fft, y_ref, rtol=0, atol=1e-5 * scale)
    g = torch.randn_like(y_ref)
    grads_ref = torch.autograd.grad((y_ref * g).sum(), [z, dense.weight, dense.bias])
    grads_fft = torch.autograd.grad((y_fft * g).sum(), [z, fft.weight, fft.bias])
    for a, b in zip(grads_fft, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * (b.abs().max().item() + 1.0))


def test_causal_layers_keep_exact_causality_with_fft_threshold() -> None:
    dense, fft = _pair(32, 1, causal=True)
    z = torch.randn(32, 2, 8, requires_grad=True)
    (grad,) = torch.autograd.grad(fft(z)[10].sum(), z)
    assert torch.all(grad[11:] == 0)  # exactly: causal layers stay on the dense path
    assert grad[:11].abs().max() > 1e-2
    # the FFT kernel itself drops the future offsets (up to rounding)
    (grad_fft,) = torch.autograd.grad(toeplitz_mix_fft(fft.weight, z, 32, causal=True)[10].sum(), z)
    assert grad_fft[11:].abs().max() < 1e-5
    torch.testing.assert_close(fft(z), dense(z))


def test_fft_size_is_smooth_and_large_enough() -> None:
    for n in range(1, 300):
        size = _fft_size(n)
        assert size >= 2 * n - 1
        rest = size
        for p in (2, 3, 5):
            while rest % p == 0:
                rest //= p
        assert rest == 1


def test_fft_threshold_needs_toeplitz() -> None:
    with pytest.raises(ValueError, match="fft_threshold needs toeplitz=True"):
        TokenProjection(8, fft_threshold=4)


def test_direct_call_matches_matrix() -> None:
    p = TokenProjection(12, toeplitz=True)
    torch.nn.init.normal_(p.weight)
    z = torch.randn(9, 2, 3)
    ref = torch.einsum("ij,jbc->ibc", p.matrix(9), z)
    torch.testing.assert_close(toeplitz_mix_fft(p.weight, z, 12), ref, rtol=0, atol=1e-5)


def test_fft_mixing_checks_its_arguments() -> None:
    z = torch.randn(8, 2, 4)
    with pytest.raises(ValueError, match=r"2 \* seq_len - 1 = 15 entries in its last axis, got shape \(13"):
        toeplitz_mix_fft(torch.randn(13), z, 8)  # would have read the wrong offsets
    with pytest.raises(ValueError, match="z must have 1 to seq_len=8 tokens, got 9"):
        toeplitz_mix_fft(torch.randn(15), torch.randn(9, 2, 4), 8)
    with pytest.raises(ValueError, match=r"z must have shape \(n, batch, channels\)"):
        toeplitz_mix_fft(torch.randn(15), torch.randn(8, 4), 8)
    with pytest.raises(ValueError, match=r"z's channels \(4\) must be divisible by weight's heads \(3\)"):
        toeplitz_mix_fft(torch.randn(3, 15), z, 8)


@pytest.mark.parametrize("shape", [(5, 0, 4), (5, 2, 0)], ids=["empty-batch", "no-channels"])
@pytest.mark.parametrize("heads", [None, 2])
def test_empty_inputs_mix_like_the_dense_path(shape: tuple[int, ...], heads: int | None) -> None:
    """An empty batch (or no channels) gives the dense path's empty output and zero gradients, not the FFT
    library's error for an empty transform; also through a TokenProjection past its fft_threshold."""
    weight = torch.randn(*(() if heads is None else (heads,)), 15, requires_grad=True)
    z = torch.randn(shape, requires_grad=True)
    out = toeplitz_mix_fft(weight, z, 8)
    assert out.shape == shape and out.dtype == z.dtype
    out.sum().backward()
    assert z.grad is not None and z.grad.shape == shape
    assert weight.grad is not None and not weight.grad.any()
    if shape[-1] % 2 == 0:  # through TokenProjection too, with one head and with two
        dense, fft = _pair(8, heads or 1, causal=False)
        x = torch.randn(shape)
        torch.testing.assert_close(fft(x), dense(x))
