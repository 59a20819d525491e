"""Tiny attention of aMLP (Liu et al. 2021, section 4.3): one small head whose output is added to the gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..kernels.cpu_linear import apply_linear, forward_ad_active, is_plain_linear
from ._checks import as_int, check_devices, check_flag, check_input_dtype, check_mask, check_tokens

__all__ = ["TinyAttention"]


class TinyAttention(nn.Module):
    """Single-head attention of size ``attn_dim`` on the block's normalized input.

    ``q, k, v = x @ W_qkv`` (no bias), ``softmax(q k^T / sqrt(attn_dim)) v``, then an output projection
    ``attn_dim -> out_dim`` with bias. Runs through :func:`torch.nn.functional.scaled_dot_product_attention`.

    Masks: a padded key is never attended to; with ``causal=True`` no query attends to a later key. Every
    query may always attend to itself, so a fully padded row never produces NaN.

    Args:
        dim: input channels (``d_model``).
        attn_dim: size of the single head (64 for aMLP-base, 128 for aMLP-large).
        out_dim: output channels (the gate width, ``d_ffn // 2``).
        causal: forbid attention to later tokens.
    """

    def __init__(self, dim: int, attn_dim: int, out_dim: int, *, causal: bool = False) -> None:
        super().__init__()
        sizes: list[int] = []
        for name, value in (("dim", dim), ("attn_dim", attn_dim), ("out_dim", out_dim)):
            size = as_int(value)  # numpy ints are ints, as for the other layers' sizes
            if size is None or size < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
            sizes.append(size)
        dim, attn_dim, out_dim = sizes
        self.dim = dim
        self.attn_dim = attn_dim
        self.causal = check_flag(causal, "causal")
        self.qkv = nn.Linear(dim, 3 * attn_dim, bias=False)
        self.out = nn.Linear(attn_dim, out_dim)

    def extra_repr(self) -> str:
        return f"attn_dim={self.attn_dim}, causal={self.causal}"

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (seq, batch, dim) token-major; ``mask`` (batch, seq), True/1 = real token.

        Raises:
            TypeError: ``x`` is not floating-point, or (outside autocast) its dtype differs from the
                parameters'; ``mask`` is a float tensor.
            ValueError: bad shapes (see :func:`check_tokens`, :func:`check_mask`); ``x`` on another device
                than the parameters (of ``qkv`` or ``out``), ``mask`` on another device than ``x``.
        """
        check_tokens(x, self.dim, None, "x")
        for layer in (self.qkv, self.out):  # (a wrapped one, e.g. offloading hooks, places its own weight)
            weight = getattr(layer, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.device != x.device and is_plain_linear(layer):
                # F.linear without a bias takes CPU x with a meta weight and returns uninitialised memory
                check_devices(x, "x", weight, None, "attention")
        try:
            return self._forward(x, mask)
        except (RuntimeError, TypeError, ValueError) as err:  # (on the error path only: no per-call cost)
            weight = getattr(self.qkv, "weight", None)
            plain = is_plain_linear(self.qkv)  # (a wrapped one may keep its weight elsewhere until called)
            check_devices(x, "x", weight if plain else None, err, "attention", mask=mask)
            check_input_dtype(x, weight, err, plain, owner="attention")
            raise

    def _forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        n, batch, _ = x.shape
        mask = check_mask(mask, batch, n)
        if mask is not None:  # padded keys/values are zeroed too, so not even NaN/inf padding can leak
            x = x.masked_fill(~mask.t().unsqueeze(-1), 0.0)
        qkv = apply_linear(self.qkv, x).transpose(0, 1).unsqueeze(1)
        q, k, v = qkv.chunk(3, dim=-1)  # each (batch, 1, n, attn_dim)
        if forward_ad_active():  # the fused SDPA kernels (CPU flash attention among them) have no forward
            with sdpa_kernel(SDPBackend.MATH):  # derivative and raise under forward AD; the math one has
                out = self._attend(q, k, v, mask, n)
        else:
            out = self._attend(q, k, v, mask, n)
        return apply_linear(self.out, out.squeeze(1).transpose(0, 1))

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, n: int
    ) -> torch.Tensor:
        """Softmax attention of ``q`` over ``k``/``v`` ``(batch, 1, n, attn_dim)``: padded keys (``mask``
        ``(batch, n)``) never attended to, no later key when causal, every query attends to itself."""
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        keep = mask[:, None, None, :]
        i = torch.arange(n, device=q.device)
        eye = i[:, None] == i[None, :]  # (not a bool torch.eye: onnxruntime has no bool EyeLike)
        if self.causal:
            keep = keep & torch.ones(n, n, dtype=torch.bool, device=q.device).tril_()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep | eye)
