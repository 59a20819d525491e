"""The fused Triton GELU + split + LayerNorm kernel equals the reference path (forward and gradients).

On a machine without a GPU the kernels run in Triton's interpreter: tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton when CUDA is unavailable.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import gmlp.nn.block as block_module
from gmlp.kernels import (
    gelu_split_layernorm,
    gelu_split_layernorm_reference,
    spatial_gating,
    spatial_gating_reference,
    triton_available,
)
from gmlp.nn import GMLPBlock

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not triton_available() or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs triton, and on CPU TRITON_INTERPRET=1 set before triton is imported (tests/conftest.py)",
)


def _grads(outs: tuple[torch.Tensor, ...], inputs: list[torch.Tensor], seeds: tuple[torch.Tensor, ...]):
    return torch.autograd.grad(sum((o * s).sum() for o, s in zip(outs, seeds, strict=True)), inputs)


@settings(max_examples=12, deadline=None)
@given(
    rows=st.integers(1, 9),
    half=st.integers(1, 40),
    lead=st.sampled_from([(), (2,)]),
    seed=st.integers(0, 999),
)
def test_kernel_matches_reference(rows: int, half: int, lead: tuple[int, ...], seed: int) -> None:
    torch.manual_seed(seed)
    u = (2 * torch.randn(*lead, rows, 2 * half, device=DEVICE)).requires_grad_()
    w = torch.randn(half, device=DEVICE, requires_grad=True)
    b = torch.randn(half, device=DEVICE, requires_grad=True)
    fused = gelu_split_layernorm(u, w, b, 1e-5, use_triton=True)
    ref = gelu_split_layernorm_reference(u, w, b, 1e-5)
    for f, r in zip(fused, ref, strict=True):
        assert f.shape == r.shape
        torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-5)
    seeds = tuple(torch.randn_like(r) for r in ref)
    for gf, gr in zip(_grads(fused, [u, w, b], seeds), _grads(ref, [u, w, b], seeds), strict=True):
        torch.testing.assert_close(gf, gr, rtol=1e-4, atol=1e-4)


def _through_kernel(monkeypatch: pytest.MonkeyPatch, fused: bool = True) -> list[int]:
    """Route every GMLPBlock through the Triton kernels (also on CPU, in the interpreter); count the calls.

    ``fused``: the whole-gating kernels (:func:`spatial_gating`, the default on CUDA) or the
    GELU+split+LayerNorm kernel with plain gating ops (``GMLP_DISABLE_FUSED_GATING=1``)."""
    calls: list[int] = []
    monkeypatch.setattr(block_module, "triton_enabled", lambda x: True)
    monkeypatch.setattr(block_module, "fused_gating_enabled", lambda *_: fused)
    for name, fn in (("gelu_split_layernorm", gelu_split_layernorm), ("spatial_gating", spatial_gating)):
        kernel = functools.partial(fn, use_triton=True)
        monkeypatch.setattr(block_module, name, lambda *a, _k=kernel, **k: calls.append(1) or _k(*a, **k))
    return calls


def _masked_block_case(toeplitz: bool, causal: bool = False) -> tuple:
    """A block with a tiny attention, a large W and a random gate LayerNorm weight, a padded batch of 3 x 10
    tokens, and the plain path's output and gradients: (block, x, mask, params, out, grads)."""
    torch.manual_seed(0)
    block = GMLPBlock(16, 48, 10, attn_dim=8, toeplitz=toeplitz, causal=causal).to(DEVICE)
    torch.nn.init.normal_(block.sgu.proj.weight, std=0.1)
    torch.nn.init.normal_(block.sgu.norm.weight)
    x = torch.randn(10, 3, 16, device=DEVICE, requires_grad=True)
    mask = torch.ones(3, 10, dtype=torch.bool, device=DEVICE)
    mask[2, 7:] = False
    params = [x, *block.parameters()]
    ref = block(x, mask)
    return block, x, mask, params, ref, torch.autograd.grad(ref.square().sum(), params)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-gating", "split-kernel"])
@pytest.mark.parametrize("toeplitz,causal", [(False, False), (True, True)])
def test_block_through_the_kernels_equals_reference_block(
    monkeypatch: pytest.MonkeyPatch, fused: bool, toeplitz: bool, causal: bool
) -> None:
    block, x, mask, params, ref, g_ref = _masked_block_case(toeplitz=toeplitz, causal=causal)
    calls = _through_kernel(monkeypatch, fused)
    out = block(x, mask)
    g_out = torch.autograd.grad(out.square().sum(), params)
    assert calls, "the block did not take the kernels"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", ["plain", "split-kernel", "fused-gating"])
