"""The CPU fast path (oneDNN matmuls; bias and GELU epilogues in inference) equals F.linear (+ F.gelu) and
addmm, forward and gradients, switches off where it must, and never bypasses a wrapped or hooked
projection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from gmlp import create_model
from gmlp.kernels import (
    cpu_fusion_enabled,
    cpu_linear,
    fused_linear,
    fused_linear_reference,
    token_mix,
    token_mix_reference,
)
from gmlp.nn import GMLPBlock

needs_onednn = pytest.mark.skipif(not cpu_linear._HAS_ONEDNN_LINEAR, reason="torch without oneDNN linear")
needs_bf16 = pytest.mark.skipif(not cpu_linear._HAS_ONEDNN_BF16, reason="no oneDNN bf16 on this CPU")


def _f64(t: torch.Tensor | None, grad: bool) -> torch.Tensor | None:
    return None if t is None else t.detach().double().requires_grad_(grad)


@needs_onednn
@settings(max_examples=30, deadline=None)
@given(
    lead=st.sampled_from([(1,), (5,), (3, 4), (2, 1, 3)]),
    fan_in=st.integers(1, 70),
    fan_out=st.integers(1, 70),
    bias=st.booleans(),
    gelu=st.booleans(),
    needs=st.sampled_from(["none", "all", "x", "weights"]),
    seed=st.integers(0, 999),
)
def test_onednn_linear_equals_the_reference(lead, fan_in, fan_out, bias, gelu, needs, seed) -> None:
    """The output and, where autograd records, the gradients of x, weight and bias that require one."""
    torch.manual_seed(seed)
    x = 2 * torch.randn(*lead, fan_in)
    w = torch.randn(fan_out, fan_in) / fan_in**0.5
    b = torch.randn(fan_out) if bias else None
    wants = {"none": (), "all": ("x", "w", "b"), "x": ("x",), "weights": ("w", "b")}[needs]
    leaves = {"x": x, "w": w, "b": b}
    for name in wants:
        if leaves[name] is not None:
            leaves[name].requires_grad_()
    act = "gelu" if gelu else None
    got = fused_linear(x, w, b, act, use_onednn=True)
    ref_leaves = {k: _f64(v, v is not None and v.requires_grad) for k, v in leaves.items()}
    want = fused_linear_reference(ref_leaves["x"], ref_leaves["w"], ref_leaves["b"], act)
    assert got.shape == (*lead, fan_out) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    names = [k for k, v in leaves.items() if v is not None and v.requires_grad]
    if names:
        cot = torch.randn(*lead, fan_out, dtype=torch.float64)
        grads = torch.autograd.grad((got.double() * cot).sum(), [leaves[k] for k in names])
        refs = torch.autograd.grad((want * cot).sum(), [ref_leaves[k] for k in names])
        for name, g, r in zip(names, grads, refs, strict=True):
            torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4, msg=name)


@needs_onednn
@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 30), columns=st.integers(1, 50), seed=st.integers(0, 999), grad=st.booleans())
def test_token_mix_equals_addmm(n: int, columns: int, seed: int, grad: bool) -> None:
    """``W @ Z + b`` and, in training, the gradients of W, Z and b; W may be a strided view (as the Toeplitz
    expansion is)."""
    torch.manual_seed(seed)
    base = torch.randn(n, 2 * n, requires_grad=grad)
    w = base[:, ::2]
    z = torch.randn(n, columns, requires_grad=grad)
    b = torch.randn(n, requires_grad=grad)
    got = token_mix(w, z, b)
    ref_in = [_f64(t, grad) for t in (w, z, b)]
    want = token_mix_reference(*ref_in)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    if grad:
        cot = torch.randn(n, columns, dtype=torch.float64)
        grads = torch.autograd.grad((got.double() * cot).sum(), (w, z, b))
        refs = torch.autograd.grad((want * cot).sum(), ref_in)
        for g, r in zip(grads, refs, strict=True):
            torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("short_rows", [False, True])
def test_weight_gradient_orientation_rule(monkeypatch: pytest.MonkeyPatch, short_rows: bool) -> None:
    """The product's rows are the weight's longer side in fp32 where measured so (AMD), its shorter side on
    Intel CPUs and in bf16; a transposed product (it shows as a non-contiguous result) only for weights of
    at most ``_TRANSPOSED_WEIGHT_GRAD_MAX_ELEMENTS`` over at least ``_TRANSPOSED_WEIGHT_GRAD_MIN_ROWS``."""
    monkeypatch.setattr(cpu_linear, "_FP32_WEIGHT_GRAD_SHORT_ROWS", short_rows)
    monkeypatch.setattr(cpu_linear, "_TRANSPOSED_WEIGHT_GRAD_MIN_ROWS", 7)
    monkeypatch.setattr(cpu_linear, "_TRANSPOSED_WEIGHT_GRAD_MAX_ELEMENTS", 24 * 40)
    for dtype in (torch.float32, torch.bfloat16):
        short = short_rows or dtype is torch.bfloat16
        shapes = ((7, 24, 40), (7, 40, 24), (6, 24, 40), (6, 40, 24), (7, 24, 41), (7, 41, 24))
        for rows, fan_out, fan_in in shapes:
            grad, x = torch.randn(rows, fan_out, dtype=dtype), torch.randn(rows, fan_in, dtype=dtype)
            dw = cpu_linear._weight_grad(grad, x)
            assert dw.shape == (fan_out, fan_in)
            torch.testing.assert_close(dw.float(), grad.float().t() @ x.float(), rtol=0.02, atol=0.05)
            product_rows = dw.shape[0] if dw.is_contiguous() else dw.shape[1]
            if rows < 7 or fan_out * fan_in > 24 * 40:  # too few rows or too large a weight: as written
                assert dw.is_contiguous(), (dtype, rows, fan_out, fan_in)
            else:
                want = min(fan_out, fan_in) if short else max(fan_out, fan_in)
                assert product_rows == want, (dtype, fan_out)


@needs_onednn
@pytest.mark.parametrize("short_rows", [False, True])
@pytest.mark.parametrize(("fan_out", "fan_in"), [(24, 40), (40, 24), (16, 16)])
def test_weight_gradient_of_either_orientation_trains_the_parameter(
    monkeypatch: pytest.MonkeyPatch, fan_out: int, fan_in: int, short_rows: bool
) -> None:
    """Weight gradients computed as a transposed product: the parameter's gradient has its shape, equals
    the reference, and an optimizer step and a second accumulation use it."""
    monkeypatch.setattr(cpu_linear, "_FP32_WEIGHT_GRAD_SHORT_ROWS", short_rows)
    monkeypatch.setattr(cpu_linear, "_TRANSPOSED_WEIGHT_GRAD_MIN_ROWS", 1)
    torch.manual_seed(0)
    fast, ref = torch.nn.Linear(fan_in, fan_out), torch.nn.Linear(fan_in, fan_out)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(3, 7, fan_in)
    for _ in range(2):  # the second backward accumulates into the stored gradient
        fused_linear(x, fast.weight, fast.bias, use_onednn=True).square().sum().backward()
        fused_linear_reference(x, ref.weight, ref.bias).square().sum().backward()
    assert fast.weight.grad.shape == fast.weight.shape
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    for model in (fast, ref):
        torch.optim.AdamW(model.parameters(), lr=0.1).step()
    torch.testing.assert_close(fast.weight, ref.weight, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_double_backward_works_through_the_fast_path() -> None:
    """create_graph=True: the backward runs differentiable ops, so second derivatives match the reference."""
    torch.manual_seed(0)
    x, w, b = torch.randn(5, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True), torch.randn(4)
    wt, z, bt = torch.randn(5, 5, requires_grad=True), torch.randn(5, 7, requires_grad=True), torch.randn(5)
    results = []
    for fast in (True, False):
        y = fused_linear(x, w, b, "gelu", use_onednn=fast)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        (gw,) = torch.autograd.grad(gx.square().sum(), w)
        mix = token_mix(wt, z, bt) if fast else token_mix_reference(wt, z, bt)
        (gz,) = torch.autograd.grad(mix.square().sum(), z, create_graph=True)
        (gwt,) = torch.autograd.grad(gz.square().sum(), wt)
        results.append((gw, gwt))
    for a, r in zip(*results, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_when_the_fast_path_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    x, w = torch.randn(4, 8), torch.randn(6, 8, requires_grad=True)
    assert cpu_fusion_enabled(x, w)  # training
    with torch.no_grad():
        assert cpu_fusion_enabled(x, w)  # and inference
    assert not cpu_fusion_enabled(x.double(), w.double())
    assert not cpu_fusion_enabled(x[:0], w)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 products where oneDNN has bf16 on this CPU
        assert cpu_fusion_enabled(x, w) == cpu_linear._HAS_ONEDNN_BF16
        assert cpu_fusion_enabled(x.bfloat16(), w) == cpu_linear._HAS_ONEDNN_BF16
    with torch.autocast("cpu", dtype=torch.float16):
        assert not cpu_fusion_enabled(x, w)
    with FlopCounterMode(display=False):  # dispatch modes see plain aten ops (the FLOPs get counted)
        assert not cpu_fusion_enabled(x, w)
    monkeypatch.setenv("GMLP_DISABLE_CPU_FUSION", "1")
    assert not cpu_fusion_enabled(x, w)
    monkeypatch.setenv("GMLP_DISABLE_CPU_FUSION", "0")
    assert cpu_fusion_enabled(x, w)
    with pytest.raises(ValueError, match=r"use_onednn=True needs non-empty float32 CPU tensors"):
        fused_linear(x.double(), w.double(), None, use_onednn=True)
    with pytest.raises(ValueError, match=r"activation must be None or 'gelu', got 'relu'"):
        fused_linear(x, w, None, "relu")
    assert fused_linear(x[:0], w, None).shape == (0, 6)  # empty input: the reference path
    # torch.func transforms get plain ops (the oneDNN functions have no vmap rule)
    got = torch.func.grad(lambda v: fused_linear(x, v, None, "gelu").sum())(w.detach())
    want = torch.func.grad(lambda v: fused_linear_reference(x, v, None, "gelu").sum())(w.detach())
    torch.testing.assert_close(got, want)


_BF16 = 2.0**-8  # bf16's unit roundoff: 8 significant bits


@needs_bf16
@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 40),
    fan_in=st.integers(1, 96),
    fan_out=st.integers(1, 96),
    bias=st.booleans(),
    gelu=st.booleans(),
    bf16_input=st.booleans(),
    seed=st.integers(0, 999),
)
def test_bf16_autocast_runs_the_products_in_bf16(rows, fan_in, fan_out, bias, gelu, bf16_input, seed) -> None:
    """Under CPU bf16 autocast the fast path computes what autocast's ``F.linear`` (+ ``F.gelu``) does: a bf16
    result of bf16 operands, within bf16 rounding of it (the fused epilogue rounds once, the reference
    twice), and float32 gradients for float32 leaves within bf16 rounding of the reference's."""
    torch.manual_seed(seed)
    x = 2 * torch.randn(rows, fan_in, dtype=torch.bfloat16 if bf16_input else torch.float32)
    x.requires_grad_()
    w = (torch.randn(fan_out, fan_in) / fan_in**0.5).requires_grad_()
    b = torch.randn(fan_out).requires_grad_() if bias else None
    act = "gelu" if gelu else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            infer = fused_linear(x, w, b, act, use_onednn=True)
        got = fused_linear(x, w, b, act, use_onednn=True)
        want = fused_linear_reference(x, w, b, act)
    assert infer.dtype == got.dtype == want.dtype == torch.bfloat16
    # the products' operands are the same bf16 numbers, so the results differ by the bf16 rounding of the
    # output (and, for the reference's GELU, of its input): a few units of bf16 roundoff at the output's scale
    scale = want.float().abs().amax().item() + 1.0
    for out in (infer, got):
        torch.testing.assert_close(out.float(), want.float(), rtol=4 * _BF16, atol=4 * _BF16 * scale)
    cot = torch.randn(rows, fan_out)
    leaves = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad((got.float() * cot).sum(), leaves)
    refs = torch.autograd.grad((want.float() * cot).sum(), leaves)
    for leaf, g, r in zip(leaves, grads, refs, strict=True):
        assert g.dtype == r.dtype == leaf.dtype
        g_scale = r.float().abs().amax().item() + 1.0
        torch.testing.assert_close(g.float(), r.float(), rtol=8 * _BF16, atol=8 * _BF16 * g_scale)


