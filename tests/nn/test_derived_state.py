"""Audit of derived state, caches and frozen parameters in the layers and kernels (twenty-fourth session).

Nothing in :mod:`gmlp.nn` or :mod:`gmlp.kernels` keeps state computed from the parameters: the Toeplitz W,
the causal mask and the oneDNN operands are rebuilt every call. These tests pin that down as properties:

* after every way of changing the parameters (an optimizer step, ``load_state_dict``, ``copy_`` under
  ``no_grad``, ``requires_grad_``, dtype conversion with or without parameter swapping,
  ``torch.func.functional_call``, ``set_input_size``) a layer's output equals that of a freshly built layer
  given the same state;
* no call leaves state behind: a module is freed once deleted, and inputs of many lengths add nothing to
  the modules' attributes or the kernel modules' globals;
* frozen parameters get no gradient from the custom autograd functions (which compute none for them), and
  the trainable ones and the input get the reference path's gradients;
* odd strides, broadcast (expanded) and empty inputs give the contiguous inputs' results.

The fast paths (oneDNN on the CPU) are compared with ``GMLP_DISABLE_CPU_FUSION=1``, the plain ops.
"""

from __future__ import annotations

import gc
import re
import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from fusion_switch import cpu_fusion
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gmlp.kernels.cpu_linear as cpu_linear
import gmlp.kernels.toeplitz as toeplitz_mod
from gmlp.kernels import (
    fused_linear,
    fused_linear_reference,
    toeplitz_matrix,
    toeplitz_matrix_reference,
    token_mix,
    token_mix_reference,
)
from gmlp.models.vision import GMLPVision
from gmlp.nn import GMLPBlock, TinyAttention, TokenLinear, TokenProjection

SEQ, DIM, FFN = 6, 8, 16

needs_onednn = pytest.mark.skipif(not cpu_linear._HAS_ONEDNN_LINEAR, reason="torch without oneDNN linear")

#: Block configurations that cover every derived quantity: the dense W, the Toeplitz expansion (dense, with
#: the diagonal-sum backward, and by FFT), the causal mask, heads, the tiny attention and the mixer's MLP.
CONFIGS: dict[str, dict[str, object]] = {
    "dense": {},
    "toeplitz": {"toeplitz": True},
    "toeplitz-fft": {"toeplitz": True, "fft_threshold": 2},
    "causal-toeplitz": {"toeplitz": True, "causal": True},
    "heads": {"heads": 2},
    "amlp": {"attn_dim": 4},
    "mixer": {"variant": "mixer"},
    "multiplicative": {"variant": "multiplicative"},
}


