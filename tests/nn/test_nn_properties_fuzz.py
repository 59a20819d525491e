"""Property tests of the gmlp.nn layers over random small configurations (hypothesis).

Every variant of the gating function, dense or Toeplitz W (by GEMM or FFT), causal or not, SGU heads, tiny
attention, odd widths, 1 to 40 tokens, padding masks (bool/int, left/right/anywhere), batches of 1 to 4,
contiguous / strided / expanded inputs, which tensors need gradients, train and eval mode:

* the CPU fast path (oneDNN, in-place inference) equals the plain ops: output and every gradient, judged
  against a float64 run (the fast path may not be less accurate than the reference);
* padding invariance, batch independence, exact causality of the gradients;
* deepcopy, state-dict round trip, ``torch.vmap`` and per-sample gradients, forward AD, double backward;
* bf16 autocast (loosely).

The configurations keep every LayerNorm at least 3 channels wide: a LayerNorm over 1 or 2 channels maps its
input to (almost) constants, whose gradients are rounding noise amplified by ``1 / sqrt(eps)`` on every path.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

from gmlp.kernels import cpu_linear
from gmlp.kernels.toeplitz import toeplitz_matrix, toeplitz_matrix_reference, toeplitz_mix_fft
from gmlp.nn import VARIANTS, GMLPBlock, SpatialGatingUnit, TokenProjection

# a few examples in the default profile (the suite's time budget); the thorough profile's count otherwise
FEW = settings(max_examples=12) if settings.default.max_examples <= 15 else settings()


def _with_cpu_fusion(fusion: bool, fn):
    """``fn()`` with the oneDNN path forced on (``GMLP_DISABLE_CPU_FUSION=0``) or off (``=1``)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GMLP_DISABLE_CPU_FUSION", "0" if fusion else "1")
        return fn()


@st.composite
def block_configs(draw, causal: bool | None = None, max_len: int = 40) -> dict[str, Any]:
    """Keyword arguments of a random small :class:`GMLPBlock` (plus ``n``, the input length, and ``seed``)."""
    variant = draw(st.sampled_from(sorted(VARIANTS)))
    if causal and variant == "mixer":
        variant = "sgu"
    dim = draw(st.integers(3, 9))
    dim_ffn = 2 * draw(st.integers(3, 6)) if variant == "sgu" else draw(st.integers(3, 11))
    gate = dim_ffn // 2 if variant == "sgu" else dim_ffn
    seq_len = draw(st.integers(1, max_len))
    cfg: dict[str, Any] = {
        "dim": dim, "dim_ffn": dim_ffn, "seq_len": seq_len, "variant": variant,
        "n": draw(st.integers(1, seq_len)), "seed": draw(st.integers(0, 2**16)),
    }  # fmt: skip
    if variant == "mixer":
        cfg["token_mlp_dim"] = draw(st.none() | st.integers(1, 7))
        return cfg
    cfg["causal"] = draw(st.booleans()) if causal is None else causal
    if variant == "none":  # no token projection: its settings are refused
        return cfg
    cfg["toeplitz"] = draw(st.booleans())
    # heads leave at least 3 channels per head: each head's slice goes through the gate LayerNorm's mean
    cfg["heads"] = draw(st.sampled_from([h for h in range(1, gate + 1) if gate % h == 0 and gate // h >= 3]))
    if cfg["toeplitz"] and draw(st.booleans()):
        cfg["fft_threshold"] = draw(st.integers(1, seq_len))
    if variant != "none" and draw(st.booleans()):
        cfg["attn_dim"] = draw(st.integers(1, 5))
    return cfg


def build(cfg: dict[str, Any], std: float = 0.4) -> GMLPBlock:
    """The block of ``cfg`` with random non-trivial weights (W and b of the token mixing included)."""
    kwargs = {k: v for k, v in cfg.items() if k not in ("dim", "dim_ffn", "seq_len", "n", "seed")}
    torch.manual_seed(cfg["seed"])
    block = GMLPBlock(cfg["dim"], cfg["dim_ffn"], cfg["seq_len"], **kwargs)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, std)
    return block


def padding_mask(draw, batch: int, n: int, kind: str) -> torch.Tensor | None:
    """None, or a ``(batch, n)`` bool mask: right padding, left padding or pads anywhere (a sample may then
    have no real token)."""
    if kind == "none":
        return None
    if kind == "anywhere":
        return torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=batch,
                                          max_size=batch)))  # fmt: skip
    lengths = torch.tensor(draw(st.lists(st.integers(1, n), min_size=batch, max_size=batch)))[:, None]
    positions = torch.arange(n)[None]
    return positions < lengths if kind == "right" else positions >= n - lengths