@pytest.mark.parametrize("hooked", ["norm", "sgu", "sgu.norm", "sgu.proj"])
def test_hooks_on_the_block_s_modules_run_on_every_path(
    monkeypatch: pytest.MonkeyPatch, path: str, hooked: str
) -> None:
    """A forward hook on the pre-norm, the SGU, its LayerNorm or its token projection runs once per call
    and its change of the output counts, whichever path the block takes (the kernels use these modules'
    parameters directly, so a hooked module is called instead): the block equals its modules called in
    order."""
    block, x, mask, *_ = _masked_block_case(toeplitz=False)
    if path != "plain":
        _through_kernel(monkeypatch, fused=path == "fused-gating")
    calls: list[str] = []
    module = block.get_submodule(hooked)
    module.register_forward_hook(lambda m, args, out: calls.append(hooked) or out * 0.5)
    out = block(x, mask)
    assert calls == [hooked]
    h = block.norm(x)
    gate_bias = block.tiny_attn(h, mask)
    expected = x + block.fc2(block.sgu(torch.nn.functional.gelu(block.fc1(h)), mask, gate_bias))
    real = mask.t()  # outputs at padded tokens are unspecified
    torch.testing.assert_close(out[real], expected[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-gating", "split-kernel"])
def test_a_double_backward_through_the_kernels_raises(monkeypatch: pytest.MonkeyPatch, fused: bool) -> None:
    """The kernels' backward is not differentiable: a gradient penalty (create_graph) through them raised
    nothing and gave wrong second-order gradients; now it raises (GMLP_DISABLE_TRITON=1: plain ops)."""
    torch.manual_seed(0)
    block = GMLPBlock(16, 48, 10).to(DEVICE)  # no tiny attention: SDPA has no double backward on the CPU
    x = torch.randn(10, 3, 16, device=DEVICE, requires_grad=True)
    calls = _through_kernel(monkeypatch, fused)
    (grad,) = torch.autograd.grad(block(x).square().sum(), x, create_graph=True)
    assert calls
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.square().sum().backward()


@pytest.mark.parametrize("threshold_offset,expect_fused", [(0, True), (1, False)])
def test_block_takes_the_fused_gating_from_the_size_threshold_on(
    monkeypatch: pytest.MonkeyPatch, threshold_offset: int, expect_fused: bool
) -> None:
    """With the kernels available, a block takes the fused gating exactly when its fc1 output (tokens x
    batch x d_ffn) reaches GMLP_FUSED_GATING_MIN_ELEMENTS, and the split kernel below it."""
    block = GMLPBlock(16, 48, 10).to(DEVICE)
    x = torch.randn(10, 3, 16, device=DEVICE)
    monkeypatch.setenv("GMLP_FUSED_GATING_MIN_ELEMENTS", str(10 * 3 * 48 + threshold_offset))
    monkeypatch.setattr(block_module, "triton_enabled", lambda t: True)
    taken: list[str] = []
    for name, fn in (("gelu_split_layernorm", gelu_split_layernorm), ("spatial_gating", spatial_gating)):
        kernel = functools.partial(fn, use_triton=True)
        monkeypatch.setattr(
            block_module, name, lambda *a, _k=kernel, _n=name, **k: taken.append(_n) or _k(*a, **k)
        )
    block(x)
    assert taken == ["spatial_gating" if expect_fused else "gelu_split_layernorm"]


def test_fused_gating_threshold_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from gmlp.kernels.sgu_triton import (
        FUSED_GATING_MIN_ELEMENTS,
        fused_gating_enabled,
        fused_gating_min_elements,
        prefer_fused_gating,
    )

    monkeypatch.delenv("GMLP_FUSED_GATING_MIN_ELEMENTS", raising=False)
    monkeypatch.delenv("GMLP_DISABLE_FUSED_GATING", raising=False)
    assert fused_gating_min_elements() == FUSED_GATING_MIN_ELEMENTS
    assert fused_gating_enabled(FUSED_GATING_MIN_ELEMENTS) and not fused_gating_enabled(
        FUSED_GATING_MIN_ELEMENTS - 1
    )
    assert fused_gating_enabled()  # no size given: any size
    monkeypatch.setenv("GMLP_FUSED_GATING_MIN_ELEMENTS", "0")
    assert fused_gating_enabled(1)
    monkeypatch.setenv("GMLP_DISABLE_FUSED_GATING", "1")
    assert not fused_gating_enabled(10**12) and not fused_gating_enabled()
    monkeypatch.delenv("GMLP_DISABLE_FUSED_GATING")
    monkeypatch.setenv("GMLP_FUSED_GATING_MIN_ELEMENTS", "100")
    with prefer_fused_gating():  # e.g. a CUDA graph: every size, nested blocks too
        with prefer_fused_gating():
            assert fused_gating_enabled(1)
        assert fused_gating_enabled(1)
        monkeypatch.setenv("GMLP_DISABLE_FUSED_GATING", "1")
        assert not fused_gating_enabled(1)  # the ablation switch still wins
        monkeypatch.delenv("GMLP_DISABLE_FUSED_GATING")
    assert not fused_gating_enabled(1)
    for bad in ("-1", "1e8", "many"):
        monkeypatch.setenv("GMLP_FUSED_GATING_MIN_ELEMENTS", bad)
        with pytest.raises(ValueError, match="GMLP_FUSED_GATING_MIN_ELEMENTS must be a non-negative int"):
            fused_gating_min_elements()


def test_prefer_fused_gating_holds_for_its_own_thread_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA graph's warm-up (inside prefer_fused_gating) in one thread must not send another thread's
    eager blocks down the fused path at every size."""
    import threading

    from gmlp.kernels.sgu_triton import fused_gating_enabled, prefer_fused_gating

    monkeypatch.delenv("GMLP_DISABLE_FUSED_GATING", raising=False)
    monkeypatch.setenv("GMLP_FUSED_GATING_MIN_ELEMENTS", "100")
    entered, leave = threading.Event(), threading.Event()

    def warm_up() -> None:
        with prefer_fused_gating():
            assert fused_gating_enabled(1)
            entered.set()
            leave.wait(10)

    other = threading.Thread(target=warm_up)
    other.start()
    try:
        assert entered.wait(10)
        assert not fused_gating_enabled(1)  # this thread is in no prefer_fused_gating block
        assert fused_gating_enabled(100)
    finally:
        leave.set()
        other.join(10)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 19),
    batch=st.integers(1, 3),
    half=st.integers(1, 24),
    padded=st.booleans(),
    with_gate_bias=st.booleans(),
    seed=st.integers(0, 999),
)
@example(n=18, batch=1, half=1, padded=False, with_gate_bias=False, seed=1)  # ill-conditioned LayerNorm
@example(n=4, batch=3, half=2, padded=False, with_gate_bias=False, seed=14)
@example(n=16, batch=2, half=5, padded=True, with_gate_bias=True, seed=3)  # aligned: no padded copies
def test_fused_gating_matches_reference(
    n: int, batch: int, half: int, padded: bool, with_gate_bias: bool, seed: int
) -> None:
    """spatial_gating's kernels == the plain ops, forward and every gradient, at token counts that are
    and are not multiples of the 8-row padding (aligned counts skip the padded copies), with and without a
    padding mask and a gate bias."""
    torch.manual_seed(seed)
    u = (2 * torch.randn(n, batch, 2 * half, device=DEVICE)).requires_grad_()
    norm_w = torch.randn(half, device=DEVICE, requires_grad=True)
    norm_b = torch.randn(half, device=DEVICE, requires_grad=True)
    w = (0.3 * torch.randn(n, n, device=DEVICE)).requires_grad_()
    b = torch.randn(n, device=DEVICE, requires_grad=True)
    leaves = [u, norm_w, norm_b, w, b]
    gate_bias = None
    if with_gate_bias:
        gate_bias = torch.randn(n, batch, half, device=DEVICE, requires_grad=True)
        leaves.append(gate_bias)
    mask = None
    if padded:
        mask = torch.rand(batch, n, device=DEVICE) > 0.3
    args = (norm_w, norm_b, 1e-5, w, b, mask)
    fused = spatial_gating(u, *args, gate_bias, use_triton=True)
    plain = spatial_gating_reference(u, *args, gate_bias)  # the float32 plain ops
    # and the float64 truth: with few channels the gate LayerNorm is ill-conditioned (one channel: its
    # input gradient is exactly zero, which the kernel returns, while float32 rounding times
    # 1/sqrt(eps) is not), so the kernel must match the truth to 1e-4 or be as close as the plain ops
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    u64, nw64, nb64, w64, b64 = leaves64[:5]
    truth = spatial_gating_reference(
        u64, nw64, nb64, 1e-5, w64, b64, mask, leaves64[5] if with_gate_bias else None
    )
    assert fused.shape == truth.shape == (n, batch, half) and fused.dtype == u.dtype
    seed_grad = torch.randn_like(fused)
    got = (fused, *torch.autograd.grad((fused * seed_grad).sum(), leaves))
    base = (plain, *torch.autograd.grad((plain * seed_grad).sum(), leaves))
    want = (truth, *torch.autograd.grad((truth * seed_grad.double()).sum(), leaves64))
    for i, (a, p, c) in enumerate(zip(got, base, want, strict=True)):
        assert a.shape == c.shape and a.dtype == torch.float32
        tol = 1e-5 if i == 0 else 1e-4
        if not torch.allclose(a.double(), c, rtol=tol, atol=tol):
            err, err_plain = (a.double() - c).abs().max().item(), (p.double() - c).abs().max().item()
            assert err <= 2 * err_plain, f"tensor {i}: kernel error {err:.3g}, plain ops {err_plain:.3g}"


def test_fused_gating_ignores_garbage_in_padded_tokens() -> None:
    """NaN and inf in the padded tokens' gate inputs (and huge bypass values) change no real token's output,
    nor any parameter's gradient."""
    torch.manual_seed(3)
    n, batch, half = 9, 2, 8
    mask = torch.ones(batch, n, dtype=torch.bool, device=DEVICE)
    mask[1, 5:] = False
    u = torch.randn(n, batch, 2 * half, device=DEVICE)
    dirty = u.clone()
    dirty[5:, 1, :half] = 1e30
    dirty[5:7, 1, half:] = float("nan")
    dirty[7:, 1, half:] = float("inf")
    params = [torch.randn(half, device=DEVICE), torch.randn(half, device=DEVICE),
              0.3 * torch.randn(n, n, device=DEVICE), torch.randn(n, device=DEVICE)]  # fmt: skip
    outs, grads = [], []
    for x in (u, dirty):
        leaves = [p.clone().requires_grad_() for p in params]
        y = spatial_gating(x, leaves[0], leaves[1], 1e-5, leaves[2], leaves[3], mask, use_triton=True)
        real = y.masked_fill(~mask.t().unsqueeze(-1), 0.0)  # the loss sees real tokens only
        outs.append(real)
        grads.append(torch.autograd.grad(real.square().sum(), leaves))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    for clean, messy in zip(*grads, strict=True):
        torch.testing.assert_close(messy, clean, rtol=0, atol=0)


def _saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_fused_gating_saves_one_activation_fewer_for_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bypass GELU(u1) is recomputed, not stored: a block saves at least one (tokens x batch x C)
    activation less than through the split kernel with plain gating."""
    torch.manual_seed(0)
    n, batch, dim, ffn = 16, 8, 32, 128
    block = GMLPBlock(dim, ffn, n).to(DEVICE)
    x = torch.randn(n, batch, dim, device=DEVICE, requires_grad=True)
    saved = {}
    for fused in (True, False):
        _through_kernel(monkeypatch, fused)
        saved[fused] = _saved_bytes(lambda: block(x))
    activation = n * batch * (ffn // 2) * x.element_size()
    assert saved[True] <= saved[False] - activation, saved


@pytest.mark.parametrize("n", [8, 10])  # aligned, and padded to 16
def test_token_bias_is_added_by_the_gating_kernels(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """By default the token-mixing GEMM of the fused gating runs without its bias (``torch.mm``, no
    ``addmm``: on CUDA a per-row ``addmm`` bias is first copied over the whole output) and the gating
    kernels add it on load, forward and backward. ``GMLP_TOKEN_BIAS_IN_GEMM=1`` (the ablation) takes
    ``addmm`` again; both give the same output and gradients."""
    torch.manual_seed(n)
    batch, half = 3, 5
    u = (2 * torch.randn(n, batch, 2 * half, device=DEVICE)).requires_grad_()
    norm_w = torch.randn(half, device=DEVICE, requires_grad=True)
    norm_b = torch.randn(half, device=DEVICE, requires_grad=True)
    w = (0.3 * torch.randn(n, n, device=DEVICE)).requires_grad_()
    b = (3 * torch.randn(n, device=DEVICE)).requires_grad_()  # far from the identity gate's ones
    gate_bias = torch.randn(n, batch, half, device=DEVICE, requires_grad=True)
    leaves = [u, norm_w, norm_b, w, b, gate_bias]
    mask = torch.rand(batch, n, device=DEVICE) > 0.3
    seed_grad = torch.randn(n, batch, half, device=DEVICE)
    real_addmm = torch.addmm
    results = []
    for in_gemm in ("0", "1"):
        monkeypatch.setenv("GMLP_TOKEN_BIAS_IN_GEMM", in_gemm)
        calls: list[int] = []
        monkeypatch.setattr(torch, "addmm", lambda *a, seen=calls, **k: seen.append(1) or real_addmm(*a, **k))
        out = spatial_gating(u, norm_w, norm_b, 1e-5, w, b, mask, gate_bias, use_triton=True)
        monkeypatch.setattr(torch, "addmm", real_addmm)
        assert bool(calls) == (in_gemm == "1")
        results.append((out, *torch.autograd.grad((out * seed_grad).sum(), leaves)))
    reference = spatial_gating_reference(u, norm_w, norm_b, 1e-5, w, b, mask, gate_bias)
    torch.testing.assert_close(results[0][0], reference, rtol=1e-5, atol=1e-5)
    for a, c in zip(*results, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_reference_is_used_off_cuda() -> None:
    u = torch.randn(3, 8)
    w, b = torch.ones(4), torch.zeros(4)
    z1, z2 = gelu_split_layernorm(u, w, b, 1e-5)
    r1, r2 = gelu_split_layernorm_reference(u, w, b, 1e-5)
    assert torch.equal(z1, r1) and torch.equal(z2, r2)


@pytest.mark.parametrize(
    "config",
    [
        {"fwd_rows": 4, "fwd_warps": 8, "bwd_warps": 8, "bwd_programs_per_sm": 1},
        {"fwd_rows": 2, "fwd_warps": 4, "bwd_warps": 4, "bwd_programs_per_sm": 3},
        {"fwd_rows": 8, "bwd_programs_per_sm": 64},
        {"bwd_programs_per_sm": 1, "bwd_prefetch": 1},  # 2 rows a program, the last run ragged
        {"bwd_programs_per_sm": 64, "bwd_prefetch": 1},  # one row a program: the prefetch is all masked
        {"fwd_rows": 1, "fwd_programs_per_sm": 1},  # 13 one-row tiles, 8 "SMs": 2 a program, ragged
        {"fwd_rows": 1, "fwd_programs_per_sm": 1, "fwd_prefetch": 1},  # the same, next tile loaded early
    ],
)
@pytest.mark.parametrize("fold", [False, True], ids=["", "fc1-bias-folded"])
def test_every_launch_configuration_matches_reference(config: dict[str, int], fold: bool) -> None:
    """Multi-row forward programs and any backward split of the rows (ragged last run included); ``fold``:
    ``u`` without fc1's bias, added and its gradient reduced in the kernels."""
    from gmlp.kernels import sgu_triton

    torch.manual_seed(1)
    u = (2 * torch.randn(13, 2 * 24, device=DEVICE)).requires_grad_()
    w = torch.randn(24, device=DEVICE, requires_grad=True)
    b = torch.randn(24, device=DEVICE, requires_grad=True)
    leaves = [u, w, b]
    u_bias = None
    if fold:
        u_bias = torch.randn(2 * 24, device=DEVICE, requires_grad=True)
        leaves.append(u_bias)
    saved = dataclasses.asdict(sgu_triton.launch_config)
    try:
        sgu_triton.set_launch_config(**config)
        fused = gelu_split_layernorm(u, w, b, 1e-5, use_triton=True, u_bias=u_bias)
        seeds = tuple(torch.randn_like(f) for f in fused)
        grads = _grads(fused, leaves, seeds)
    finally:
        sgu_triton.set_launch_config(**saved)
    ref = gelu_split_layernorm_reference(u if u_bias is None else u + u_bias, w, b, 1e-5)
    for f, r in zip(fused, ref, strict=True):
        torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-5)
    for gf, gr in zip(grads, _grads(ref, leaves, seeds), strict=True):
        torch.testing.assert_close(gf, gr, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("half", [24, 40, 48, 96])
@pytest.mark.parametrize(
    "config",
    [
        {"ln_split": 1},
        {"ln_split": 1, "fwd_rows": 2, "fwd_programs_per_sm": 1, "fwd_prefetch": 1, "bwd_prefetch": 1,
         "bwd_programs_per_sm": 1},
    ],
)  # fmt: skip
@pytest.mark.parametrize("fold", [False, True], ids=["", "fc1-bias-folded"])
def test_rows_in_two_pieces_match_reference(half: int, config: dict[str, int], fold: bool) -> None:
    """``ln_split``: the LayerNorm kernels hold a row as two power-of-two pieces (24 -> 16 + 16 with half
    the second piece masked, 40 -> 32 + 16 with 8 masked, 48 -> 32 + 16 exactly, 96 -> 64 + 32), alone and
    with the prefetching loops, on the split kernel (both halves written) and on the fused gating (gate
    half only, a padding mask): forward and every gradient equal the reference."""
    from gmlp.kernels import sgu_triton

    assert sgu_triton._row_pieces(half) == (sgu_triton._block_c(half), 0)  # off by default
    torch.manual_seed(3)
    n, batch = 7, 2
    leaves = _gating_leaves(n, batch, half)
    u, nw, nb = leaves[:3]
    u_bias = leaves[5] if fold else None
    mask = torch.ones(batch, n, dtype=torch.bool, device=DEVICE)
    mask[0, 5:] = False
    saved = dataclasses.asdict(sgu_triton.launch_config)
    try:
        sgu_triton.set_launch_config(**config)
        first, second = sgu_triton._row_pieces(half)
        assert second > 0 and first + second >= half > first
        split = gelu_split_layernorm(u, nw, nb, 1e-5, use_triton=True, u_bias=u_bias)
        seeds = tuple(torch.randn_like(t) for t in split)
        wrt = leaves[:3] if u_bias is None else [*leaves[:3], u_bias]
        split_grads = _grads(split, wrt, seeds)
        gated = spatial_gating(u, nw, nb, 1e-5, *leaves[3:5], mask, use_triton=True, u_bias=u_bias)
        seed = torch.randn_like(gated)
        gated_grads = torch.autograd.grad((gated * seed).sum(), leaves[:5] if u_bias is None else leaves)
    finally:
        sgu_triton.set_launch_config(**saved)
    u_ref = u if u_bias is None else u + u_bias
    ref = gelu_split_layernorm_reference(u_ref, nw, nb, 1e-5)
    for got, want in zip((*split, *split_grads), (*ref, *_grads(ref, wrt, seeds)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    ref_gated = spatial_gating_reference(u_ref, nw, nb, 1e-5, *leaves[3:5], mask)
    ref_grads = torch.autograd.grad((ref_gated * seed).sum(), leaves[:5] if u_bias is None else leaves)
    torch.testing.assert_close(gated, ref_gated, rtol=1e-5, atol=1e-5)
    for a, c in zip(gated_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)


def _gating_leaves(n: int, batch: int, half: int) -> list[torch.Tensor]:
    """Random leaves of a gating call: ``u`` (n, batch, 2C), the gate LayerNorm's weight and bias, a dense
    W (n, n), its bias (n,) and an fc1 bias (2C,) to fold."""
    return [(2 * torch.randn(n, batch, 2 * half, device=DEVICE)).requires_grad_(),
            torch.randn(half, device=DEVICE, requires_grad=True),
            torch.randn(half, device=DEVICE, requires_grad=True),
            (0.3 * torch.randn(n, n, device=DEVICE)).requires_grad_(),
            torch.randn(n, device=DEVICE, requires_grad=True),
            torch.randn(2 * half, device=DEVICE, requires_grad=True)]  # fmt: skip


def test_gating_kernels_tile_rows_in_512_columns_by_default() -> None:
    """The default gating tile is GATE_COLS (512) columns: a 1536-wide row in three programs, and a
    520-wide one in two (the second with 8 real columns), equal to the reference with a padding mask."""
    from gmlp.kernels import sgu_triton

    assert sgu_triton.launch_config.gate_cols is None and sgu_triton.GATE_COLS == 512
    grid, _, block_c, _ = sgu_triton._gate_grid(10, 1536)
    assert grid == (10, 3) and block_c == 512
    torch.manual_seed(4)
    n, batch, half = 3, 2, 520
    leaves = _gating_leaves(n, batch, half)[:5]
    mask = torch.tensor([[True, True, False], [True, True, True]], device=DEVICE)
    fused = spatial_gating(*leaves[:3], 1e-5, *leaves[3:5], mask, use_triton=True)
    seed = torch.randn_like(fused)
    got = torch.autograd.grad((fused * seed).sum(), leaves)
    ref = spatial_gating_reference(*leaves[:3], 1e-5, *leaves[3:5], mask)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    for a, c in zip(got, torch.autograd.grad((ref * seed).sum(), leaves), strict=True):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "config",
    [
        {"gate_cols": 8, "gate_rows": 2},
        {"gate_cols": 16, "gate_rows": 4},
        {"gate_cols": 1024, "gate_rows": 1},
        {"gate_cols": 16, "gate_rows": 4, "bwd_prefetch": 1, "bwd_programs_per_sm": 1},  # padded rows
        {"fwd_programs_per_sm": 1, "fwd_rows": 1},  # forward loops over 3 rows a program
        {"fwd_programs_per_sm": 1, "fwd_rows": 1, "fwd_prefetch": 1},  # ... loading the next one early
    ],
)
@pytest.mark.parametrize("fold", [False, True], ids=["", "fc1-bias-folded"])
def test_every_gating_tile_matches_reference(config: dict[str, int], fold: bool) -> None:
    """Column-tiled gating kernels (ragged last tile, rows past the end) == the plain ops, with a mask;
    ``fold``: ``u`` without fc1's bias, which the kernels add on load and whose gradient they reduce."""
    from gmlp.kernels import sgu_triton

    torch.manual_seed(2)
    n, batch, half = 7, 3, 20
    leaves = _gating_leaves(n, batch, half)
    if not fold:
        leaves = leaves[:5]
    u_bias = leaves[5] if fold else None
    mask = torch.ones(batch, n, dtype=torch.bool, device=DEVICE)
    mask[1, 4:] = False
    saved = dataclasses.asdict(sgu_triton.launch_config)
    try:
        sgu_triton.set_launch_config(**config)
        fused = spatial_gating(*leaves[:3], 1e-5, *leaves[3:5], mask, use_triton=True, u_bias=u_bias)
        seed = torch.randn_like(fused)
        got = torch.autograd.grad((fused * seed).sum(), leaves)
    finally:
        sgu_triton.set_launch_config(**saved)
    u_ref = leaves[0] if u_bias is None else leaves[0] + u_bias
    ref = spatial_gating_reference(u_ref, *leaves[1:3], 1e-5, *leaves[3:5], mask)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    for a, c in zip(got, torch.autograd.grad((ref * seed).sum(), leaves), strict=True):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)


@settings(max_examples=10, deadline=None)
@given(
    n=st.integers(1, 19),
    batch=st.integers(1, 3),
    half=st.integers(4, 24),
    padded=st.booleans(),
    with_gate_bias=st.booleans(),
    seed=st.integers(0, 999),
)
def test_folded_fc1_bias_matches_reference(
    n: int, batch: int, half: int, padded: bool, with_gate_bias: bool, seed: int
) -> None:
    """``u_bias``: the kernels add fc1's bias on load and reduce its gradient in the backward kernels; the
    output and every gradient (the bias's included) equal the plain ops on ``u + u_bias`` (float64 truth)."""
    torch.manual_seed(seed)
    leaves = _gating_leaves(n, batch, half)
    if with_gate_bias:
        leaves.append(torch.randn(n, batch, half, device=DEVICE, requires_grad=True))
    mask = torch.rand(batch, n, device=DEVICE) > 0.3 if padded else None

    def run(ls: list[torch.Tensor], fused: bool) -> torch.Tensor:
        u, nw, nb, w, b, ub = ls[:6]
        gate_bias = ls[6] if with_gate_bias else None
        if fused:
            return spatial_gating(u, nw, nb, 1e-5, w, b, mask, gate_bias, use_triton=True, u_bias=ub)
        return spatial_gating_reference(u + ub, nw, nb, 1e-5, w, b, mask, gate_bias)

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    got, truth = run(leaves, True), run(leaves64, False)
    seed_grad = torch.randn_like(got)
    g_got = torch.autograd.grad((got * seed_grad).sum(), leaves)
    g_truth = torch.autograd.grad((truth * seed_grad.double()).sum(), leaves64)
    torch.testing.assert_close(got.double(), truth, rtol=1e-5, atol=1e-5)
    for i, (a, c) in enumerate(zip(g_got, g_truth, strict=True)):
        torch.testing.assert_close(a.double(), c, rtol=1e-4, atol=1e-4, msg=f"gradient {i}")


@pytest.mark.parametrize("fused", [True, False], ids=["fused-gating", "split-kernel"])
def test_block_folds_fc1_bias_on_request(monkeypatch: pytest.MonkeyPatch, fused: bool) -> None:
    """``GMLP_FOLD_FC1_BIAS=1``: a block on either kernel path runs fc1 without its bias and hands the
    bias to the kernels; output and every gradient as the plain block."""
    block, x, mask, params, ref, g_ref = _masked_block_case(toeplitz=True)
    _through_kernel(monkeypatch, fused)
    seen: list[object] = []
    name = "spatial_gating" if fused else "gelu_split_layernorm"
    kernel = getattr(block_module, name)
    spy = lambda *a, **k: seen.append(k["u_bias"]) or kernel(*a, **k)  # noqa: E731
    monkeypatch.setattr(block_module, name, spy)
    monkeypatch.setenv("GMLP_FOLD_FC1_BIAS", "1")
    out = block(x, mask)
    assert len(seen) == 1 and seen[0] is block.fc1.bias
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(out.square().sum(), params), g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    monkeypatch.delenv("GMLP_FOLD_FC1_BIAS")
    block(x, mask)
    assert seen[1] is None  # off by default


def test_folded_bias_of_the_wrong_shape_is_named() -> None:
    u = torch.randn(4, 2, 6, device=DEVICE)
    args = (torch.ones(3, device=DEVICE), torch.zeros(3, device=DEVICE), 1e-5, torch.eye(4, device=DEVICE),
            torch.zeros(4, device=DEVICE))  # fmt: skip
    with pytest.raises(ValueError, match=r"u_bias must have shape \(6,\) like u's last dimension, got \(3,"):
        spatial_gating(u, *args, use_triton=True, u_bias=torch.zeros(3, device=DEVICE))
    plain = spatial_gating(u, *args, use_triton=False, u_bias=torch.ones(6, device=DEVICE))
    torch.testing.assert_close(plain, spatial_gating_reference(u + 1, *args))
    with pytest.raises(ValueError, match=r"u_bias must have shape \(6,\) like u's last .*, got \(6, 1"):
        gelu_split_layernorm(u, *args[:3], use_triton=True, u_bias=torch.zeros(6, 1, device=DEVICE))


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a strided view: every other entry of a vector twice as long (a leaf)."""
    full = torch.zeros(2 * t.numel(), device=t.device)
    full[::2] = t.detach()
    return full.requires_grad_()


@pytest.mark.parametrize("affine", ["strided", "no-bias", "none"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-gating", "split-kernel"])
def test_strided_or_missing_norm_parameters_match_reference(fused: bool, affine: str) -> None:
    """The gate LayerNorm's weight and bias (and a folded fc1 bias) given as strided views are read as the
    vectors they are (the kernels read them as dense: wrong outputs before), and None weight/bias (an
    ``nn.LayerNorm`` without ``elementwise_affine`` or ``bias``, which the block hands over) work as in
    ``F.layer_norm`` (a crash before); outputs and gradients as the reference's."""
    torch.manual_seed(0)
    n, batch, half = 5, 2, 6
    u = (2 * torch.randn(n, batch, 2 * half, device=DEVICE)).requires_grad_()
    norm_w, norm_b = _strided(torch.randn(half, device=DEVICE)), _strided(torch.randn(half, device=DEVICE))
    u_bias = _strided(torch.randn(2 * half, device=DEVICE))
    leaves = [u, u_bias] + [norm_w] * (affine != "none") + [norm_b] * (affine == "strided")
    nw = None if affine == "none" else norm_w[::2]
    nb = norm_b[::2] if affine == "strided" else None
    w = (0.3 * torch.randn(n, n, device=DEVICE)).requires_grad_()
    b = torch.randn(n, device=DEVICE)
    seeds = (torch.randn(n, batch, half, device=DEVICE), torch.randn(n, batch, half, device=DEVICE))
    outs = []
    for use_triton in (True, False):
        if fused:
            out: tuple[torch.Tensor, ...] = (
                spatial_gating(u, nw, nb, 1e-5, w, b, use_triton=use_triton, u_bias=u_bias[::2]),
            )
        else:
            out = gelu_split_layernorm(u, nw, nb, 1e-5, use_triton=use_triton, u_bias=u_bias[::2])
        outs.append((out, _grads(out, leaves, seeds[: len(out)])))
    (got, got_grads), (want, want_grads) = outs
    for a, r in zip((*got, *got_grads), (*want, *want_grads), strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


def test_bad_arguments_of_the_kernels_are_named() -> None:
    """Shapes the kernels would read past or misread (an odd u, LayerNorm parameters or a token bias of the
    wrong length, a transposed mask with as many entries) raise a ValueError naming the argument, where the
    kernels returned a result of the wrong values (or read out of bounds)."""
    n, batch, half = 3, 2, 5
    u = torch.randn(n, batch, 2 * half, device=DEVICE)
    nw, nb = torch.ones(half, device=DEVICE), torch.zeros(half, device=DEVICE)
    w, b = torch.eye(n, device=DEVICE), torch.zeros(n, device=DEVICE)
    with pytest.raises(ValueError, match=r"u must have an even last dimension .*got shape \(4, 11\)"):
        gelu_split_layernorm(torch.randn(4, 11, device=DEVICE), nw, nb, 1e-5, use_triton=True)
    with pytest.raises(ValueError, match=r"gelu_split_layernorm: weight and bias must have shape \(5,\) .*"
                       r"got \(6,\) and \(5,\)"):  # fmt: skip
        gelu_split_layernorm(u, torch.ones(6, device=DEVICE), nb, 1e-5, use_triton=True)
    with pytest.raises(ValueError, match=r"spatial_gating: norm_weight and norm_bias must have shape \(5,\)"):
        spatial_gating(u, nw, torch.zeros(4, device=DEVICE), 1e-5, w, b, use_triton=True)
    with pytest.raises(ValueError, match=r"spatial_gating: bias must have shape \(3,\) .*got \(4,\)"):
        spatial_gating(u, nw, nb, 1e-5, w, torch.zeros(4, device=DEVICE), use_triton=True)
    transposed = torch.ones(n, batch, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match=r"mask must have shape \(batch, n\) = \(2, 3\), got \(3, 2\)"):
        spatial_gating(u, nw, nb, 1e-5, w, b, transposed, use_triton=True)
    narrow = torch.zeros(n, batch, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"gate_bias must broadcast to \(n, batch, C\) = \(3, 2, 5\)"):
        spatial_gating(u, nw, nb, 1e-5, w, b, gate_bias=narrow, use_triton=True)


@pytest.mark.parametrize("batch", [0, 2])
def test_broadcast_gate_bias_and_empty_batches_match_reference(batch: int) -> None:
    """A gate bias that broadcasts to (n, batch, C) (one per token and channel, say), which the reference
    adds by broadcasting, works on the kernels too (a reshape error before), with its gradient summed over
    the broadcast; and an empty batch runs forward and backward (the backward's view raised before)."""
    torch.manual_seed(0)
    n, half = 5, 3
    u = torch.randn(n, batch, 2 * half, device=DEVICE, requires_grad=True)
    nw = torch.randn(half, device=DEVICE, requires_grad=True)
    nb = torch.randn(half, device=DEVICE, requires_grad=True)
    w = torch.randn(n, n, device=DEVICE, requires_grad=True)
    b = torch.randn(n, device=DEVICE, requires_grad=True)
    gate_bias = torch.randn(n, 1, half, device=DEVICE, requires_grad=True)
    mask = torch.rand(batch, n, device=DEVICE) > 0.3
    leaves = [u, nw, nb, w, b, gate_bias]
    results = []
    for use_triton in (True, False):
        s = spatial_gating(u, nw, nb, 1e-5, w, b, mask, gate_bias, use_triton=use_triton)
        results.append((s, *torch.autograd.grad(s.square().sum(), leaves)))
    for a, r in zip(*results, strict=True):
        assert a.shape == r.shape
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-gating", "split-kernel"])
def test_block_with_layer_norms_without_affine_through_the_kernels(
    monkeypatch: pytest.MonkeyPatch, fused: bool
) -> None:
    """A block whose pre-norm has no affine parameters and whose gate LayerNorm has no bias (plain
    ``nn.LayerNorm`` modules, so the kernels take their parameters) equals the plain block."""
    torch.manual_seed(0)
    block = GMLPBlock(16, 32, 7).to(DEVICE)
    block.norm = torch.nn.LayerNorm(16, elementwise_affine=False, device=DEVICE)
    block.sgu.norm = torch.nn.LayerNorm(16, bias=False, device=DEVICE)
    torch.nn.init.normal_(block.sgu.norm.weight)
    torch.nn.init.normal_(block.sgu.proj.weight, std=0.2)
    x = torch.randn(7, 2, 16, device=DEVICE, requires_grad=True)
    params = [x, *block.parameters()]
    ref = block(x)
    g_ref = torch.autograd.grad(ref.square().sum(), params)
    calls = _through_kernel(monkeypatch, fused)
    out = block(x)
    g_out = torch.autograd.grad(out.square().sum(), params)
    assert calls
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


def test_launch_configuration_is_validated() -> None:
    from gmlp.kernels import sgu_triton

    with pytest.raises(TypeError, match="unknown launch parameter 'warps'"):
        sgu_triton.set_launch_config(warps=4)
    with pytest.raises(ValueError, match="fwd_rows must be a power of two, got 3"):
        sgu_triton.set_launch_config(fwd_rows=3)
    with pytest.raises(ValueError, match="gate_cols must be a power of two, got 96"):
        sgu_triton.set_launch_config(gate_cols=96)
    with pytest.raises(ValueError, match="bwd_warps must be a positive int or None, got 0"):
        sgu_triton.set_launch_config(bwd_warps=0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-gating", "split-kernel"])
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 999), position=st.integers(0, 10))
def test_causal_lm_through_the_kernel_never_sees_the_future(seed: int, position: int, fused: bool) -> None:
    """d logits[i] / d embeddings[j] is exactly 0 for every j > i with the kernels in every block (the fused
    gating, or the split kernel that small blocks take by default on CUDA)."""
    from gmlp.models.text import GMLPConfig, GMLPForCausalLM

    with pytest.MonkeyPatch.context() as monkeypatch:
        calls = _through_kernel(monkeypatch, fused)
        torch.manual_seed(seed)
        cfg = GMLPConfig(vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         max_position_embeddings=12, causal=True, tiny_attn_size=8)  # fmt: skip
        model = GMLPForCausalLM(cfg).to(DEVICE).eval()
        for block in model.gmlp.blocks:  # a large W so that any leak would show
            torch.nn.init.normal_(block.sgu.proj.weight, std=0.2)
        ids = torch.randint(0, 30, (2, 11), device=DEVICE)
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        logits = model(inputs_embeds=emb).logits
        (grad,) = torch.autograd.grad(logits[:, position].sum(), emb)
    assert calls, "the blocks did not take the fused kernel"
    future, past = grad[:, position + 1 :], grad[:, : position + 1]
    assert future.numel() == 0 or future.abs().max().item() == 0.0
    assert past.abs().max().item() > 0.0


@pytest.mark.parametrize("fused", [True, False], ids=["fused-gating", "split-kernel"])
def test_padded_batch_through_the_kernel_equals_unpadded_runs(
    monkeypatch: pytest.MonkeyPatch, fused: bool
) -> None:
    """Right-padded MLM batch with the fused kernels == each sequence alone, at the real tokens."""
    from gmlp.models.text import GMLPConfig, GMLPForMaskedLM

    calls = _through_kernel(monkeypatch, fused)
    torch.manual_seed(0)
    cfg = GMLPConfig(vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                     max_position_embeddings=12, tiny_attn_size=8)  # fmt: skip
    model = GMLPForMaskedLM(cfg).to(DEVICE).eval()
    for block in model.gmlp.blocks:  # a large W so that any leak would show
        torch.nn.init.normal_(block.sgu.proj.weight, std=0.2)
    lengths = (12, 7, 3)
    ids = torch.randint(1, 30, (3, 12), device=DEVICE)
    mask = torch.zeros(3, 12, dtype=torch.long, device=DEVICE)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        for row, n in enumerate(lengths):
            alone = model(ids[row : row + 1, :n]).logits
            torch.testing.assert_close(padded[row : row + 1, :n], alone, rtol=1e-5, atol=1e-5)
    assert calls


def test_gradient_checkpointing_through_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Recomputing the blocks (activation checkpointing) through the fused kernels gives the gradients of
    the plain run, with a padded batch."""
    from gmlp.models.text import GMLPConfig, GMLPForMaskedLM

    calls = _through_kernel(monkeypatch)
    cfg = GMLPConfig(vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                     max_position_embeddings=12, tiny_attn_size=8, hidden_dropout_prob=0.0)  # fmt: skip
    ids = torch.randint(1, 30, (2, 12), device=DEVICE)
    mask = torch.ones(2, 12, dtype=torch.long, device=DEVICE)
    mask[1, 9:] = 0
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = GMLPForMaskedLM(cfg).to(DEVICE).train()
        if checkpointing:
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        model(ids, attention_mask=mask, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert calls
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [8, 10])  # aligned, and padded to 16
def test_custom_ops_pass_opcheck(n: int) -> None:
    """The compile-time form of the fused gating (``gmlp::spatial_gating_fwd`` with its registered
    backward op): schema, fake tensors, autograd registration and AOT dispatch, via torch's own checker."""
    torch.manual_seed(0)
    batch, half = 2, 3
    u = torch.randn(n, batch, 2 * half, device=DEVICE, requires_grad=True)
    norm = [torch.randn(half, device=DEVICE, requires_grad=True) for _ in range(2)]
    w = torch.randn(n, n, device=DEVICE, requires_grad=True)
    b = torch.randn(n, device=DEVICE, requires_grad=True)
    keep = (torch.rand(batch, n, device=DEVICE) > 0.3).t().reshape(-1).float()
    gate_bias = torch.randn(n, batch, half, device=DEVICE, requires_grad=True)
    for extra in ((None, None), (keep, gate_bias)):
        args = (u, *norm, 1e-5, w, b, *extra)
        torch.library.opcheck(torch.ops.gmlp.spatial_gating_fwd, args)
        # inductor asserts that real outputs have the fake kernels' strides (opcheck does not)
        s, mean, rstd, z2n, gate = torch.ops.gmlp.spatial_gating_fwd(*args)
        bwd_args = (torch.randn_like(s), u, norm[0], mean, rstd, extra[0], z2n, w, b, gate)
        for op, op_args in (
            (torch.ops.gmlp.spatial_gating_fwd, args),
            (torch.ops.gmlp.spatial_gating_bwd, bwd_args),
        ):
            real = op(*op_args)
            with FakeTensorMode() as mode:
                fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in op_args))
            for r, f in zip(real, fake, strict=True):
                assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype), op


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.inductor)])
def test_compiled_block_keeps_the_fused_gating_as_custom_ops(
    monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """With the kernels kept under torch.compile (GMLP_TRITON_UNDER_COMPILE=1 on CUDA; forced here), a
    block compiles whole (fullgraph), its graph calls the custom op, and outputs and every gradient equal
    the plain block's, with a padding mask and a tiny attention."""
    block, x, mask, params, ref, g_ref = _masked_block_case(toeplitz=True)

    graphs: list[str] = []

    def recording(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., object]:
        graphs.append(gm.code)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    monkeypatch.setattr(block_module, "compiled_kernels_enabled", lambda t: torch.compiler.is_compiling())
    torch._dynamo.reset()
    out = torch.compile(block, backend=recording, fullgraph=True)(x, mask)
    g_out = torch.autograd.grad(out.square().sum(), params)
    torch._dynamo.reset()
    assert len(graphs) == 1 and "gmlp.spatial_gating_fwd" in graphs[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, c in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)


def test_compile_keeps_kernels_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels stay under torch.compile only while tracing, with GMLP_TRITON_UNDER_COMPILE=1, without
    either disabling switch, and (compiled_kernels_enabled) only for CUDA tensors."""
    from gmlp.kernels.sgu_triton import _kernels_under_compile_requested, compiled_kernels_enabled

    seen: list[tuple[bool, bool]] = []

    def probe(t: torch.Tensor) -> torch.Tensor:
        seen.append((_kernels_under_compile_requested(), compiled_kernels_enabled(t.cpu())))
        return t + 1

    def traced(env: dict[str, str]) -> tuple[bool, bool]:
        with monkeypatch.context() as m:
            for k in ("GMLP_TRITON_UNDER_COMPILE", "GMLP_DISABLE_TRITON", "GMLP_DISABLE_FUSED_GATING"):
                m.delenv(k, raising=False)
            for k, v in env.items():
                m.setenv(k, v)
            torch._dynamo.reset()
            torch.compile(probe, backend="eager", fullgraph=True)(torch.zeros(2))
            torch._dynamo.reset()
        return seen.pop()

    opt_in = {"GMLP_TRITON_UNDER_COMPILE": "1"}
    assert traced(opt_in) == (True, False)  # a CPU tensor never takes the kernels
    assert traced({}) == (False, False)
    assert traced({**opt_in, "GMLP_DISABLE_TRITON": "1"}) == (False, False)
    assert traced({**opt_in, "GMLP_DISABLE_FUSED_GATING": "1"}) == (False, False)
    monkeypatch.setenv("GMLP_TRITON_UNDER_COMPILE", "1")
    assert not _kernels_under_compile_requested()  # not tracing


@pytest.mark.parametrize(
    ("fn", "names"),
    [
        (gelu_split_layernorm_reference, ("weight", "bias")),
        (spatial_gating_reference, ("norm_weight", "norm_bias")),
    ],
)
def test_reference_annotations_take_the_none_norm_parameters_their_callers_pass(fn: Callable, names) -> None:
    """gelu_split_layernorm and spatial_gating take None LayerNorm parameters (``F.layer_norm``'s no scale /
    no shift) and hand them to these public references on the reference path, which compute with them: the
    annotations said ``Tensor`` only (a type checker flagged every such call)."""
    import typing

    hints = typing.get_type_hints(fn)
    for name in names:
        assert type(None) in typing.get_args(hints[name]), name
    u = torch.randn(3, 2, 8, device=DEVICE)
    w, b = torch.eye(3, device=DEVICE), torch.zeros(3, device=DEVICE)
    z1, z2n = gelu_split_layernorm_reference(u, None, None, 1e-5)
    plain = torch.nn.functional.layer_norm(torch.nn.functional.gelu(u)[..., 4:], (4,))  # no scale, no shift
    torch.testing.assert_close(z2n, plain)
    torch.testing.assert_close(spatial_gating_reference(u, None, None, 1e-5, w, b), z1 * z2n)