@pytest.fixture(autouse=True)
def _diagonal_sums_at_any_length(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Toeplitz expansion takes its custom autograd function at these tiny lengths too."""
    monkeypatch.setattr(toeplitz_mod, "DIAGONAL_SUM_MIN_TOKENS", 1)


def make_block(config: str, seed: int = 0) -> GMLPBlock:
    torch.manual_seed(seed)
    block = GMLPBlock(DIM, FFN, SEQ, **CONFIGS[config])  # type: ignore[arg-type]
    with torch.no_grad():  # away from the near-identity init, so every parameter shows in the output
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    return block


def fresh_copy(block: nn.Module, config: str) -> GMLPBlock:
    """A newly built block of ``config`` given ``block``'s state (dtype and requires_grad included)."""
    other = make_block(config, seed=123)
    dtype = next(block.parameters()).dtype
    other.to(dtype).load_state_dict(block.state_dict())
    for (_, p), (_, q) in zip(block.named_parameters(), other.named_parameters(), strict=True):
        q.requires_grad_(p.requires_grad)
    return other.train(block.training)


def run(block: nn.Module, x: torch.Tensor, grad: bool) -> torch.Tensor:
    """The block's output, in training with autograd recording (``grad``) or in inference (the in-place
    paths), with a padding mask (so the masked paths run too)."""
    mask = torch.ones(x.shape[1], x.shape[0], dtype=torch.bool)
    mask[0, -1] = False
    block.train(grad)
    with torch.set_grad_enabled(grad):
        return block(x, mask).detach()


def _sgd_step(block: nn.Module, x: torch.Tensor) -> None:
    opt = torch.optim.SGD(block.parameters(), lr=0.5)
    block.train()
    (block(x) ** 2).mean().backward()
    opt.step()


def _adamw_foreach_step(block: nn.Module, x: torch.Tensor) -> None:
    opt = torch.optim.AdamW(block.parameters(), lr=0.1, foreach=True)
    block.train()
    (block(x) ** 2).mean().backward()
    opt.step()


def _load_other(block: nn.Module, x: torch.Tensor) -> None:
    block.load_state_dict(make_block(block.config, seed=7).state_dict())  # type: ignore[attr-defined]


def _load_assign(block: nn.Module, x: torch.Tensor) -> None:
    """``assign=True``: the parameters are replaced by the state dict's tensors (new objects)."""
    block.load_state_dict(make_block(block.config, seed=8).state_dict(), assign=True)  # type: ignore[attr-defined]


def _copy_(block: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.3)


def _freeze(block: nn.Module, x: torch.Tensor) -> None:
    block.requires_grad_(False)


def _freeze_then_thaw(block: nn.Module, x: torch.Tensor) -> None:
    block.requires_grad_(False)
    run(block, x, True)
    block.requires_grad_(True)
    _copy_(block, x)


#: In-place changes of the parameters (float32 kept): name -> mutation(block, x).
MUTATIONS: dict[str, Callable[[nn.Module, torch.Tensor], None]] = {
    "sgd-step": _sgd_step,
    "adamw-foreach-step": _adamw_foreach_step,
    "load_state_dict": _load_other,
    "load_state_dict-assign": _load_assign,
    "no_grad-copy_": _copy_,
    "requires_grad_(False)": _freeze,
    "requires_grad_-toggled": _freeze_then_thaw,
}


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("mutation", list(MUTATIONS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_output_after_a_parameter_change_equals_a_fresh_block(config: str, mutation: str, grad: bool) -> None:
    """Whatever ran before (forward and backward, fast path) leaves nothing that outlives a change of the
    parameters: the output afterwards is that of a new block loaded with the new state."""
    block = make_block(config)
    block.config = config  # type: ignore[assignment]  (for _load_other)
    x = torch.randn(SEQ - 1, 3, DIM)
    before = run(block, x, grad)
    run(block, x, not grad)
    MUTATIONS[mutation](block, x)
    after = run(block, x, grad)
    expected = run(fresh_copy(block, config), x, grad)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)
    if mutation not in ("requires_grad_(False)",):
        assert not torch.equal(after, before)  # the change did reach the output


@pytest.mark.parametrize("swap", [False, True], ids=["assign", "swap-tensors"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_output_after_a_dtype_conversion_equals_a_fresh_block(
    config: str, dtype: torch.dtype, swap: bool
) -> None:
    """``.to(dtype)`` (also with ``torch.__future__.set_swap_module_params_on_conversion``, which swaps the
    parameter tensors' contents in place) after a fast-path forward and backward: the converted block gives
    a fresh block's output for that dtype."""
    block = make_block(config)
    x = torch.randn(SEQ, 2, DIM)
    run(block, x, True)
    run(block, x, False)
    old = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        block.to(dtype)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(old)
    assert all(p.dtype == dtype for p in block.parameters())
    xd = x.to(dtype)
    for grad in (False, True):
        expected = run(fresh_copy(block, config), xd, grad)
        torch.testing.assert_close(run(block, xd, grad), expected, rtol=0, atol=0)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_functional_call_uses_the_substituted_parameters_and_leaves_none_behind(config: str) -> None:
    """``torch.func.functional_call`` with other parameters (here requiring grad, as in meta-learning) gives
    a fresh block's output and gradients for them, and the block's own output afterwards is unchanged."""
    block = make_block(config)
    x = torch.randn(SEQ - 2, 2, DIM)
    own = run(block, x, True)
    other = make_block(config, seed=5)
    params = {k: v.detach().clone().requires_grad_() for k, v in other.named_parameters()}
    block.train()
    out = torch.func.functional_call(block, params, (x,))
    out.pow(2).sum().backward()
    ref = other.train()(x)
    ref.pow(2).sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for name, p in other.named_parameters():
        torch.testing.assert_close(params[name].grad, p.grad, msg=name)
    assert all(p.grad is None for p in block.parameters())
    torch.testing.assert_close(run(block, x, True), own, rtol=0, atol=0)


def test_set_input_size_gives_a_fresh_models_output_for_the_resampled_state() -> None:
    """After ``set_input_size`` (W and b resampled, the lengths of every layer changed) the model computes
    what a model built at the new size and loaded with its state computes."""
    kwargs = {"patch_size": 4, "embed_dim": 8, "depth": 2, "num_classes": 3, "mlp_ratio": 2.0, "attn_dim": 4}
    torch.manual_seed(0)
    model = GMLPVision(img_size=8, **kwargs).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
        model(torch.randn(2, 3, 8, 8))
    model.set_input_size(12)
    fresh = GMLPVision(img_size=12, **kwargs).eval()  # type: ignore[arg-type]
    fresh.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(images), fresh(images), rtol=0, atol=0)


# --- nothing left behind ---------------------------------------------------------------------------------


@pytest.mark.parametrize("config", list(CONFIGS))
def test_a_deleted_block_is_freed_after_forward_and_backward(config: str) -> None:
    """No module-level cache or autograd context keeps a block (or its parameters) alive once the block and
    its outputs are gone."""
    block = make_block(config)
    x = torch.randn(SEQ, 2, DIM, requires_grad=True)
    block(x).sum().backward()
    with torch.no_grad():
        block.eval()(x)
    refs = [weakref.ref(block)] + [weakref.ref(p) for p in block.parameters()]
    del block
    gc.collect()
    assert all(r() is None for r in refs)


def _kernel_state() -> dict[str, int]:
    """The size of every container held at module level in gmlp.nn and gmlp.kernels."""
    sizes = {}
    for name, module in list(sys.modules.items()):
        if name.startswith(("gmlp.nn", "gmlp.kernels")) and module is not None:
            for attr, value in vars(module).items():
                if isinstance(value, (dict, list, set)) and not attr.startswith("__"):
                    sizes[f"{name}.{attr}"] = len(value)
    return sizes


def _module_state(blocks: list[GMLPBlock]) -> list[dict[str, int | None]]:
    """Every submodule's attribute names, with the length of those that are containers."""
    return [
        {k: len(v) if isinstance(v, (dict, list, set, tuple)) else None for k, v in vars(m).items()}
        for b in blocks
        for m in b.modules()
    ]


def test_many_input_lengths_grow_no_state() -> None:
    """Inputs of every length up to ``seq_len`` (in training and inference, every token-mixing path) add no
    attribute, buffer or module-level entry: nothing is cached per shape."""
    seq = 40
    blocks = [
        GMLPBlock(DIM, FFN, seq, toeplitz=True, fft_threshold=20),
        GMLPBlock(DIM, FFN, seq, causal=True, heads=2),
        GMLPBlock(DIM, FFN, seq, attn_dim=4),
        GMLPBlock(DIM, FFN, seq, variant="mixer"),
    ]
    attrs = _module_state(blocks)
    state = _kernel_state()
    for n in range(1, seq + 1):
        x = torch.randn(n, 1, DIM, requires_grad=True)
        for block in blocks:
            block(x).sum().backward()
            with torch.no_grad():
                block(x)
    assert _kernel_state() == state
    assert _module_state(blocks) == attrs


# --- frozen parameters -------------------------------------------------------------------------------------


@contextmanager
def counting(name: str) -> Iterator[list[int]]:
    """Count the calls of ``gmlp.kernels.cpu_linear.<name>`` (looked up at call time by the functions)."""
    calls = [0]
    original = getattr(cpu_linear, name)

    def wrapper(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        return original(*args, **kwargs)

    setattr(cpu_linear, name, wrapper)
    try:
        yield calls
    finally:
        setattr(cpu_linear, name, original)


FLAGS = st.tuples(st.booleans(), st.booleans(), st.booleans())


@needs_onednn
@settings(max_examples=12, deadline=None, derandomize=True)
@given(needs=FLAGS, create_graph=st.booleans())
def test_fused_linear_computes_gradients_only_for_inputs_that_need_them(
    needs: tuple[bool, bool, bool], create_graph: bool
) -> None:
    """The oneDNN linear's backward takes ``ctx.needs_input_grad``: no product for a frozen weight (the
    weight gradient) or a frozen input (the input gradient), no gradient for a frozen bias, and the others
    equal to ``F.linear``'s."""
    torch.manual_seed(0)
    base = (torch.randn(5, 3, 8), torch.randn(6, 8), torch.randn(6))
    ours = [t.clone().requires_grad_(need) for t, need in zip(base, needs, strict=True)]
    ref = [t.clone().requires_grad_(need) for t, need in zip(base, needs, strict=True)]
    with counting("_mm") as mm, counting("_weight_grad") as weight_grad:
        y = fused_linear(*ours, "gelu", use_onednn=True)
        forward_products = mm[0]
        expected = fused_linear_reference(*ref, "gelu")
        torch.testing.assert_close(y, expected)
        if not any(needs):
            assert not y.requires_grad
            return
        g = torch.randn_like(y)
        got = torch.autograd.grad(y, [t for t in ours if t.requires_grad], g, create_graph=create_graph)
    want = torch.autograd.grad(expected, [t for t in ref if t.requires_grad], g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    if not create_graph:  # (a double backward takes plain ops)
        assert mm[0] - forward_products == int(needs[0])  # the input gradient, on oneDNN
        assert weight_grad[0] == int(needs[1])


@needs_onednn
@settings(max_examples=12, deadline=None, derandomize=True)
@given(needs=FLAGS, create_graph=st.booleans())
def test_token_mix_computes_gradients_only_for_inputs_that_need_them(
    needs: tuple[bool, bool, bool], create_graph: bool
) -> None:
    """As above for the token mixing ``W @ Z + b``: a frozen W (a frozen token-mixing layer) costs no
    weight-gradient product, an input that needs no gradient no input-gradient product."""
    torch.manual_seed(0)
    base = (torch.randn(7, 7), torch.randn(7, 12), torch.randn(7))
    ours = [t.clone().requires_grad_(need) for t, need in zip(base, needs, strict=True)]
    ref = [t.clone().requires_grad_(need) for t, need in zip(base, needs, strict=True)]
    with counting("_mm") as mm, cpu_fusion(True):
        y = token_mix(*ours)
        forward_products = mm[0]
        expected = token_mix_reference(*ref)
        torch.testing.assert_close(y, expected)
        assert forward_products == 1  # the fast path ran
        if not any(needs):
            assert not y.requires_grad
            return
        g = torch.randn_like(y)
        got = torch.autograd.grad(y, [t for t in ours if t.requires_grad], g, create_graph=create_graph)
    want = torch.autograd.grad(expected, [t for t in ref if t.requires_grad], g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    if not create_graph:
        assert mm[0] - forward_products == int(needs[0]) + int(needs[1])


def test_a_frozen_toeplitz_weight_records_no_graph() -> None:
    """The diagonal-sum expansion of a frozen Toeplitz weight is a plain tensor (no autograd node); of a
    trainable one, the reference's gradient."""
    w = torch.randn(2, 9)
    assert not toeplitz_matrix(w, 4, 5, diagonal_sums=True).requires_grad
    a, b = w.clone().requires_grad_(), w.clone().requires_grad_()
    g = torch.randn(2, 4, 4)
    toeplitz_matrix(a, 4, 5, diagonal_sums=True).backward(g)
    toeplitz_matrix_reference(b, 4, 5).backward(g)
    torch.testing.assert_close(a.grad, b.grad)


def _grads(block: nn.Module, x: torch.Tensor, fast: bool) -> tuple[torch.Tensor, ...]:
    block.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x.requires_grad)
    with cpu_fusion(fast):
        out = block(x)
    weights = torch.linspace(-1.0, 1.0, out.numel()).view_as(out)
    (out * weights).sum().backward()
    return (out.detach(), x.grad, *(p.grad for p in block.parameters()))


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    config=st.sampled_from(list(CONFIGS)),
    frozen=st.lists(st.booleans(), min_size=16, max_size=16),
    input_grad=st.booleans(),
)
def test_partially_frozen_blocks_match_the_reference_gradients(
    config: str, frozen: list[bool], input_grad: bool
) -> None:
    """Any subset of a block's parameters frozen (head-only fine-tuning, a frozen token-mixing W, LoRA-style
    frozen projections), with or without an input that needs its gradient (attribution): the fast path's
    output and gradients equal the plain ops', and every frozen parameter's gradient stays None."""
    block = make_block(config).train()
    params = list(block.parameters())
    for p, off in zip(params, frozen, strict=False):
        p.requires_grad_(not off)
    if not input_grad and not any(p.requires_grad for p in params):
        params[0].requires_grad_(True)
    x = torch.randn(SEQ - 1, 2, DIM, requires_grad=input_grad)
    fast, ref = _grads(block, x, True), _grads(block, x, False)
    for a, b in zip(fast, ref, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)
    assert (fast[1] is None) == (not input_grad)
    for p, g in zip(params, fast[2:], strict=True):
        assert (g is None) == (not p.requires_grad)


# --- layouts: strides, broadcasts, empty inputs ------------------------------------------------------------


def _layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``x``'s values in other layouts: transposed storage, strided rows and channels, a negative-step
    free permutation, a broadcast (expanded) one (for an ``x`` whose rows are all equal) and an offset."""
    n, b, c = x.shape
    wide = torch.zeros(n, b, 2 * c)
    wide[..., ::2] = x
    padded = torch.zeros(n, b, c + 3)
    padded[..., 1 : c + 1] = x
    flat = torch.zeros(x.numel() + 5)
    flat[5:] = x.reshape(-1)
    return {
        "batch-major": torch.empty(b, n, c).transpose(0, 1).copy_(x),
        "channel-major": torch.empty(c, b, n).permute(2, 1, 0).copy_(x),
        "strided-channels": wide[..., ::2],
        "padded-rows": padded[..., 1 : c + 1],
        "storage-offset": flat[5:].view(n, b, c),
    }


@needs_onednn
@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    shape=st.tuples(st.integers(1, 4), st.integers(1, 3)),
    activation=st.sampled_from([None, "gelu"]),
    weight_layout=st.sampled_from(["contiguous", "transposed", "strided"]),
)
def test_fused_linear_takes_any_layout(
    shape: tuple[int, int], activation: str | None, weight_layout: str
) -> None:
    """The oneDNN linear gives ``F.linear``'s values and gradients for inputs and weights of any strides."""
    torch.manual_seed(0)
    x = torch.randn(*shape, 8)
    w = torch.randn(6, 8)
    w_in = {
        "contiguous": w,
        "transposed": w.t().contiguous().t(),
        "strided": torch.zeros(6, 16).index_copy_(1, torch.arange(0, 16, 2), w)[:, ::2],
    }[weight_layout]
    b = torch.randn(6)
    ref_x, ref_w = x.clone().requires_grad_(), w.clone().requires_grad_()
    expected = fused_linear_reference(ref_x, ref_w, b, activation)
    g = torch.randn_like(expected)
    want = torch.autograd.grad(expected, (ref_x, ref_w), g)
    for name, xv in {"contiguous": x, **_layouts(x)}.items():
        xv = xv.detach().requires_grad_()
        wv = w_in.detach().requires_grad_()
        y = fused_linear(xv, wv, b, activation, use_onednn=True)
        torch.testing.assert_close(y, expected, msg=name)
        for got, ref in zip(torch.autograd.grad(y, (xv, wv), g), want, strict=True):
            torch.testing.assert_close(got, ref, msg=name)
        with torch.no_grad():
            y = fused_linear(xv, wv, b, activation, use_onednn=True)
            torch.testing.assert_close(y, expected, msg=name)


@needs_onednn
def test_token_mix_takes_any_layout() -> None:
    """The oneDNN token mixing gives ``addmm``'s values and gradients for transposed, sliced (a shorter
    sequence's leading block of W) and broadcast operands."""
    torch.manual_seed(0)
    w, z, b = torch.randn(7, 7), torch.randn(7, 12), torch.randn(7)
    leading = torch.zeros(9, 9)
    leading[:7, :7] = w
    leading = leading[:7, :7]  # (as W[:n, :n] of a layer built for 9 tokens)
    cases = {
        "w-transposed": (w.t().contiguous().t(), z, b),
        "w-leading-block": (leading, z, b),
        "z-transposed": (w, z.t().contiguous().t(), b),
        "z-broadcast": (w, z[:, :1].expand(7, 12), b),
        "b-broadcast": (w, z, b[:1].expand(7)),
        "b-strided": (w, z, torch.zeros(14).index_copy_(0, torch.arange(0, 14, 2), b)[::2]),
    }
    for name, (wv, zv, bv) in cases.items():
        ours = [t.detach().requires_grad_() for t in (wv, zv, bv)]
        ref = [t.detach().contiguous().requires_grad_() for t in (wv, zv, bv)]
        with counting("_mm") as mm, cpu_fusion(True):
            y = token_mix(*ours)
        assert mm[0] == 1, name  # the fast path ran
        expected = token_mix_reference(*ref)
        torch.testing.assert_close(y, expected, msg=name)
        g = torch.randn_like(y)
        want = torch.autograd.grad(expected, ref, g)
        for got, ref_grad in zip(torch.autograd.grad(y, ours, g), want, strict=True):
            torch.testing.assert_close(got, ref_grad, msg=name)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_blocks_take_any_input_layout(config: str) -> None:
    """A block's output and input gradient for a non-contiguous input (a batch-major tensor transposed to
    token-major, strided or offset channels) equal those for the contiguous input, in training and in
    inference (where the in-place paths read the input)."""
    block = make_block(config)
    x = torch.randn(SEQ - 1, 3, DIM)
    for grad in (False, True):
        block.train(grad)
        ref_x = x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            expected = block(ref_x)
        g = torch.randn_like(expected)
        want = torch.autograd.grad(expected, ref_x, g)[0] if grad else None
        for name, xv in _layouts(x).items():
            xv = xv.detach().requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                y = block(xv)
            torch.testing.assert_close(y, expected, msg=name)
            if grad:
                torch.testing.assert_close(torch.autograd.grad(y, xv, g)[0], want, msg=name)
            assert torch.equal(xv, x)  # the input is read, never written


@pytest.mark.parametrize("config", list(CONFIGS))
def test_blocks_take_an_empty_batch(config: str) -> None:
    """A batch of no samples gives an empty output and zero parameter gradients, on every path."""
    block = make_block(config).train()
    x = torch.randn(SEQ, 0, DIM, requires_grad=True)
    out = block(x)
    assert out.shape == (SEQ, 0, DIM)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for name, p in block.named_parameters():
        assert p.grad is not None and not p.grad.any(), name
    with torch.no_grad():
        assert block.eval()(x).shape == (SEQ, 0, DIM)


def test_token_projection_takes_a_broadcast_input() -> None:
    """An expanded input (all samples one tensor, stride 0) is mixed as its contiguous copy, on the dense,
    heads and FFT paths."""
    torch.manual_seed(0)
    z = torch.randn(SEQ, 1, DIM).expand(SEQ, 4, DIM)
    for proj in (
        TokenProjection(SEQ, init_std=0.3),
        TokenProjection(SEQ, init_std=0.3, heads=2),
        TokenProjection(SEQ, init_std=0.3, toeplitz=True, fft_threshold=1),
    ):
        torch.testing.assert_close(proj(z), proj(z.contiguous()))


# --- parameters on another device than the input (a partially materialised model) --------------------------


def test_token_linear_refuses_an_input_on_another_device() -> None:
    """torch's addmm takes a meta input with CPU weights and returns a CPU tensor of uninitialised memory;
    the mixer's token layer names the mismatch instead (as TokenProjection does). Meta on both sides still
    infers shapes."""
    layer = TokenLinear(6, 5, init_std=0.1)
    with pytest.raises(ValueError, match=r"z is on meta but the module's parameters are on cpu"):
        layer(torch.randn(4, 2, 3, device="meta"))
    with pytest.raises(ValueError, match=r"z is on cpu but the module's parameters are on meta"):
        TokenLinear(6, 5, init_std=0.1).to("meta")(torch.randn(4, 2, 3))
    assert TokenLinear(6, 5, init_std=0.1).to("meta")(torch.randn(4, 2, 3, device="meta")).shape == (5, 2, 3)


@pytest.mark.parametrize("layer", ["qkv", "out"])
def test_tiny_attention_refuses_weights_left_on_meta(layer: str) -> None:
    """A model built on the meta device whose tiny attention a checkpoint did not fill (a gMLP checkpoint
    loaded into an aMLP with ``load_state_dict(..., strict=False, assign=True)``): ``F.linear`` without a
    bias takes CPU activations with the meta ``qkv`` weight and returns uninitialised memory, and the
    output projection's error names no argument. Both are a clear error now, also through the block."""
    torch.manual_seed(0)
    block = GMLPBlock(DIM, FFN, SEQ, attn_dim=4)
    getattr(block.tiny_attn, layer).to("meta")
    x = torch.randn(SEQ, 2, DIM)
    with pytest.raises(ValueError, match=r"x is on cpu but the attention's parameters are on meta"):
        block.tiny_attn(x)
    named = rf"x is on cpu but the block's parameter tiny_attn\.{layer}\.weight is on meta"
    with pytest.raises(ValueError, match=named):
        block(x)
    with pytest.raises(ValueError, match=r"x is on meta but the attention's parameters are on cpu"):
        TinyAttention(DIM, 4, 8)(torch.randn(SEQ, 2, DIM, device="meta"))
    meta = TinyAttention(DIM, 4, 8).to("meta")
    assert meta(torch.randn(SEQ, 2, DIM, device="meta")).shape == (SEQ, 2, 8)


def _meta_parameter_names(config: str) -> list[str]:
    return [name for name, _ in make_block(config).named_parameters()]


@pytest.mark.parametrize(
    ("config", "name"),
    [(c, name) for c in ("amlp", "heads", "mixer", "toeplitz-fft") for name in _meta_parameter_names(c)],
)
def test_a_parameter_left_on_meta_is_named_not_computed_with(config: str, name: str) -> None:
    """One parameter on the meta device (a model built on meta whose checkpoint lacked that key, loaded with
    ``assign=True``), the others on the CPU: ``F.linear`` with a meta weight and a CPU bias, and ``einsum``
    with a meta W, return a CPU tensor of uninitialised memory without an error; other ops raise torch's
    "Tensor on device meta is not on the expected device cpu!", which names nothing. The block names the
    parameter, in training and in inference."""
    block = make_block(config)
    owner, _, attr = name.rpartition(".")
    module = block.get_submodule(owner)
    setattr(module, attr, nn.Parameter(torch.empty_like(getattr(module, attr), device="meta")))
    x = torch.randn(SEQ, 2, DIM)
    for grad in (False, True):
        block.train(grad)
        expected = rf"x is on cpu but the block's parameter {re.escape(name)} is on meta .*holds no values"
        if name == "fc1.weight":  # (the block's first weight: its own, earlier message)
            expected = r"x is on cpu but the block's parameters are on meta"
        with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=expected):
            block(x)


def test_fused_linear_refuses_a_meta_weight_with_real_inputs() -> None:
    """``F.linear`` takes a CPU input with a meta weight (and a CPU bias, or none) and returns uninitialised
    memory; :func:`fused_linear` says which tensor holds no values. Meta on both sides infers shapes."""
    weight = torch.empty(5, 4, device="meta")
    for bias in (None, torch.randn(5)):
        for activation in (None, "gelu"):
            with pytest.raises(ValueError, match=r"weight is on meta but x is on cpu"):
                fused_linear(torch.randn(3, 4), weight, bias, activation)
    assert fused_linear(torch.empty(3, 4, device="meta"), weight, None).shape == (3, 5)