def relayout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """``x`` (seq, batch, dim) with the same values in another memory layout."""
    if kind == "batch_major":
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    if kind == "strided":
        wide = x.new_zeros(*x.shape[:-1], 2 * x.shape[-1])
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


def assert_as_accurate(fast: Any, ref: Any, exact: Any, scale: float) -> None:
    """``fast`` is no further from the float64 ``exact`` than 8 times ``ref`` (same dtype as ``fast``) is,
    plus ``1e-5 * (1 + scale)``; None entries (unused inputs) must match (or be all-zero gradients)."""
    if exact is None or fast is None or ref is None:
        assert all(t is None or not t.any() for t in (fast, ref, exact))
        return
    assert fast.shape == exact.shape and fast.dtype == ref.dtype
    if exact.numel() == 0:
        return
    err = (fast.double() - exact).abs().max().item()
    err_ref = (ref.double() - exact).abs().max().item()
    assert err <= 8 * err_ref + 1e-5 * (1 + scale), (err, err_ref, scale)


# ---------------------------------------------------------------------------------------------------
# the fast path against the plain ops


@pytest.mark.skipif(not cpu_linear._HAS_ONEDNN_LINEAR, reason="no oneDNN linear in this torch build")
@FEW
@given(cfg=block_configs(), data=st.data())
def test_block_fast_path_equals_plain_ops_in_value_and_every_gradient(cfg, data) -> None:
    """Any configuration, mask, input layout, train or eval mode and choice of what needs a gradient (input
    and/or any subset of the parameters): the oneDNN path's output and gradients, and both paths' no_grad
    inference (in place), are as accurate as the plain ops' (judged against float64)."""
    model = build(cfg).train(data.draw(st.booleans(), "train"))
    n, batch = cfg["n"], data.draw(st.integers(1, 4), "batch")
    kind = data.draw(st.sampled_from(["none", "right", "left", "anywhere"]), "mask")
    mask = padding_mask(data.draw, batch, n, kind)
    if mask is not None and data.draw(st.booleans(), "int mask"):
        mask = mask.long()
    layout = data.draw(st.sampled_from(["contiguous", "batch_major", "strided"]), "layout")
    input_grad = data.draw(st.booleans(), "input needs grad")
    for p in model.parameters():
        p.requires_grad_(data.draw(st.booleans(), "param needs grad"))
    gen = torch.Generator().manual_seed(cfg["seed"])
    x0, seed_grad = (torch.randn(n, batch, cfg["dim"], generator=gen) for _ in range(2))

    def run(module: GMLPBlock, dtype: torch.dtype):
        x = relayout(x0.to(dtype), layout).requires_grad_(input_grad)
        out = module(x, mask)
        wrt = ([x] if input_grad else []) + [p for p in module.parameters() if p.requires_grad]
        grads = torch.autograd.grad((out * seed_grad.to(dtype)).sum(), wrt) if wrt else ()
        with torch.no_grad():
            inferred = module(relayout(x0.to(dtype), layout), mask)
        return out.detach(), inferred, grads

    fast, fast_inferred, g_fast = _with_cpu_fusion(True, lambda: run(model, torch.float32))
    ref, ref_inferred, g_ref = _with_cpu_fusion(False, lambda: run(model, torch.float32))
    exact, _, g_exact = _with_cpu_fusion(False, lambda: run(copy.deepcopy(model).double(), torch.float64))
    scale = max([exact.abs().max().item()] + [g.abs().max().item() for g in g_exact if g.numel()])
    for out in (fast, fast_inferred, ref_inferred):
        assert_as_accurate(out, ref, exact, scale)
    assert len(g_fast) == len(g_ref) == len(g_exact)
    for a, b, c in zip(g_fast, g_ref, g_exact, strict=True):
        assert_as_accurate(a, b, c, scale)


