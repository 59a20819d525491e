"""In-place finishing of the gating product and the residual sum in inference (gmlp.nn._inplace)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gmlp.nn.block as block_module
import gmlp.nn.sgu as sgu_module
from gmlp.nn import GMLPBlock, SpatialGatingUnit
from gmlp.nn._inplace import may_update_in_place


def randomize_(module: nn.Module, std: float = 0.3) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def spy_on(monkeypatch: pytest.MonkeyPatch, seen: list[bool]) -> None:
    """Record every answer of ``may_update_in_place`` in the block and the SGU into ``seen``."""

    def spy(out: torch.Tensor, other: torch.Tensor) -> bool:
        seen.append(may_update_in_place(out, other))
        return seen[-1]

    monkeypatch.setattr(block_module, "may_update_in_place", spy)
    monkeypatch.setattr(sgu_module, "may_update_in_place", spy)


@pytest.fixture
def decisions(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The answers of ``may_update_in_place`` in the block and the SGU, in call order."""
    seen: list[bool] = []
    spy_on(monkeypatch, seen)
    return seen


def out_of_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route the block and the SGU through their out-of-place ops only."""
    monkeypatch.setattr(block_module, "may_update_in_place", lambda *_: False)
    monkeypatch.setattr(sgu_module, "may_update_in_place", lambda *_: False)


@settings(deadline=None, max_examples=25)
@given(
    n=st.integers(1, 10),
    batch=st.integers(1, 3),
    toeplitz=st.booleans(),
    heads=st.sampled_from([1, 2]),
    attn=st.booleans(),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_block_inference_in_place_equals_out_of_place(n, batch, toeplitz, heads, attn, masked, seed) -> None:
    """Under no_grad the block takes the in-place ops (the spy sees it), with the very same output as the
    out-of-place ops, bit for bit, for every layout of the SGU, with and without tiny attention and a
    padding mask."""
    torch.manual_seed(seed)
    attn_dim = 4 if attn else None
    block = randomize_(GMLPBlock(8, 16, 10, toeplitz=toeplitz, heads=heads, attn_dim=attn_dim)).eval()
    x = torch.randn(n, batch, 8)
    mask = torch.rand(batch, n) > 0.3 if masked else None
    with pytest.MonkeyPatch.context() as mp:
        seen: list[bool] = []
        spy_on(mp, seen)
        with torch.no_grad():
            fast = block(x, mask)
        assert seen == [True, True]  # the gating product, then the residual sum
        out_of_place(mp)
        with torch.no_grad():
            slow = block(x, mask)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("variant", ["multiplicative", "additive", "linear"])
def test_sgu_variants_in_place_equal_out_of_place(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    sgu = randomize_(SpatialGatingUnit(12, 6, variant=variant))
    z = torch.randn(6, 2, 12)
    with torch.no_grad():
        fast = sgu(z)
        out_of_place(monkeypatch)
        slow = sgu(z)
    assert torch.equal(fast, slow)


def test_never_in_place_while_autograd_records(decisions: list[bool]) -> None:
    """Training, or an eval-mode model called with grad enabled: autograd needs the old values."""
    block = randomize_(GMLPBlock(8, 16, 10)).eval()
    block(torch.randn(5, 2, 8)).sum().backward()  # parameters require grad
    assert decisions == [False, False]
    assert all(p.grad is not None for p in block.parameters())


def test_in_place_when_nothing_requires_grad(decisions: list[bool]) -> None:
    block = randomize_(GMLPBlock(8, 16, 10)).eval().requires_grad_(False)
    block(torch.randn(5, 2, 8))
    assert decisions == [True, True]


def test_active_dropout_keeps_the_residual_out_of_place(decisions: list[bool], monkeypatch) -> None:
    """Dropout or drop path in training mode is no identity: the residual sum keeps its modules."""
    block = randomize_(GMLPBlock(8, 16, 10, dropout=0.5, drop_path=0.3)).train()
    x = torch.randn(5, 4, 8)
    torch.manual_seed(0)
    with torch.no_grad():
        fast = block(x)
    assert decisions == [True]  # the gating product only
    out_of_place(monkeypatch)
    torch.manual_seed(0)
    with torch.no_grad():
        slow = block(x)
    assert torch.equal(fast, slow)


def test_hooked_outputs_are_never_changed() -> None:
    """A forward hook that keeps the gate (on ``sgu.proj``) or ``fc2``'s output (feature extraction, say)
    still holds the value the layer returned; a hook on dropout still runs."""
    block = randomize_(GMLPBlock(8, 16, 10)).eval()
    kept: dict[str, torch.Tensor] = {}
    block.sgu.proj.register_forward_hook(lambda m, args, out: kept.update(gate=out, gate_in=args[0]))
    block.fc2.register_forward_hook(lambda m, args, out: kept.update(fc2=out, fc2_in=args[0]))
    calls = []
    block.dropout.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        y = block(torch.randn(5, 2, 8))
        assert torch.equal(kept["gate"], block.sgu.proj(kept["gate_in"]))
        assert torch.equal(kept["fc2"], block.fc2(kept["fc2_in"]))
    assert calls == [1] and y.shape == (5, 2, 8)


def test_global_hook_keeps_everything_out_of_place(decisions: list[bool]) -> None:
    handle = nn.modules.module.register_module_forward_hook(lambda *_: None)
    try:
        block = randomize_(GMLPBlock(8, 16, 10)).eval()
        with torch.no_grad():
            block(torch.randn(5, 2, 8))
    finally:
        handle.remove()
    assert decisions == []  # hookless() fails first: the in-place test is never reached


def test_autocast_keeps_the_out_of_place_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under CPU bf16 autocast the residual stream stays float32 while fc2 gives bf16: no in-place sum
    into the narrower tensor (the result would lose the float32 residual)."""
    block = randomize_(GMLPBlock(8, 16, 10)).eval()
    x = torch.randn(5, 2, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast = block(x)
        out_of_place(monkeypatch)
        slow = block(x)
    assert fast.dtype == slow.dtype == torch.float32
    assert torch.equal(fast, slow)


def test_bf16_on_the_cpu_stays_out_of_place(decisions: list[bool], monkeypatch: pytest.MonkeyPatch) -> None:
    """bfloat16 CPU tensors keep the out-of-place ops (faster there), under autocast and in a bf16 model,
    with the same output as the plain ops; float16 still goes in place."""
    assert not may_update_in_place(torch.randn(3, 4).bfloat16(), torch.randn(3, 4).bfloat16())
    assert may_update_in_place(torch.randn(3, 4).half(), torch.randn(3, 4).half())
    block = randomize_(GMLPBlock(8, 16, 10)).eval()
    x = torch.randn(5, 2, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)  # gating product on bf16 tensors, the residual sum promoted to float32
    assert decisions == [False, False] and y.dtype == torch.float32
    decisions.clear()
    bf16_block = randomize_(GMLPBlock(8, 16, 10)).eval().bfloat16()
    with torch.no_grad():
        fast = bf16_block(x.bfloat16())
    assert decisions == [False, False]
    out_of_place(monkeypatch)
    with torch.no_grad():
        assert torch.equal(fast, bf16_block(x.bfloat16()))


def test_may_update_in_place_refuses_broadcast_and_promotion() -> None:
    a = torch.randn(3, 4)
    assert may_update_in_place(a, torch.randn(3, 4))
    assert not may_update_in_place(torch.randn(1, 4), torch.randn(3, 4))  # out would have to grow
    assert not may_update_in_place(a.bfloat16(), a)  # out-of-place promotes to float32
    assert not may_update_in_place(a, torch.randn(3, 4, requires_grad=True))
    with torch.no_grad():
        assert may_update_in_place(a, torch.randn(3, 4, requires_grad=True))
