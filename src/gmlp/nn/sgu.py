"""Spatial gating: the token-mixing core of gMLP (Liu et al. 2021, section 2).

Layout: every layer in :mod:`gmlp.nn` works on **token-major** activations ``(seq_len, batch, channels)``
(the layout of ``torch.nn.MultiheadAttention`` with ``batch_first=False``). In this layout the token-axis
projection ``g = W z + b`` of a whole batch is ONE matrix product ``W @ z.view(n, batch * channels)`` with
no transposes or copies of the activations; channel projections (``fc1``/``fc2``) and LayerNorm work on
the last axis unchanged.

Padding masks are ``(batch, seq_len)`` bool/int tensors with ``True``/1 for real tokens (the Hugging Face
``attention_mask`` convention). Padded positions are zeroed (with ``masked_fill``, so even NaN/inf in the
padding cannot leak into a real token's output) before the token mixing, so they influence no real token.
(In training, NaN/inf in padded inputs still make the gradients NaN, since the backward products multiply
them by zero, as in any PyTorch or Hugging Face model: padding should hold finite values.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.cpu_linear import token_mix
from ..kernels.toeplitz import toeplitz_matrix, toeplitz_mix_fft
from ._checks import (
    NotScriptable,
    as_int,
    autocast_enabled,
    check_devices,
    check_flag,
    check_int,
    check_mask,
    check_number,
    check_parameter_devices,
    check_tokens,
)
from ._inplace import may_update_in_place, plain_call

__all__ = ["VARIANTS", "TokenLinear", "TokenProjection", "SpatialGatingUnit"]

#: Variants of the gating function s(Z) from the paper's ablation (Table 3), with f(Z) = W LayerNorm(Z) + b.
VARIANTS: dict[str, str] = {
    "none": "s(Z) = Z (plain FFN, no token mixing)",
    "linear": "s(Z) = f(Z)",
    "additive": "s(Z) = Z + f(Z)",
    "multiplicative": "s(Z) = Z * f(Z)",
    "sgu": "s(Z) = Z1 * f(Z2), Z split in halves along channels (spatial gating unit)",
    "mixer": "s(Z) = W2 GELU(W1 LayerNorm(Z) + b1) + b2 (MLP-Mixer's 2-layer token MLP, no gating)",
}


class TokenProjection(nn.Module):
    """Token-axis linear projection ``g[i] = sum_j W[i, j] z[j] + b[i]`` shared by all channels.

    Args:
        seq_len: the largest number of tokens ``n``. Shorter inputs of length ``m`` use the leading
            ``m x m`` block of W and ``b[:m]``.
        toeplitz: constrain W to be Toeplitz, ``W[i, j] = w[i - j]``, stored as ``2n - 1`` parameters
            (``weight[k]`` holds the offset ``i - j = k - (n - 1)``).
        causal: zero every ``W[i, j]`` with ``j > i``: output ``i`` depends on no later token (exactly).
        heads: number of channel groups, each with its own W and b (the channels are split into ``heads``
            contiguous groups).
        init_std: W is initialised from N(0, init_std) (near zero, as the paper requires for stability;
            the default 1e-6 is timm's choice), b to ones, so the gate starts as the identity gate.
        fft_threshold: for Toeplitz W, mix by FFT (:func:`gmlp.kernels.toeplitz_mix_fft`, O(n log n))
            when the input has at least this many tokens; None = always the dense GEMM. Equal results up
            to float rounding; ``benchmarks/toeplitz_crossover.py`` measures where it pays. Causal layers
            always take the dense path: FFT rounding would leave ~1e-7 dependence on later tokens, and
            causality here is exact.

    Parameter shapes (``heads == 1``): ``weight`` (n, n) or (2n-1,) for Toeplitz, ``bias`` (n,);
    with ``heads > 1`` a leading ``heads`` axis is added to both.
    """

    def __init__(
        self,
        seq_len: int,
        *,
        toeplitz: bool = False,
        causal: bool = False,
        heads: int = 1,
        init_std: float = 1e-6,
        fft_threshold: int | None = None,
    ) -> None:
        super().__init__()
        self.seq_len = check_int(seq_len, "seq_len")
        self.toeplitz = check_flag(toeplitz, "toeplitz")
        self.causal = check_flag(causal, "causal")
        self.heads = check_int(heads, "heads")
        self.init_std = check_number(init_std, "init_std")
        if fft_threshold is not None and not toeplitz:
            raise ValueError("fft_threshold needs toeplitz=True (the FFT path computes Toeplitz mixing only)")
        if fft_threshold is not None:
            fft_threshold = check_int(fft_threshold, "fft_threshold")
        self.fft_threshold = fft_threshold
        w_shape: tuple[int, ...] = (2 * seq_len - 1,) if toeplitz else (seq_len, seq_len)
        b_shape: tuple[int, ...] = (seq_len,)
        if heads > 1:
            w_shape, b_shape = (heads, *w_shape), (heads, *b_shape)
        self.weight = nn.Parameter(torch.empty(w_shape))
        self.bias = nn.Parameter(torch.empty(b_shape))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W ~ N(0, init_std), b = 1 (the paper's near-identity gate)."""
        nn.init.normal_(self.weight, std=self.init_std)
        nn.init.ones_(self.bias)

    def extra_repr(self) -> str:
        return f"seq_len={self.seq_len}, toeplitz={self.toeplitz}, causal={self.causal}, heads={self.heads}"

    def matrix(self, n: int | None = None) -> torch.Tensor:
        """The dense token-mixing matrix for ``n`` tokens: ``(n, n)``, or ``(heads, n, n)``.

        Toeplitz weights are expanded, and the causal mask applied, so this is exactly the W the layer uses.

        Raises:
            ValueError: ``n`` is not an int (numpy's taken; not a bool or a float) in ``[1, seq_len]``.
        """
        if n is None:
            n = self.seq_len
        elif isinstance(n, bool) or not isinstance(n, (int, torch.SymInt)):  # the forward passes (Sym)ints
            index = as_int(n)
            if index is None:
                raise ValueError(f"n must be an int in [1, seq_len={self.seq_len}], got {n!r}")
            n = index
        if not 1 <= n <= self.seq_len:
            raise ValueError(f"n must be in [1, seq_len={self.seq_len}], got {n}")
        device = self.weight.device
        # Toeplitz: W[i, j] = weight[i - j + L - 1] (its backward sums the gradient's diagonals)
        w = toeplitz_matrix(self.weight, n, self.seq_len) if self.toeplitz else self.weight[..., :n, :n]
        if self.causal:
            keep = torch.ones(n, n, dtype=torch.bool, device=device).tril_()
            w = torch.where(keep, w, w.new_zeros(()))
        return w

    def uses_fft(self, n: int) -> bool:
        """Whether an input of ``n`` tokens is mixed by FFT (Toeplitz, not causal, ``n >= fft_threshold``, not
        in ``torch.jit.trace``: the FFT path's slice assignments fail under the tracer, whose sizes are
        tensors, and traced graphs (TorchScript, ONNX) keep the portable dense product)."""
        return (
            self.fft_threshold is not None and not self.causal and n >= self.fft_threshold
            and not torch.jit.is_tracing()
        )  # fmt: skip

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mix tokens of ``z`` (seq, batch, channels); ``mask`` (batch, seq), True/1 = real token.

        Raises:
            ValueError: ``z`` is not 3-D, is longer than ``seq_len`` or has a channel count not divisible
                by ``heads``, or is on another device than the parameters; ``mask`` has the wrong shape or
                dtype (see :func:`check_mask`) or is on another device than ``z``.
        """
        if not isinstance(z, torch.Tensor) or z.dim() != 3:
            got = f"shape {tuple(z.shape)}" if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z must have shape (seq_len, batch, channels) (token-major), got {got}")
        check_tokens(z, z.shape[-1], self.seq_len, "z")
        if self.heads > 1 and z.shape[-1] % self.heads:
            raise ValueError(f"z's channels ({z.shape[-1]}) must be divisible by heads ({self.heads})")
        if z.device != self.weight.device:  # (torch's addmm takes a meta z with CPU W: garbage, no error)
            check_devices(z, "z", self.weight, None, "module")
        mask = check_mask(mask, z.shape[1], z.shape[0])
        try:
            return self.mix(z, mask)
        except (RuntimeError, ValueError) as err:  # (on the error path only: no per-call cost)
            check_devices(z, "z", self.weight, err, "module", mask=mask)
            check_parameter_devices(z, "z", self, err, "module")  # the bias
            raise

    def mix(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward` without its input checks, for callers that have validated ``z`` and made
        ``mask`` a ``(batch, seq)`` bool tensor (the spatial gating unit)."""
        n, batch, channels = z.shape
        if mask is not None:
            z = z.masked_fill(~mask.t().unsqueeze(-1), 0.0)
        b = self.bias[..., :n].to(z.dtype)
        if self.uses_fft(n):
            out = toeplitz_mix_fft(self.weight, z, self.seq_len, self.causal)
            if self.heads == 1:
                return out + b[:, None, None]
            out = out.view(n, batch, self.heads, channels // self.heads)  # explicit: batch may be 0
            return (out + b.t()[:, None, :, None]).view(n, batch, channels)
        w = self.matrix(n).to(z.dtype)
        if self.heads == 1:
            out = token_mix(w, z.reshape(n, batch * channels), b)  # oneDNN on the CPU, else addmm
            return out.view(n, batch, channels)
        if w.is_meta and not z.is_meta:  # (einsum takes them and returns uninitialised memory, no error)
            raise ValueError(f"the weight is on meta but z is on {z.device}: it holds no values")
        zh = z.reshape(n, batch, self.heads, channels // self.heads)
        out = torch.einsum("hij,jbhc->ibhc", w, zh) + b.t()[:, None, :, None]
        return out.reshape(n, batch, channels)


class TokenLinear(nn.Module):
    """One layer of the ``"mixer"`` variant's token MLP: ``out[i] = sum_j weight[i, j] z[j] + bias[i]`` along
    the token axis (the first), shared by all channels, ``in_features -> out_features`` rows.

    Unlike :class:`TokenProjection` W need not be square: ``mix1`` maps the ``n`` tokens to ``d_tok``
    hidden rows, ``mix2`` maps them back. An input of ``m`` rows uses ``weight[:, :m]``; ``out`` (the number
    of output rows, default all) uses ``weight[:out]`` and ``bias[:out]``, so a shorter sequence uses the
    leading block of each, as the other variants' W.

    Args:
        in_features: input rows (``seq_len`` for ``mix1``, ``d_tok`` for ``mix2``).
        out_features: output rows.
        init_std: W is initialised from N(0, init_std).
        bias_init: the constant b is initialised to.

    Parameter shapes: ``weight`` (out_features, in_features), ``bias`` (out_features,).
    """

    def __init__(
        self, in_features: int, out_features: int, *, init_std: float, bias_init: float = 0.0
    ) -> None:
        super().__init__()
        self.in_features = check_int(in_features, "in_features")
        self.out_features = check_int(out_features, "out_features")
        self.init_std = check_number(init_std, "init_std")
        self.bias_init = check_number(bias_init, "bias_init", low=-float("inf"), low_open=True)
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features))
        self.bias = nn.Parameter(torch.empty(self.out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W ~ N(0, init_std), b = bias_init."""
        nn.init.normal_(self.weight, std=self.init_std)
        nn.init.constant_(self.bias, self.bias_init)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    def forward(self, z: torch.Tensor, out: int | None = None) -> torch.Tensor:
        """``W[:out, :m] @ z + b[:out]`` for ``z`` of shape ``(m, *rest)``, ``m <= in_features``; returns
        ``(out, *rest)`` (``out`` defaults to ``out_features``). Weights are cast to ``z``'s dtype.

        Raises:
            ValueError: ``z`` is not a tensor with at least one dimension and at most ``in_features`` rows,
                is on another device than the parameters, or ``out`` is not an int (numpy's taken; not a bool
                or a float) in ``[1, out_features]``.
            TypeError: ``z`` is not floating-point (the weights cast to an integer dtype would be zeros).
        """
        if not isinstance(z, torch.Tensor) or z.dim() < 1 or not 1 <= z.shape[0] <= self.in_features:
            got = f"shape {tuple(z.shape)}" if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(
                f"z must have 1 to in_features={self.in_features} rows (tokens first), got {got}"
            )
        if not z.is_floating_point():
            raise TypeError(f"z must be a floating-point tensor, got dtype {z.dtype}")
        if z.device != self.weight.device:  # (torch's addmm takes a meta z with CPU W: garbage, no error)
            check_devices(z, "z", self.weight, None, "module")
        rows = self.out_features if out is None else out
        if isinstance(rows, bool) or not isinstance(rows, (int, torch.SymInt)):  # the SGU passes (Sym)ints
            rows = as_int(out)
            if rows is None:
                raise ValueError(f"out must be an int in [1, out_features={self.out_features}], got {out!r}")
        if not 1 <= rows <= self.out_features:
            raise ValueError(f"out must be in [1, out_features={self.out_features}], got {out!r}")
        m, rest = z.shape[0], z.shape[1:]
        w = self.weight[:rows, :m].to(z.dtype)
        b = self.bias[:rows].to(z.dtype)
        return torch.addmm(b[:, None], w, z.reshape(m, -1)).view(rows, *rest)


class SpatialGatingUnit(NotScriptable, nn.Module):
    """The spatial gating unit s(Z) and the paper's ablation variants of it.

    For ``variant="sgu"`` (the paper's choice): ``Z1, Z2 = split(Z)`` (first half = multiplicative bypass,
    second half = gate input), ``s(Z) = Z1 * (W LayerNorm(Z2) + b)``, output width ``dim // 2``.
    The other variants (``linear``, ``additive``, ``multiplicative``, ``none``, ``mixer``) keep the width
    ``dim``; see :data:`VARIANTS`.

    ``variant="mixer"`` (Table 3's "MLP-Mixer (2-layer spatial MLP)" row) replaces the single projection
    f by MLP-Mixer's token-mixing MLP, applied to every channel:
    ``s(Z) = W2 GELU(W1 LayerNorm(Z) + b1) + b2`` with ``W1`` (d_tok, n) = ``mix1.weight``, ``b1`` =
    ``mix1.bias``, ``W2`` (n, d_tok) = ``mix2.weight``, ``b2`` = ``mix2.bias`` (see :class:`TokenLinear`);
    no gating and no residual inside s (the block's residual around ``fc2`` is the skip, as for
    ``"linear"``). An input of ``m < n`` tokens uses ``W1[:, :m]``, ``W2[:m]`` and ``b2[:m]``; padded tokens
    are zeroed after the LayerNorm, before W1, so real outputs equal those of the unpadded sequence.
    Init: ``W1 ~ N(0, 1/sqrt(n))`` (unit-variance hidden pre-activations for a full sequence), ``b1 = 0``,
    ``W2 ~ N(0, init_std)`` (near zero, as the SGU's W) and ``b2 = 1``, so ``s(Z)`` starts at ~1 as the
    ``"linear"`` variant's f does (W1 is not near zero: with both layers near zero no weight would get a
    gradient). It mixes every token with every other, so it refuses ``causal=True``; ``toeplitz``,
    ``heads > 1``, ``fft_threshold`` and a ``gate_bias`` (tiny attention) are refused too.

    Args:
        dim: input channels (``d_ffn``); must be even for ``"sgu"``.
        seq_len: the largest number of tokens.
        variant: one of :data:`VARIANTS`.
        toeplitz, causal, heads, init_std, fft_threshold: see :class:`TokenProjection` (``init_std`` is W2's
            for ``"mixer"``).
        norm_eps: epsilon of the gate LayerNorm (1e-5, torch's default, as in timm and g-mlp-pytorch).
        token_mlp_dim: ``d_tok``, the hidden size of the ``"mixer"`` token MLP (None = ``seq_len``, i.e.
            expansion 1; MLP-Mixer's own models use 0.5 to 4 times the token count). Only for ``"mixer"``.

    Attributes:
        out_features: width of the output (``dim // 2`` for ``"sgu"``, else ``dim``).
        gate_dim: width of the gate ``f(.)`` (what a tiny attention adds to).
    """

    def __init__(
        self,
        dim: int,
        seq_len: int,
        *,
        variant: str = "sgu",
        toeplitz: bool = False,
        causal: bool = False,
        heads: int = 1,
        norm_eps: float = 1e-5,
        init_std: float = 1e-6,
        fft_threshold: int | None = None,
        token_mlp_dim: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(variant, str) or variant not in VARIANTS:  # a list: not "unhashable type"
            raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
        dim = check_int(dim, "dim")
        if variant == "sgu" and dim % 2:
            raise ValueError(f"dim (d_ffn) must be even for the split SGU, got {dim}")
        self.dim = dim
        self.seq_len = check_int(seq_len, "seq_len")
        check_number(norm_eps, "norm_eps", low_open=True)
        self.variant = variant
        self.gate_dim = dim // 2 if variant == "sgu" else dim
        self.out_features = self.gate_dim
        self.mix1: TokenLinear | None = None
        self.mix2: TokenLinear | None = None
        if variant == "mixer":
            self._build_mixer(toeplitz, causal, heads, norm_eps, init_std, fft_threshold, token_mlp_dim)
            return
        if token_mlp_dim is not None:
            raise ValueError(
                f"token_mlp_dim is the hidden size of variant 'mixer' only, got "
                f"token_mlp_dim={token_mlp_dim!r} with variant={variant!r}"
            )
        heads_int = as_int(heads)  # numpy ints are ints, as for the other sizes
        if heads_int is None or heads_int < 1 or self.gate_dim % heads_int:
            raise ValueError(
                f"heads ({heads}) must be a positive divisor of the gate width ({self.gate_dim})"
            )
        heads = heads_int
        if variant == "none":
            # no projection to build, but its arguments are still checked (not dropped unseen); the
            # settings of the token projection would be silently ignored, so they are refused
            if check_flag(toeplitz, "toeplitz") or heads != 1 or fft_threshold is not None:
                raise ValueError(
                    f"variant 'none' has no token projection: toeplitz, heads and fft_threshold do not apply "
                    f"(expected False, 1 and None), got toeplitz={toeplitz!r}, heads={heads!r}, "
                    f"fft_threshold={fft_threshold!r}"
                )
            check_flag(causal, "causal")
            check_number(init_std, "init_std")
            self.norm = None
            self.proj = None
        else:
            self.norm = nn.LayerNorm(self.gate_dim, eps=norm_eps)
            self.proj = TokenProjection(
                seq_len, toeplitz=toeplitz, causal=causal, heads=heads, init_std=init_std,
                fft_threshold=fft_threshold,
            )

    def _build_mixer(
        self, toeplitz: object, causal: object, heads: object, norm_eps: float, init_std: float,
        fft_threshold: object, token_mlp_dim: object,
    ) -> None:
        """The LayerNorm and the two :class:`TokenLinear` layers of ``variant="mixer"``, after refusing the
        options that do not apply to it."""
        if check_flag(causal, "causal"):
            raise ValueError(
                "variant 'mixer' cannot be causal: its 2-layer token MLP mixes every token with every other; "
                "use causal=False, or a single-projection variant (linear, additive, multiplicative, sgu) "
                "for a causal model"
            )
        if check_flag(toeplitz, "toeplitz"):
            raise ValueError("toeplitz=True constrains the single token projection W; variant 'mixer' has "
                             "two full token layers (W1, W2): use toeplitz=False")
        if as_int(heads) != 1:
            raise ValueError(f"heads must be 1 for variant 'mixer' (one token MLP shared by all channels), "
                             f"got {heads!r}")
        if fft_threshold is not None:
            raise ValueError(f"fft_threshold applies to Toeplitz projections only, not to variant 'mixer', "
                             f"got {fft_threshold!r}")
        hidden = self.seq_len if token_mlp_dim is None else check_int(token_mlp_dim, "token_mlp_dim")
        init_std = check_number(init_std, "init_std")
        self.norm = nn.LayerNorm(self.dim, eps=norm_eps)
        self.proj = None
        self.mix1 = TokenLinear(self.seq_len, hidden, init_std=self.seq_len**-0.5, bias_init=0.0)
        self.mix2 = TokenLinear(hidden, self.seq_len, init_std=init_std, bias_init=1.0)

    def extra_repr(self) -> str:
        extra = f", token_mlp_dim={self.mix1.out_features}" if self.mix1 is not None else ""
        return f"dim={self.dim}, variant={self.variant!r}{extra}"

    def forward(
        self,
        z: torch.Tensor,
        mask: torch.Tensor | None = None,
        gate_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Apply s(.) to ``z`` (seq, batch, dim).

        Args:
            z: token-major activations.
            mask: optional ``(batch, seq)`` padding mask, True/1 = real token.
            gate_bias: optional tensor added to the gate after the token projection (the tiny-attention
                output of aMLP), shape ``(seq, batch, gate_dim)``.
        """
        check_tokens(z, self.dim, self.seq_len, "z")
        try:
            return self._forward(z, mask, gate_bias)
        except (RuntimeError, TypeError, ValueError) as err:  # (on the error path only: no per-call cost)
            norm_weight = getattr(self.norm, "weight", None)
            # (variant "none" has no norm; a wrapped one may keep its weight elsewhere until called)
            plain = self.norm is not None and plain_call(self.norm, nn.LayerNorm)
            param = norm_weight if plain else None
            check_devices(z, "z", param, err, "module", mask=mask, gate_bias=gate_bias)
            check_parameter_devices(z, "z", self, err, "module")  # e.g. one left on meta by a checkpoint
            if isinstance(norm_weight, torch.Tensor) and z.dtype != norm_weight.dtype:
                self._check_dtype(z, norm_weight.dtype, err)
            raise

    def _forward(
        self, z: torch.Tensor, mask: torch.Tensor | None, gate_bias: torch.Tensor | None
    ) -> torch.Tensor:
        mask = check_mask(mask, z.shape[1], z.shape[0])
        if self.variant == "none":
            if gate_bias is not None:
                raise ValueError("variant 'none' has no gate: gate_bias (tiny attention) is not supported")
            return z
        if self.variant == "mixer":
            if gate_bias is not None:
                raise ValueError("variant 'mixer' has no gate: gate_bias (tiny attention) is not supported")
            return self._token_mlp(z, mask)
        if gate_bias is not None:
            expected = (z.shape[0], z.shape[1], self.gate_dim)
            if not isinstance(gate_bias, torch.Tensor) or tuple(gate_bias.shape) != expected:
                is_tensor = isinstance(gate_bias, torch.Tensor)
                got = tuple(gate_bias.shape) if is_tensor else type(gate_bias).__name__
                raise ValueError(f"gate_bias must have shape (seq, batch, gate_dim) = {expected}, got {got}")
            if gate_bias.dtype != z.dtype and not autocast_enabled(z):  # (meta: no autocast query)
                raise ValueError(f"gate_bias must have z's dtype {z.dtype}, got {gate_bias.dtype}")
        z1, z2 = z.chunk(2, dim=-1) if self.variant == "sgu" else (z, z)  # chunk: backward is one cat
        return self.forward_normalized(z1, self.norm(z2), mask, gate_bias)

    def _token_mlp(self, z: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``W2 GELU(W1 LayerNorm(z) + b1) + b2`` over the token axis (``variant="mixer"``), with padded
        tokens zeroed before W1."""
        zn = self.norm(z)
        if mask is not None:
            zn = zn.masked_fill(~mask.t().unsqueeze(-1), 0.0)
        hidden = F.gelu(self.mix1(zn))
        return self.mix2(hidden, zn.shape[0])

    def _check_dtype(self, z: torch.Tensor, dtype: torch.dtype, err: Exception) -> None:
        """A TypeError naming ``z`` (from ``err``, torch's error, which names neither) where its dtype differs
        from the gate LayerNorm's ``dtype`` and the LayerNorm refused the pair: outside autocast, unless ``z``
        is float16/bfloat16 and the LayerNorm float32, which LayerNorm takes (a norm kept in float32)."""
        if z.is_meta or autocast_enabled(z) or not plain_call(self.norm, nn.LayerNorm):
            return  # (meta kernels take the pair: shape inference on meta keeps working)
        if dtype is torch.float32 and z.dtype in (torch.float16, torch.bfloat16):
            return
        raise TypeError(
            f"z has dtype {z.dtype} but the gate LayerNorm's parameters are {dtype}: convert the input "
            f"(z.to({dtype})) or the module (.to({z.dtype})), or run under torch.autocast"
        ) from err

    def forward_normalized(
        self,
        z1: torch.Tensor,
        z2n: torch.Tensor,
        mask: torch.Tensor | None = None,
        gate_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The gating after the gate LayerNorm: ``s = combine(z1, proj(z2n) + gate_bias)``.

        For callers that compute the split and the LayerNorm themselves (the fused kernel of
        :class:`gmlp.nn.GMLPBlock`); ``z1`` is the bypass (the whole ``Z`` for the non-split variants) and
        ``z2n = norm(z2)``. Inputs are trusted: :meth:`forward` validates; ``mask`` must be a bool tensor.
        """
        proj = self.proj
        plain = plain_call(proj, TokenProjection)
        gate = proj.mix(z2n, mask) if plain else proj(z2n, mask)
        if gate_bias is not None:
            gate = gate + gate_bias
        if self.variant == "linear":
            return gate
        # in inference the gate (a tensor proj has just made, with no hook holding it) takes z1 in place:
        # no new activation-sized buffer, and the gate's lines are still in cache (2-4% of a gMLP-S/16
        # block's inference on the CPU, benchmarks/RESULTS.md, twelfth session). Only a plain
        # TokenProjection's: a subclass or a patched forward may keep what it returns
        in_place = plain and may_update_in_place(gate, z1)
        if self.variant == "additive":
            return gate.add_(z1) if in_place else z1 + gate
        return gate.mul_(z1) if in_place else z1 * gate