@pytest.mark.skipif(not cpu_linear._HAS_ONEDNN_LINEAR, reason="no oneDNN linear in this torch build")
@FEW
@given(cfg=block_configs(max_len=12), data=st.data())
def test_sgu_and_token_projection_alone_equal_plain_ops(cfg, data) -> None:
    """The SGU and its projection called on their own (not through the block's fused split): both paths
    agree, with a mask and a gate bias (tiny attention's input)."""
    block = build(cfg)
    sgu: SpatialGatingUnit = block.sgu
    n, batch = cfg["n"], data.draw(st.integers(1, 3), "batch")
    mask = padding_mask(data.draw, batch, n, data.draw(st.sampled_from(["none", "right", "anywhere"])))
    gen = torch.Generator().manual_seed(cfg["seed"])
    z = torch.randn(n, batch, cfg["dim_ffn"], generator=gen)
    gate_bias = None
    if sgu.variant not in ("none", "mixer") and data.draw(st.booleans(), "gate bias"):
        gate_bias = torch.randn(n, batch, sgu.gate_dim, generator=gen)

    def run(dtype: torch.dtype):
        module = copy.deepcopy(sgu).to(dtype)
        zz = z.to(dtype).requires_grad_(True)
        gb = None if gate_bias is None else gate_bias.to(dtype)
        out = module(zz, mask, gb)
        grads = torch.autograd.grad(out.square().sum(), [zz, *module.parameters()], allow_unused=True)
        outs = [out.detach(), *grads]
        if module.proj is not None:
            zp = z[..., : module.gate_dim].to(dtype)
            outs.append(module.proj(zp, mask))
            with torch.no_grad():
                outs.append(module(z.to(dtype), mask, gb))
        return outs

    fast = _with_cpu_fusion(True, lambda: run(torch.float32))
    ref = _with_cpu_fusion(False, lambda: run(torch.float32))
    exact = _with_cpu_fusion(False, lambda: run(torch.float64))
    scale = max(t.abs().max().item() for t in exact if t is not None and t.numel())
    for a, b, c in zip(fast, ref, exact, strict=True):
        assert_as_accurate(a, b, c, scale)


# ---------------------------------------------------------------------------------------------------
# padding, batch independence, causality


@FEW
@given(cfg=block_configs(), data=st.data())
def test_padding_invariance_and_batch_independence(cfg, data) -> None:
    """A sample's real outputs equal those of the sample run alone; NaN in the pads reach no real token; with
    right padding they equal the unpadded (shorter) run; on either CPU path, in inference."""
    model = build(cfg).eval()
    n, batch = cfg["n"], data.draw(st.integers(1, 4), "batch")
    kind = data.draw(st.sampled_from(["none", "right", "left", "anywhere"]), "mask")
    mask = padding_mask(data.draw, batch, n, kind)
    x = torch.randn(n, batch, cfg["dim"], generator=torch.Generator().manual_seed(cfg["seed"]))
    real = torch.ones(n, batch, dtype=torch.bool) if mask is None else mask.t()
    nan_pads = torch.where(real.unsqueeze(-1), x, float("nan"))

    def run():
        with torch.no_grad():
            out = model(nan_pads, mask)
            alone = [model(nan_pads[:, b : b + 1].clone(), None if mask is None else mask[b : b + 1])
                     for b in range(batch)]  # fmt: skip
            lengths = mask.sum(1).tolist() if kind == "right" else []
            shorter = [model(x[:m, b : b + 1].clone()) for b, m in enumerate(lengths)]
        return out, alone, shorter

    out, alone, shorter = _with_cpu_fusion(data.draw(st.booleans(), "fusion"), run)
    for b in range(batch):
        torch.testing.assert_close(out[:, b][real[:, b]], alone[b][:, 0][real[:, b]], atol=1e-5, rtol=1e-4)
    for b, y in enumerate(shorter):
        torch.testing.assert_close(out[: y.shape[0], b : b + 1], y, atol=1e-5, rtol=1e-4)


