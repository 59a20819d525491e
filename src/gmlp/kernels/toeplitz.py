"""Toeplitz token mixing: the dense ``W`` from its ``2L - 1`` diagonals, and mixing by FFT.

* :func:`toeplitz_matrix` expands the weight into the dense ``(n, n)`` W with ``W[i, j] = w[i - j]``. From
  :data:`DIAGONAL_SUM_MIN_TOKENS` tokens on, its backward sums each diagonal of the gradient by one padded,
  skewed view and one reduction. Autograd's own backward of the ``unfold`` view
  (:func:`toeplitz_matrix_reference`) runs an ``unfold_backward`` kernel whose time grows fast with ``n``: it
  took 2.8 ms of a 62 ms gMLP-base MLM step on an H200 (48 layers at n = 512, sixth session's profile,
  benchmarks/RESULTS.md).
* :func:`toeplitz_mix_fft`: the dense path costs ``n^2`` multiply-adds per channel and runs as one GEMM;
  this path costs a few FFTs of length ``>= 2n - 1`` per channel. It wins at long sequences;
  ``benchmarks/toeplitz_crossover.py`` measures where, and :class:`gmlp.nn.TokenProjection` switches to it
  from ``fft_threshold`` tokens on.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .cpu_linear import forward_ad_active

__all__ = ["DIAGONAL_SUM_MIN_TOKENS", "toeplitz_matrix", "toeplitz_matrix_reference", "toeplitz_mix_fft"]

#: From this many tokens on, :func:`toeplitz_matrix` takes the diagonal-sum backward. On the 2-core CPU the
#: expansion's forward and backward ran 0.86x autograd's at 196 tokens, level at 256, 1.25x at 320 and 1.7x at
#: 512 (`benchmarks/toeplitz_crossover.py --matrix`, benchmarks/RESULTS.md, tenth session); below, the
#: Python of a custom autograd function costs more than it saves.
DIAGONAL_SUM_MIN_TOKENS = 256


def _check_lengths(weight: torch.Tensor, n: int, seq_len: int) -> None:
    if weight.dim() < 1 or weight.shape[-1] != 2 * seq_len - 1:
        raise ValueError(
            f"weight must have 2 * seq_len - 1 = {2 * seq_len - 1} entries in its last axis, got shape "
            f"{tuple(weight.shape)}"
        )
    if not 1 <= n <= seq_len:
        raise ValueError(f"n must be in [1, seq_len={seq_len}], got {n}")


def toeplitz_matrix_reference(weight: torch.Tensor, n: int, seq_len: int) -> torch.Tensor:
    """``W[..., i, j] = weight[..., i - j + seq_len - 1]`` for ``i, j < n``: the windows of ``weight.unfold``
    for rows ``seq_len - n .. seq_len - 1``, reversed (a view and one flip; autograd's backward). Under
    ``torch.jit.trace``, ``torch.export`` and ``torch.compile``: the same values by an index gather."""
    _check_lengths(weight, n, seq_len)
    if torch.jit.is_tracing() or _exporting() or torch.compiler.is_compiling():
        # an index gather: a traced graph (TorchScript ONNX) that onnxruntime runs, and a graph whose ``n``
        # torch.export or torch.compile may keep dynamic (unfold's window needs a constant: under
        # torch.compile each sequence length was a recompile, and past dynamo's recompile limit (8) the
        # new lengths ran uncompiled). The same values; inductor lowers both this gather's backward and
        # unfold's to one accumulating index_put (a scatter-add), so compiled code does the same work.
        i = torch.arange(n, device=weight.device)
        return weight[..., i[:, None] - i[None, :] + (seq_len - 1)]
    start = seq_len - n
    return weight.unfold(-1, n, 1)[..., start : start + n, :].flip(-1)


def _exporting() -> bool:
    """Whether ``torch.export`` is tracing (False on a torch without ``torch.compiler.is_exporting``)."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting()) if is_exporting is not None else False


def _diagonal_sums(grad: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``(..., 2 * seq_len - 1)``: entry ``k`` holds the sum of ``grad`` ``(..., n, n)`` over its diagonal
    ``i - j = k - (seq_len - 1)`` (zero for the offsets that ``n < seq_len`` tokens do not reach).

    Row ``i`` of ``grad``, padded by ``n - 1`` zeros on both sides to width ``3n - 2``, is read from column
    ``i`` on (a view with row stride ``width + 1``): column ``c`` of that view holds offset
    ``i - j = n - 1 - c`` in every row, so a sum over rows gives all diagonals at once, in reverse order."""
    n = grad.shape[-1]
    width = 3 * n - 2
    padded = F.pad(grad, (n - 1, n - 1)).reshape(-1, n, width)
    skewed = padded.as_strided((padded.shape[0], n, 2 * n - 1), (n * width, width + 1, 1))
    sums = skewed.sum(1).flip(-1)  # offsets -(n - 1) .. n - 1
    if n < seq_len:
        sums = F.pad(sums, (seq_len - n, seq_len - n))
    return sums.reshape(*grad.shape[:-2], 2 * seq_len - 1)


class _ToeplitzMatrix(torch.autograd.Function):
    """:func:`toeplitz_matrix_reference` forward; :func:`_diagonal_sums` backward (plain differentiable ops,
    so a double backward works)."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, n: int, seq_len: int) -> torch.Tensor:  # type: ignore[override]
        ctx.seq_len = seq_len
        return toeplitz_matrix_reference(weight, n, seq_len)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        return _diagonal_sums(grad, ctx.seq_len), None, None


def toeplitz_matrix(
    weight: torch.Tensor, n: int, seq_len: int, diagonal_sums: bool | None = None
) -> torch.Tensor:
    """The dense Toeplitz token-mixing matrix ``(..., n, n)``, ``W[i, j] = weight[..., i - j + seq_len - 1]``.

    Args:
        weight: ``(2 * seq_len - 1,)`` or ``(heads, 2 * seq_len - 1)``; ``weight[k]`` holds the offset
            ``k - (seq_len - 1)``.
        n: tokens, ``1 <= n <= seq_len``.
        seq_len: the layer's configured length.
        diagonal_sums: True takes the diagonal-sum backward, False autograd's; None (default) takes it from
            :data:`DIAGONAL_SUM_MIN_TOKENS` tokens on, where autograd records and not in ``torch.jit.trace``.

    Equal to :func:`toeplitz_matrix_reference` in value and gradient. From :data:`DIAGONAL_SUM_MIN_TOKENS`
    tokens on, the backward sums the gradient's diagonals in a few small kernels instead of autograd's
    ``unfold_backward``.

    Raises:
        ValueError: ``weight`` does not have ``2 * seq_len - 1`` entries in its last axis, or ``n`` is out of
            range.
    """
    if diagonal_sums is None:  # only where a backward will run; traced graphs keep portable ops
        diagonal_sums = (
            torch.is_grad_enabled()
            and weight.requires_grad
            and not torch.jit.is_tracing()
            and not _exporting()
            and not torch._C._are_functorch_transforms_active()  # grad/vmap/jacrev: need setup_context
            and not forward_ad_active()  # forward AD: the function has no jvp
            # last: under torch.export a test of the symbolic n would split its range at this threshold
            and n >= DIAGONAL_SUM_MIN_TOKENS
        )
    if not diagonal_sums:
        return toeplitz_matrix_reference(weight, n, seq_len)
    _check_lengths(weight, n, seq_len)
    return _ToeplitzMatrix.apply(weight, n, seq_len)


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

    Raises:
        ValueError: ``weight`` is not ``(2 * seq_len - 1,)`` or ``(heads, 2 * seq_len - 1)``, ``z`` is not
            3-D, has more than ``seq_len`` tokens or channels not divisible by ``heads``.
    """
    if not isinstance(z, torch.Tensor) or z.dim() != 3:
        got = f"shape {tuple(z.shape)}" if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"z must have shape (n, batch, channels) (token-major), got {got}")
    if weight.dim() not in (1, 2):
        shape = tuple(weight.shape)
        raise ValueError(f"weight must be (2 * seq_len - 1,) or (heads, 2 * seq_len - 1), got shape {shape}")
    n, batch, channels = z.shape
    if not 1 <= n <= seq_len:
        raise ValueError(f"z must have 1 to seq_len={seq_len} tokens, got {n}")
    _check_lengths(weight, n, seq_len)
    heads = 1 if weight.dim() == 1 else weight.shape[0]
    if channels % heads:
        raise ValueError(f"z's channels ({channels}) must be divisible by weight's heads ({heads})")
    if z.numel() == 0:  # an empty batch (or no channels): FFT libraries refuse empty transforms
        return z * weight.sum().to(z.dtype)  # empty, on the graph of both inputs (zero gradients)
    centre = seq_len - 1
    kernel = weight[..., centre - (n - 1) : centre + n]  # offsets -(n-1) .. n-1
    if causal:
        kernel = torch.cat([torch.zeros_like(kernel[..., : n - 1]), kernel[..., n - 1 :]], dim=-1)
    # compiling: the size for seq_len tokens (also >= 2n - 1), so that a symbolic n is not specialised by
    # the search (one recompile per sequence length); equal for n = seq_len, the same values up to rounding
    size = _fft_size(seq_len if torch.compiler.is_compiling() else n)
    work = torch.promote_types(z.dtype, torch.float32)  # float64 stays float64; half types go up
    # circular layout: offset k >= 0 at index k, offset k < 0 at index size + k
    h = torch.zeros(*kernel.shape[:-1], size, dtype=work, device=z.device)
    h[..., :n] = kernel[..., n - 1 :].to(work)
    if n > 1:
        h[..., size - (n - 1) :] = kernel[..., : n - 1].to(work)
    h_f = torch.fft.rfft(h, dim=-1)  # (..., size // 2 + 1)
    zf = torch.fft.rfft(z.to(work), n=size, dim=0)  # (size // 2 + 1, batch, channels)
    if weight.dim() == 1:
        out = zf * h_f[:, None, None]
    else:  # (heads, ...) weights, a heads axis of 1 too (h_f is then (1, F), not (F,))
        out = (zf.view(-1, batch, heads, channels // heads) * h_f.t()[:, None, :, None]).view(zf.shape)
    return torch.fft.irfft(out, n=size, dim=0)[:n].to(z.dtype)
