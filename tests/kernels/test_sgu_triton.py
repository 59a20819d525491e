"""The fused Triton GELU + split + LayerNorm kernel equals the reference path (forward and gradients).

On a machine without a GPU the kernels run in Triton's interpreter: tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton when CUDA is unavailable.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gmlp.nn.block as block_module
from gmlp.kernels import gelu_split_layernorm, gelu_split_layernorm_reference, triton_available
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


def test_block_through_the_fused_kernel_equals_reference_block(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    block = GMLPBlock(16, 48, 10, attn_dim=8).to(DEVICE)
    torch.nn.init.normal_(block.sgu.proj.weight, std=0.1)
    torch.nn.init.normal_(block.sgu.norm.weight)
    x = torch.randn(10, 3, 16, device=DEVICE, requires_grad=True)
    mask = torch.ones(3, 10, dtype=torch.bool, device=DEVICE)
    mask[2, 7:] = False
    ref = block(x, mask)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    calls: list[int] = []
    kernel = functools.partial(gelu_split_layernorm, use_triton=True)
    monkeypatch.setattr(block_module, "triton_enabled", lambda x: True)
    monkeypatch.setattr(
        block_module, "gelu_split_layernorm", lambda *a, **k: calls.append(1) or kernel(*a, **k)
    )
    fused = block(x, mask)
    (g_fused,) = torch.autograd.grad(fused.sum(), x)
    assert calls, "the block did not take the fused kernel"
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_fused, g_ref, rtol=1e-4, atol=1e-4)


def test_reference_is_used_off_cuda() -> None:
    u = torch.randn(3, 8)
    w, b = torch.ones(4), torch.zeros(4)
    z1, z2 = gelu_split_layernorm(u, w, b, 1e-5)
    r1, r2 = gelu_split_layernorm_reference(u, w, b, 1e-5)
    assert torch.equal(z1, r1) and torch.equal(z2, r2)