@FEW
@given(cfg=block_configs(causal=True, max_len=12), data=st.data())
def test_causal_blocks_have_exactly_zero_gradients_on_later_tokens(
    dependence, assert_causal, cfg, data
) -> None:
    """Causal configurations (dense or Toeplitz W, heads, tiny attention, any variant but the refused
    mixer), with or without padding: no output depends on a later token, another sample or a pad (the
    gradient is exactly 0), and every real output depends on every real earlier token."""
    model = build(cfg)
    n, batch = cfg["n"], data.draw(st.integers(1, 2), "batch")
    mask = padding_mask(data.draw, batch, n, data.draw(st.sampled_from(["none", "right", "left"])))
    x = torch.randn(n, batch, cfg["dim"], generator=torch.Generator().manual_seed(cfg["seed"]))
    fusion = data.draw(st.booleans(), "fusion")
    dep = _with_cpu_fusion(fusion, lambda: dependence(lambda t: model(t, mask), x))
    if cfg["variant"] == "none":  # no token mixing at all: each output depends on its own token only
        assert torch.all(dep.diagonal(dim1=0, dim2=2).diagonal(dim1=0, dim2=1) > 0)
        eye = torch.eye(n)[:, None, :, None] * torch.eye(batch)[None, :, None, :]
        assert torch.all(dep[eye == 0] == 0)
        return
    assert_causal(dep, mask)


# ---------------------------------------------------------------------------------------------------
# module protocol: copies, state dicts, torch.func, forward AD, double backward, dtypes


@FEW
@given(cfg=block_configs(max_len=16), data=st.data())
def test_deepcopy_state_dict_vmap_and_per_sample_gradients(cfg, data) -> None:
    """A deepcopy and a fresh block loaded from the state dict give the same outputs bit for bit;
    ``torch.vmap`` (with per-sample masks) equals a loop; per-sample gradients by ``vmap(grad)`` equal one
    backward per sample (float64: the torch.func path runs the plain ops)."""
    model = build(cfg).eval()
    n, k = cfg["n"], data.draw(st.integers(1, 3), "vmapped")
    x = torch.randn(k, n, 2, cfg["dim"], generator=torch.Generator().manual_seed(cfg["seed"]))
    masks = torch.rand(k, 2, n, generator=torch.Generator().manual_seed(cfg["seed"])) > 0.3
    with torch.no_grad():
        ref = model(x[0], masks[0])
        torch.testing.assert_close(copy.deepcopy(model)(x[0], masks[0]), ref, rtol=0, atol=0)
        kwargs = {k: v for k, v in cfg.items() if k not in ("dim", "dim_ffn", "seq_len", "n", "seed")}
        fresh = GMLPBlock(cfg["dim"], cfg["dim_ffn"], cfg["seq_len"], **kwargs).eval()
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(fresh(x[0], masks[0]), ref, rtol=0, atol=0)
        looped = torch.stack([model(x[i], masks[i]) for i in range(k)])
        torch.testing.assert_close(torch.vmap(model)(x, masks), looped, atol=1e-5, rtol=1e-4)

    model = model.double()
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor], sample: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, p, (sample.unsqueeze(1),)).square().sum()

    xs = x[0].double()
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 1))(params, xs)
    for b in range(2):
        model.zero_grad()
        loss(dict(model.named_parameters()), xs[:, b]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][b], p.grad)


