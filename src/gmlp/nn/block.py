"""The gMLP block: pre-LayerNorm residual around channel projection, spatial gating and output projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.cpu_linear import apply_linear, fused_linear, is_plain_linear
from ..kernels.norm_triton import layer_norm
from ..kernels.sgu_triton import (
    compiled_kernels_enabled,
    fold_fc1_bias_enabled,
    fuse_residual_grad_enabled,
    fused_gating_enabled,
    gelu_split_layernorm,
    spatial_gating,
    triton_enabled,
)
from ._checks import (
    NotScriptable,
    as_int,
    check_devices,
    check_input_dtype,
    check_int,
    check_mask,
    check_number,
    check_parameter_devices,
    check_tokens,
)
from ._inplace import may_update_in_place, plain_call
from .attention import TinyAttention
from .sgu import SpatialGatingUnit, TokenProjection

__all__ = ["DropPath", "GMLPBlock", "drop_path"]


def drop_path(x: torch.Tensor, p: float, training: bool, batch_dim: int = 1) -> torch.Tensor:
    """Per-sample stochastic depth: zero a residual branch for a random subset of samples, rescale the rest.

    ``batch_dim`` is 1 for the token-major layout used in :mod:`gmlp.nn`. ``p`` is the drop probability
    (1 - survival probability) in ``[0, 1]``; ``p = 1`` drops the branch of every sample (zeros, as timm's
    ``drop_path``).

    Raises:
        ValueError: ``p`` is not a number in ``[0, 1]`` (checked only when the branch can be dropped, in
            training), or ``batch_dim`` is not an axis of ``x``.
        TypeError: ``training`` is not a bool (a string such as ``"no"`` would be truthy).
    """
    if not isinstance(training, bool):
        raise TypeError(f"training must be True or False, got {training!r}")
    if p == 0.0 or not training:
        return x
    try:  # also NaN; torch's own error would name bernoulli_'s argument 1 - p
        ok = not isinstance(p, bool) and 0.0 <= p <= 1.0
    except TypeError:  # a str, None, ...
        ok = False
    if not ok:
        raise ValueError(f"drop path probability p must be a number in [0, 1], got {p!r}")
    if p == 1.0:  # no survivor: dividing by the survival probability 0 would give NaN
        return x * 0.0
    if as_int(batch_dim) is None or not -x.dim() <= batch_dim < x.dim():
        raise ValueError(f"batch_dim must be an axis of x (shape {tuple(x.shape)}), got {batch_dim!r}")
    shape = [1] * x.dim()
    shape[batch_dim] = x.shape[batch_dim]
    keep = x.new_empty(shape).bernoulli_(1.0 - p)
    return x * keep.div_(1.0 - p)


class DropPath(nn.Module):
    """Module form of :func:`drop_path` (survival probability ``1 - p``)."""

    def __init__(self, p: float = 0.0, batch_dim: int = 1) -> None:
        super().__init__()
        self.p = check_number(p, "drop path probability p", high=1.0)
        batch_dim_int = as_int(batch_dim)
        if batch_dim_int is None:  # else only a training forward would fail, with a list-index error
            raise TypeError(f"batch_dim must be an int (the batch axis of the input), got {batch_dim!r}")
        self.batch_dim = batch_dim_int

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training, self.batch_dim)


class GMLPBlock(NotScriptable, nn.Module):
    """One gMLP (or aMLP) block, token-major ``(seq, batch, dim)``.

    ``x + drop_path(dropout(fc2(s(GELU(fc1(norm(x)))))))`` with ``s`` the :class:`SpatialGatingUnit`;
    with ``attn_dim`` set (aMLP) a :class:`TinyAttention` on ``norm(x)`` is added to the gate.

    Args:
        dim: model width ``d_model``.
        dim_ffn: hidden width ``d_ffn`` (must be even for the SGU).
        seq_len: the largest number of tokens.
        variant: gating function, see :data:`gmlp.nn.VARIANTS`.
        toeplitz, causal, heads, init_std, fft_threshold: see :class:`gmlp.nn.TokenProjection`.
        attn_dim: size of the tiny attention head (None = gMLP).
        drop_path: stochastic depth probability of this block (per sample).
        dropout: dropout on the block output before the residual sum.
        norm_eps: epsilon of the block's pre-LayerNorm (1e-6, as timm).
        sgu_norm_eps: epsilon of the gate LayerNorm (1e-5, as timm and g-mlp-pytorch).
        token_mlp_dim: hidden size of the ``variant="mixer"`` token MLP (None = ``seq_len``), see
            :class:`gmlp.nn.SpatialGatingUnit`.
    """

    def __init__(
        self,
        dim: int,
        dim_ffn: int,
        seq_len: int,
        *,
        variant: str = "sgu",
        toeplitz: bool = False,
        causal: bool = False,
        heads: int = 1,
        attn_dim: int | None = None,
        drop_path: float = 0.0,
        dropout: float = 0.0,
        norm_eps: float = 1e-6,
        sgu_norm_eps: float = 1e-5,
        init_std: float = 1e-6,
        fft_threshold: int | None = None,
        token_mlp_dim: int | None = None,
    ) -> None:
        super().__init__()
        dim = check_int(dim, "dim")
        dim_ffn = check_int(dim_ffn, "dim_ffn")
        check_number(norm_eps, "norm_eps", low_open=True)
        check_number(sgu_norm_eps, "sgu_norm_eps", low_open=True)  # the SGU's own error says "norm_eps"
        check_number(dropout, "dropout", high=1.0)
        self.dim = dim
        self.seq_len = check_int(seq_len, "seq_len")  # a Python int, also for numpy's
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.fc1 = nn.Linear(dim, dim_ffn)
        self.sgu = SpatialGatingUnit(
            dim_ffn,
            seq_len,
            variant=variant,
            toeplitz=toeplitz,
            causal=causal,
            heads=heads,
            norm_eps=sgu_norm_eps,
            init_std=init_std,
            fft_threshold=fft_threshold,
            token_mlp_dim=token_mlp_dim,
        )
        if attn_dim is not None and variant in ("none", "mixer"):
            raise ValueError(
                f"attn_dim (tiny attention) needs a gate; it cannot be used with variant={variant!r}"
            )
        self.tiny_attn = (
            TinyAttention(dim, attn_dim, self.sgu.gate_dim, causal=causal) if attn_dim is not None else None
        )
        self.fc2 = nn.Linear(self.sgu.out_features, dim)
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (seq, batch, dim); ``mask`` optional (batch, seq), True/1 = real token."""
        check_tokens(x, self.dim, self.seq_len, "x")
        try:
            return self._forward(x, mask)
        except (RuntimeError, TypeError, ValueError) as err:  # (on the error path only: no per-call cost)
            fc1_weight = getattr(self.fc1, "weight", None)
            # (a wrapped fc1, e.g. with offloading hooks, may keep its weight elsewhere until called)
            check_devices(x, "x", fc1_weight if is_plain_linear(self.fc1) else None, err, "block", mask=mask)
            check_parameter_devices(x, "x", self, err, "block")  # e.g. one left on meta by a checkpoint
            self._check_dtype(x, fc1_weight, err)
            raise

    def _forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        mask = check_mask(mask, x.shape[1], x.shape[0])
        fused = triton_enabled(x) and fused_gating_enabled(x.shape[0] * x.shape[1] * self.fc1.out_features)
        h, x = self._pre_norm(x, fused and plain_call(self.norm, nn.LayerNorm))
        gate_bias = self.tiny_attn(h, mask) if self.tiny_attn is not None else None
        if self.sgu.variant == "sgu" and plain_call(self.sgu, SpatialGatingUnit):
            z = self._spatial_gating(h, mask, gate_bias, fused or compiled_kernels_enabled(x))
        else:  # other variants, or an SGU that a hook, a subclass or a patched forward must see called
            z = self.sgu(apply_linear(self.fc1, h, "gelu"), mask, gate_bias)
        return self._residual(x, z)

    def _check_dtype(self, x: torch.Tensor, fc1_weight: object, err: Exception) -> None:
        """A TypeError naming ``x`` (from ``err``, torch's error, which names neither) where its dtype differs
        from ``fc1``'s outside autocast, for which ``fc1`` refused ``norm(x)``. Only for a plain LayerNorm and
        ``fc1`` (their output and input dtypes are then known): a wrapped one decides."""
        plain = plain_call(self.norm, nn.LayerNorm) and is_plain_linear(self.fc1)
        check_input_dtype(x, fc1_weight, err, plain, owner="block")

    def _residual(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``x + drop_path(dropout(fc2(z)))``. In inference, where dropout and drop path are identities,
        with a plain ``fc2`` and no hooks on the three, ``fc2``'s fresh output takes ``x`` in place. A
        dropout or drop path replaced by another module (``nn.Identity``, a subclass) is always called."""
        dropout, drop = self.dropout, self.drop_path
        branch = apply_linear(self.fc2, z)
        plain = (
            plain_call(dropout, nn.Dropout) and plain_call(drop, DropPath)
            and (dropout.p == 0 or not dropout.training) and (drop.p == 0 or not drop.training)
            and is_plain_linear(self.fc2)
        )  # fmt: skip
        if plain and may_update_in_place(branch, x):
            return branch.add_(x)
        return x + drop(dropout(branch))

    def _pre_norm(self, x: torch.Tensor, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``norm(x)`` and the ``x`` to add the branch to.

        With ``fused`` (CUDA, Triton, the fused gating taken: see :meth:`forward`) one kernel each way that
        writes the output in the autocast dtype directly (no float32 output and cast) and reduces the
        weight/bias gradients inside the backward kernel (:func:`gmlp.kernels.layer_norm`); with
        :func:`gmlp.kernels.sgu_triton.fuse_residual_grad_enabled` as well, the ``x`` returned is the one
        that function hands back, so that its backward kernel also adds the residual's gradient."""
        if fused:
            device = x.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
            norm, fuse = self.norm, fuse_residual_grad_enabled()
            out = layer_norm(x, norm.weight, norm.bias, norm.eps, dtype, True, return_residual=fuse)
            return out if isinstance(out, tuple) else (out, x)
        return self.norm(x), x

    def _spatial_gating(
        self, h: torch.Tensor, mask: torch.Tensor | None, gate_bias: torch.Tensor | None, fused: bool = False
    ) -> torch.Tensor:
        """The split SGU from the normalised block input ``h`` on.

        With ``fused`` (CUDA, Triton, an ``fc1`` output of at least
        :func:`gmlp.kernels.sgu_triton.fused_gating_min_elements` elements; under torch.compile, see
        :func:`gmlp.kernels.sgu_triton.compiled_kernels_enabled`), one head and dense-GEMM token
        mixing: ``fc1`` and :func:`gmlp.kernels.spatial_gating`, the whole gating in two fused kernels around
        one aligned GEMM per direction. Otherwise :meth:`_split_gelu_norm` and the gating of
        :meth:`SpatialGatingUnit.forward_normalized`.
        """
        sgu, n = self.sgu, h.shape[0]
        proj = sgu.proj
        if (
            fused and proj.heads == 1 and not proj.uses_fft(n)
            and plain_call(proj, TokenProjection) and plain_call(sgu.norm, nn.LayerNorm)  # else: called
        ):  # fmt: skip
            norm = sgu.norm
            u, u_bias = self._fc1_for_kernels(h)
            return spatial_gating(
                u, norm.weight, norm.bias, norm.eps, proj.matrix(n), proj.bias[:n], mask, gate_bias,
                use_triton=True, u_bias=u_bias,
            )  # fmt: skip
        return sgu.forward_normalized(*self._split_gelu_norm(h), mask, gate_bias)

    def _fc1_for_kernels(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``fc1(h)`` and None for the Triton kernels; with :func:`fold_fc1_bias_enabled` (and a plain
        ``nn.Linear`` with a bias) ``h @ fc1.weight.T`` and the bias, which the kernels add on load and
        whose gradient they reduce themselves."""
        fc1 = self.fc1
        if fold_fc1_bias_enabled() and fc1.bias is not None and is_plain_linear(fc1):
            return F.linear(h, fc1.weight), fc1.bias
        return fc1(h), None

    def _split_gelu_norm(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z1, LayerNorm(z2)`` with ``z1, z2 = GELU(fc1(h)).chunk(2, -1)``.

        On CUDA with Triton: one ``fc1`` GEMM and the fused GELU+split+LayerNorm kernel. Elsewhere ``fc1``
        runs as two GEMMs on the two halves of its weight, so ``z1`` and ``z2`` come out contiguous: the
        LayerNorm, the gating product and their backward then need no layout copies and no ``cat``
        (``fc1`` keeps one ``(d_ffn, dim)`` weight, so checkpoints are unchanged).
        """
        norm = self.sgu.norm
        if triton_enabled(h) and plain_call(norm, nn.LayerNorm):  # else a hook or subclass sees norm called
            u, u_bias = self._fc1_for_kernels(h)
            return gelu_split_layernorm(u, norm.weight, norm.bias, norm.eps, use_triton=True, u_bias=u_bias)
        c = self.sgu.gate_dim
        if not is_plain_linear(self.fc1):  # a wrapped fc1 (hooks, LoRA, ...) must run as a whole
            z1, z2 = F.gelu(self.fc1(h)).chunk(2, dim=-1)
            return z1, norm(z2)
        w, b = self.fc1.weight, self.fc1.bias
        z1 = fused_linear(h, w[:c], None if b is None else b[:c], "gelu")
        return z1, norm(fused_linear(h, w[c:], None if b is None else b[c:], "gelu"))
