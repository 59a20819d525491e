"""Toeplitz token mixing by FFT: ``g = W z`` with ``W[i, j] = w[i - j]`` in O(n log n) per channel.

The dense path costs ``n^2`` multiply-adds per channel and runs as one GEMM; this path costs a few FFTs of
length ``>= 2n - 1`` per channel. It wins at long sequences; ``benchmarks/toeplitz_crossover.py`` measures
where, and :class:`gmlp.nn.TokenProjection` switches to it from ``fft_threshold`` tokens on.
"""

from __future__ import annotations

import torch

__all__ = ["toeplitz_mix_fft"]


def _fft_size(n: int) -> int:
    """Smallest 5-smooth size (2^a 3^b 5^c) >= 2n - 1: the FFT lengths pocketfft and cuFFT handle fastest."""
    size = 2 * n - 1
    while True:
        rest = size
        for p in (2, 3, 5):
            while rest % p == 0:
                rest //= p
        if rest == 1:
            return size
        size += 1


def toeplitz_mix_fft(
    weight: torch.Tensor, z: torch.Tensor, seq_len: int, causal: bool = False
) -> torch.Tensor:
    """Apply the Toeplitz token mixing of ``weight`` to token-major ``z`` via FFT (no bias).

    Args:
        weight: ``(2 * seq_len - 1,)`` or ``(heads, 2 * seq_len - 1)``; ``weight[k]`` holds the
            offset ``k - (seq_len - 1)``.
        z: ``(n, batch, channels)`` with ``n <= seq_len``; with heads, channels split into ``heads`` groups.
        seq_len: the layer's configured length (locates offset 0 in ``weight``).
        causal: drop the offsets ``i - j < 0`` (no dependence on later tokens).

    Returns:
        ``(n, batch, channels)``, equal to ``W[:n, :n] @ z`` up to FFT rounding.
    """
    n, batch, channels = z.shape
    heads = 1 if weight.dim() == 1 else weight.shape[0]
    centre = seq_len - 1
    kernel = weight[..., centre - (n - 1) : centre + n]  # offsets -(n-1) .. n-1
    if causal:
        kernel = torch.cat([torch.zeros_like(kernel[..., : n - 1]), kernel[..., n - 1 :]], dim=-1)
    size = _fft_size(n)
    work = torch.promote_types(z.dtype, torch.float32)  # float64 stays float64; half types go up
    # circular layout: offset k >= 0 at index k, offset k < 0 at index size + k
    h = torch.zeros(*kernel.shape[:-1], size, dtype=work, device=z.device)
    h[..., :n] = kernel[..., n - 1 :].to(work)
    if n > 1:
        h[..., size - (n - 1) :] = kernel[..., : n - 1].to(work)
    h_f = torch.fft.rfft(h, dim=-1)  # (..., size // 2 + 1)
    zf = torch.fft.rfft(z.to(work), n=size, dim=0)  # (size // 2 + 1, batch, channels)
    if heads == 1:
        out = zf * h_f[:, None, None]
    else:
        out = (zf.view(-1, batch, heads, channels // heads) * h_f.t()[:, None, :, None]).view(zf.shape)
    return torch.fft.irfft(out, n=size, dim=0)[:n].to(z.dtype)