@pytest.mark.skipif(not cpu_linear._HAS_ONEDNN_LINEAR, reason="no oneDNN linear in this torch build")
@FEW
@given(cfg=block_configs(max_len=12), data=st.data())
def test_forward_ad_and_double_backward_on_both_paths(cfg, data) -> None:
    """``torch.func.jvp`` (forward AD) equals the reverse-mode JVP, and a double backward (a gradient
    penalty) gives the float64 result, on the oneDNN path as on the plain ops. (SDPA's CPU flash kernel has
    no double backward: as docs/design.md says, the forward runs under the math backend for that.)"""
    model = build(cfg).double()
    n, batch = cfg["n"], data.draw(st.integers(1, 2), "batch")
    mask = padding_mask(data.draw, batch, n, data.draw(st.sampled_from(["none", "anywhere"])))
    gen = torch.Generator().manual_seed(cfg["seed"])
    x = torch.randn(n, batch, cfg["dim"], dtype=torch.float64, generator=gen)
    tangent = torch.randn(n, batch, cfg["dim"], dtype=torch.float64, generator=gen)

    def run(module: GMLPBlock, dtype: torch.dtype) -> list[torch.Tensor | None]:
        _, jvp = torch.func.jvp(lambda t: module(t, mask), (x.to(dtype),), (tangent.to(dtype),))
        xx = x.to(dtype).requires_grad_(True)
        with sdpa_kernel(SDPBackend.MATH):
            (g,) = torch.autograd.grad(module(xx, mask).square().sum(), xx, create_graph=True)
        return [jvp, *torch.autograd.grad(g.square().sum(), [xx, *module.parameters()], allow_unused=True)]

    exact = run(model, torch.float64)
    with sdpa_kernel(SDPBackend.MATH):
        _, reverse = torch.autograd.functional.jvp(lambda t: model(t, mask), (x,), (tangent,))
    torch.testing.assert_close(exact[0], reverse)
    single = copy.deepcopy(model).float()
    fast = _with_cpu_fusion(True, lambda: run(single, torch.float32))
    ref = _with_cpu_fusion(False, lambda: run(single, torch.float32))
    scale = max(t.abs().max().item() for t in exact if t is not None and t.numel())
    for a, b, c in zip(fast, ref, exact, strict=True):
        assert_as_accurate(a, b, c, scale)