@needs_bf16
def test_bf16_autocast_model_uses_bf16_products(monkeypatch: pytest.MonkeyPatch, onednn_products) -> None:
    """A vision model under bf16 autocast sends its projections to oneDNN in bf16 and leaves the token mixing
    to autocast's addmm; the features match plain ops under the same autocast within bf16 rounding."""
    torch.manual_seed(0)
    model = create_model("gmlp_micro4_28", img_size=8, in_chans=1).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        monkeypatch.setenv("GMLP_DISABLE_CPU_FUSION", "1")
        want = model.forward_features(x)
        monkeypatch.setenv("GMLP_DISABLE_CPU_FUSION", "0")
        with onednn_products() as calls:
            got = model.forward_features(x)
    depth = len(model.blocks)
    assert calls == [torch.bfloat16] * (3 * depth)  # fc1's two halves and fc2 per block; no token mixing
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)


@needs_onednn
@pytest.mark.parametrize("avx512", [True, False])
def test_default_follows_the_cpu(monkeypatch: pytest.MonkeyPatch, avx512: bool) -> None:
    """Unset, the switch gives the CPU's default: every product on oneDNN with AVX-512; on an AVX2-only CPU,
    where oneDNN's fp32 products ran slower than MKL's, only those into a vocabulary-wide output. ``0``
    sends every product to oneDNN on either CPU, ``1`` none."""
    monkeypatch.setattr(cpu_linear, "_ONEDNN_BY_DEFAULT", avx512)
    calls = []

    def spy(a: torch.Tensor, b: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(b.shape[0])
        return torch.zeros(a.shape[0], b.shape[0])

    monkeypatch.setattr(cpu_linear, "_mm", spy)
    x = torch.randn(2, 8)
    narrow, wide = torch.randn(6, 8), torch.randn(cpu_linear.WIDE_OUTPUT_FEATURES, 8)
    w, z, b = torch.randn(4, 4), torch.randn(4, 5), torch.randn(4)  # the token mixing's _mm: 5 "outputs"
    for setting, want in [(None, [6, wide.shape[0], 5] if avx512 else [wide.shape[0]]),
                          ("0", [6, wide.shape[0], 5]), ("1", [])]:  # fmt: skip
        if setting is None:
            monkeypatch.delenv("GMLP_DISABLE_CPU_FUSION", raising=False)
        else:
            monkeypatch.setenv("GMLP_DISABLE_CPU_FUSION", setting)
        calls.clear()
        with torch.no_grad():
            fused_linear(x, narrow, None)
            fused_linear(x, wide, None)
            token_mix(w, z, b)
        assert calls == want, setting


def test_avx512_detection_reads_atens_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    for capability, want in [("AVX512", True), ("AVX512_BF16", True), ("AVX2", False), ("DEFAULT", False)]:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert cpu_linear._cpu_has_avx512() is want


def test_bf16_autocast_without_onednn_bf16_takes_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU where oneDNN has no bf16, autocast runs as before, and forcing the path names why it can't."""
    monkeypatch.setattr(cpu_linear, "_HAS_ONEDNN_BF16", False)
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not cpu_fusion_enabled(x, w)
        assert fused_linear(x, w, None).dtype == torch.bfloat16  # autocast's F.linear
        with pytest.raises(ValueError, match=r"bf16 autocast True, oneDNN bf16 missing"):
            fused_linear(x, w, None, use_onednn=True)


@needs_onednn
def test_model_takes_the_fast_path_and_matches_plain_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inference outputs, and in training every parameter gradient, as with plain ops; no reference op
    runs while the fast path is on."""
    torch.manual_seed(0)
    model = create_model("gmlp_micro4_28", img_size=8, in_chans=1).eval()  # eval: no stochastic depth
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        cot = torch.randn_like(model.forward_features(x))

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            out = model.forward_features(x)
        model.zero_grad()
        (model.forward_features(x) * cot).sum().backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    monkeypatch.setenv("GMLP_DISABLE_CPU_FUSION", "1")
    want_out, want_grads = run()
    monkeypatch.setenv("GMLP_DISABLE_CPU_FUSION", "0")

    def refuse(*args, **kwargs):
        raise AssertionError("a reference op ran where the oneDNN path should")

    monkeypatch.setattr(cpu_linear, "fused_linear_reference", refuse)
    monkeypatch.setattr(cpu_linear, "token_mix_reference", refuse)
    got_out, got_grads = run()
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == want_grads.keys() and "blocks.0.sgu.proj.weight" in got_grads
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


class _Scaled(nn.Linear):
    """A stand-in for a wrapped projection (LoRA and the like): not exactly ``nn.Linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


@pytest.mark.parametrize("variant", ["sgu", "multiplicative"])
@pytest.mark.parametrize("grad", [False, True])
def test_wrapped_or_hooked_projections_are_not_bypassed(variant: str, grad: bool) -> None:
    """A hook on fc1/fc2 or a replaced fc2 changes the block's output exactly as it changes the modules'
    (checked against a block that computes by calling its modules)."""
    torch.manual_seed(0)
    block = GMLPBlock(16, 32, 6, variant=variant, init_std=0.5).eval()
    x = torch.randn(6, 2, 16)

    def by_modules(b: GMLPBlock) -> torch.Tensor:
        u = F.gelu(b.fc1(b.norm(x)))
        if variant == "sgu":
            z1, z2 = u.chunk(2, dim=-1)
            z = b.sgu.forward_normalized(z1, b.sgu.norm(z2))
        else:
            z = b.sgu(u)
        return x + b.fc2(z)

    with torch.set_grad_enabled(grad):
        plain = block(x)
        torch.testing.assert_close(plain, by_modules(block), rtol=1e-5, atol=1e-5)
        handle = block.fc1.register_forward_hook(lambda m, i, out: out + 1.0)
        hooked = block(x)
        torch.testing.assert_close(hooked, by_modules(block), rtol=1e-5, atol=1e-5)
        handle.remove()
        scaled = _Scaled(block.fc2.in_features, block.fc2.out_features)
        scaled.load_state_dict(block.fc2.state_dict())
        block.fc2 = scaled
        torch.testing.assert_close(block(x), by_modules(block), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hooked, plain) and not torch.allclose(block(x), plain)


@pytest.mark.parametrize("variant", ["sgu", "multiplicative"])
def test_patched_forwards_and_backward_hooks_of_projections_are_honoured(variant: str) -> None:
    """A forward set on the instance (accelerate's offloading hooks patch ``module.forward`` so) changes
    the block's output as it changes the module's, and backward hooks on fc1/fc2 (own or global) run: the
    modules are called, not bypassed by their weights."""
    linear = nn.Linear(2, 2)
    assert cpu_linear.is_plain_linear(linear)
    linear.register_full_backward_hook(lambda *_: None)
    assert not cpu_linear.is_plain_linear(linear)
    torch.manual_seed(0)
    block = GMLPBlock(16, 32, 6, variant=variant, init_std=0.5)
    x = torch.randn(6, 2, 16, requires_grad=True)
    calls: list[str] = []
    handles = [
        block.fc1.register_full_backward_pre_hook(lambda *_: calls.append("fc1")),
        block.fc2.register_full_backward_hook(lambda *_: calls.append("fc2")),
    ]
    block(x).sum().backward()
    assert sorted(calls) == ["fc1", "fc2"]
    for handle in handles:
        handle.remove()
    calls.clear()
    handle = nn.modules.module.register_module_full_backward_hook(
        lambda m, *_: calls.append("fc2") if m is block.fc2 else None
    )
    try:
        block(x).sum().backward()
    finally:
        handle.remove()
    assert calls == ["fc2"]
    with torch.no_grad():
        plain = block(x)
        fc2_forward = block.fc2.forward
        block.fc2.forward = lambda z: 2 * fc2_forward(z)  # type: ignore[method-assign]
        patched = block(x)
        del block.fc2.forward
    torch.testing.assert_close(patched - x, 2 * (plain - x), rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("grad", [False, True])
def test_shapes_outside_the_fast_path_behave_as_f_linear(grad: bool) -> None:
    """Shapes the oneDNN product does not take as F.linear does go to the reference: a 0-d or (1, out)
    bias broadcasts and a 1-D weight works as in F.linear (the oneDNN call gave a wrong result for the
    0-d bias and 'could not create a primitive descriptor' for the others), mismatched sizes raise
    F.linear's / addmm's error, and use_onednn=True names the shapes."""
    x = torch.randn(5, 7, requires_grad=grad)
    w = torch.randn(3, 7, requires_grad=grad)
    for bias in (torch.randn(()), torch.randn(1), torch.randn(1, 3)):
        want = fused_linear_reference(x, w, bias, "gelu")
        torch.testing.assert_close(fused_linear(x, w, bias, "gelu"), want)
    w1 = torch.randn(7)
    torch.testing.assert_close(fused_linear(x, w1, None), F.linear(x, w1))
    with pytest.raises(RuntimeError, match=r"mat1 and mat2 shapes cannot be multiplied \(5x6 and 7x3\)"):
        fused_linear(torch.randn(5, 6), w, None)
    with pytest.raises(ValueError, match=r"use_onednn=True needs x \(\.\.\., in_features\), .* \(5, 6\)"):
        fused_linear(torch.randn(5, 6), w, None, use_onednn=True)
    with pytest.raises(RuntimeError, match=r"mat1 and mat2 shapes cannot be multiplied \(4x4 and 5x6\)"):
        token_mix(torch.randn(4, 4, requires_grad=grad), torch.randn(5, 6), torch.randn(4))
    with pytest.raises(RuntimeError, match="mat2 must be a matrix"):
        token_mix(torch.randn(4, 4), torch.randn(4), torch.randn(4))


@needs_onednn
@pytest.mark.parametrize("causal", [False, True])
def test_text_inference_matches_plain_ops_with_padding(monkeypatch: pytest.MonkeyPatch, causal: bool) -> None:
    """The MLM decoder / LM head and the blocks on the fast path: logits at real tokens as with plain ops."""
    from gmlp.models.text import GMLPConfig, GMLPForCausalLM, GMLPForMaskedLM

    torch.manual_seed(0)
    cfg = GMLPConfig(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                     max_position_embeddings=10, tiny_attn_size=8, spatial_init_std=0.3)  # fmt: skip
    model = (GMLPForCausalLM if causal else GMLPForMaskedLM)(cfg).eval()
    ids = torch.randint(5, 97, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        monkeypatch.setenv("GMLP_DISABLE_CPU_FUSION", "1")
        want = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace:FutureWarning")
def test_traced_and_exported_graphs_keep_portable_ops() -> None:
    """torch.jit.trace and torch.export (the two ONNX exporters' front ends) see F.linear, not oneDNN."""
    model = create_model("gmlp_micro4_28", img_size=8, in_chans=1).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        exported = torch.export.export(model, (x,))
    assert "mkldnn" not in str(traced.inlined_graph) and "linear" in str(traced.inlined_graph)
    assert "mkldnn" not in str(exported.graph) and "linear" in str(exported.graph)


@needs_onednn
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace:FutureWarning")
def test_a_model_traced_with_grad_on_passes_the_tracer_s_own_check() -> None:
    """torch.jit.trace re-runs the model under no_grad to check its graph: the in-place inference path
    must not take part while tracing, or the two graphs differ."""
    model = create_model("gmlp_micro4_28", img_size=8, in_chans=1).eval()
    x = torch.randn(2, 1, 8, 8)
    traced = torch.jit.trace(model, x)  # check_trace=True by default
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


@needs_onednn
def test_forward_mode_ad_gets_the_reference_tangent() -> None:
    """Dual tensors are neither functorch wrappers nor grad-requiring; the oneDNN op has no forward
    derivative, so forward AD must take the plain ops (else the tangent is lost silently)."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    block = GMLPBlock(16, 48, 10).eval()
    for p in block.parameters():
        p.requires_grad_(False)
    x, tangent = torch.randn(10, 3, 16), torch.randn(10, 3, 16)
    with fwAD.dual_level():
        got = fwAD.unpack_dual(block(fwAD.make_dual(x, tangent))).tangent
    _, want = torch.func.jvp(block, (x,), (tangent,))
    assert got is not None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_small_products_take_blas_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Below ``ONEDNN_MIN_FLOPS`` (host cost beats oneDNN's faster kernel) the default is the reference;
    from it on, oneDNN. ``use_onednn=True`` still forces it. (The suite runs with the threshold at 0.)"""
    monkeypatch.setattr(cpu_linear, "ONEDNN_MIN_FLOPS", 2 * 4 * 8 * 6)  # exactly x (4, 8) @ w (8 -> 6)
    calls = []
    monkeypatch.setattr(
        cpu_linear, "_mm", lambda *a: calls.append(a) or torch.zeros(a[0].shape[0], a[1].shape[0])
    )
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    fused_linear(x[:3], w, None)
    assert calls == []
    fused_linear(x[:3], w, None, use_onednn=True)
    fused_linear(x, w, None)
    assert len(calls) == 2
    wt, z, b = torch.randn(4, 4), torch.randn(4, 11), torch.randn(4)  # 2 * 4 * 44 = 352 < 384
    torch.testing.assert_close(token_mix(wt, z, b), token_mix_reference(wt, z, b))
    assert len(calls) == 2
    token_mix(wt, torch.randn(4, 12), b)  # 384
    assert len(calls) == 3


def test_a_bad_threshold_in_the_environment_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GMLP_ONEDNN_MIN_FLOPS", "lots")
    with pytest.raises(ValueError, match=r"GMLP_ONEDNN_MIN_FLOPS must be a number of FLOPs, got 'lots'"):
        cpu_linear._min_flops_from_env()
    monkeypatch.setenv("GMLP_ONEDNN_MIN_FLOPS", "5e6")
    assert cpu_linear._min_flops_from_env() == 5e6