@FEW
@given(cfg=block_configs(max_len=16), data=st.data())
def test_other_dtypes_and_bf16_autocast_loosely(cfg, data) -> None:
    """float64, bfloat16 and float16 blocks, and float32 ones under CPU bf16 autocast (either path), give
    the float64 result to their precision on the real tokens, and backpropagate."""
    model = build(cfg, std=0.2)
    n, batch = cfg["n"], data.draw(st.integers(1, 3), "batch")
    mask = padding_mask(data.draw, batch, n, data.draw(st.sampled_from(["none", "right", "left"])))
    x = torch.randn(n, batch, cfg["dim"], generator=torch.Generator().manual_seed(cfg["seed"]))
    real = torch.ones(n, batch, dtype=torch.bool) if mask is None else mask.t()
    exact = copy.deepcopy(model).double()(x.double(), mask)[real]
    scale = exact.abs().max().item()
    how = data.draw(st.sampled_from(["float64", "bfloat16", "float16", "autocast", "autocast-plain"]), "how")
    xx = x.clone().requires_grad_(True)
    if how.startswith("autocast"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = _with_cpu_fusion(how == "autocast", lambda: model(xx, mask))
    else:
        dtype = getattr(torch, how)
        out = copy.deepcopy(model).to(dtype)(xx.to(dtype), mask)
        assert out.dtype == dtype
    out.float().square().sum().backward()
    assert xx.grad is not None and torch.isfinite(xx.grad).all()
    if how == "float64":
        torch.testing.assert_close(out[real], exact, atol=1e-9 * (1 + scale), rtol=1e-9)
    else:  # half-precision rounding, loosely (a relative error of the whole output)
        assert (out[real].double() - exact).norm() <= 0.05 * exact.norm() + 1e-3


def test_float_masks_are_refused_by_name() -> None:
    """A float mask is ambiguous (0/1 flags or an additive bias): refused with a TypeError naming it, by the
    block, the SGU, the projection and the tiny attention alike."""
    block = GMLPBlock(4, 8, 5, attn_dim=2)
    x, mask = torch.randn(5, 2, 4), torch.ones(2, 5)
    calls = (
        lambda: block(x, mask), lambda: block.sgu(torch.randn(5, 2, 8), mask),
        lambda: block.sgu.proj(torch.randn(5, 2, 4), mask), lambda: block.tiny_attn(x, mask),
    )  # fmt: skip
    for call in calls:
        with pytest.raises(TypeError, match="mask must be a bool or integer tensor"):
            call()


# ---------------------------------------------------------------------------------------------------
# Toeplitz kernels


@FEW
@given(
    seq_len=st.integers(1, 20),
    data=st.data(),
    heads=st.sampled_from([None, 1, 2, 3]),
    causal=st.booleans(),
    batch=st.integers(0, 3),
)
def test_toeplitz_fft_and_diagonal_sums_equal_the_dense_matrix(seq_len, data, heads, causal, batch) -> None:
    """``toeplitz_mix_fft`` equals the dense product of ``toeplitz_matrix`` for a ``(2L - 1,)`` weight and for
    ``(heads, 2L - 1)`` ones, a heads axis of 1 included; the diagonal-sum backward equals autograd's, also in
    a double backward."""
    n = data.draw(st.integers(1, seq_len), "n")
    lead = () if heads is None else (heads,)
    h = heads or 1
    w = torch.randn(*lead, 2 * seq_len - 1, dtype=torch.float64, requires_grad=True)
    per_head = data.draw(st.integers(1, 3), "channels per head")
    z = torch.randn(n, batch, h * per_head, dtype=torch.float64, requires_grad=True)
    dense = toeplitz_matrix_reference(w, n, seq_len)
    if causal:
        dense = dense.tril()
    zh = z.view(n, batch, h, per_head)
    expected = torch.einsum("hij,jbhc->ibhc", dense if heads else dense[None], zh).reshape(z.shape)
    out = toeplitz_mix_fft(w, z, seq_len, causal)
    torch.testing.assert_close(out, expected)
    if batch:
        got = torch.autograd.grad(out.square().sum(), [w, z])
        for a, b in zip(got, torch.autograd.grad(expected.square().sum(), [w, z]), strict=True):
            torch.testing.assert_close(a, b)
    summed = toeplitz_matrix(w, n, seq_len, diagonal_sums=True)
    torch.testing.assert_close(summed, toeplitz_matrix_reference(w, n, seq_len), rtol=0, atol=0)
    torch.autograd.gradgradcheck(lambda t: toeplitz_matrix(t, n, seq_len, diagonal_sums=True).square(), (w,))


def test_toeplitz_mix_fft_takes_a_heads_axis_of_one() -> None:
    """Regression: a ``(1, 2L - 1)`` weight (the documented ``(heads, 2L - 1)`` with one head) was multiplied
    as a 1-D one, its ``(1, F)`` spectrum broadcast against ``(F, batch, channels)``: a wrong 4-D result or a
    size error. It equals the 1-D weight's mixing now."""
    w, z = torch.randn(1, 7, dtype=torch.float64), torch.randn(4, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(toeplitz_mix_fft(w, z, 4), toeplitz_mix_fft(w[0], z, 4), rtol=0, atol=1e-12)
    w, z = torch.randn(1, 1), torch.randn(1, 1, 1)
    assert toeplitz_mix_fft(w, z, 1).shape == (1, 1, 1)


def test_token_projection_with_fft_and_mask_equals_dense() -> None:
    """The projection's FFT path (heads, a mask) gives the dense path's output."""
    proj = TokenProjection(9, toeplitz=True, heads=3, init_std=0.5)
    dense = copy.deepcopy(proj)
    proj.fft_threshold = 1
    z, mask = torch.randn(7, 2, 6), torch.rand(2, 7) > 0.3
    torch.testing.assert_close(proj(z, mask), dense(z, mask), atol=1e-5, rtol=1e-5)
