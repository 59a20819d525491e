"""torch.compile(fullgraph=True) captures the vision models and the layers without graph breaks.

The ``aot_eager`` backend traces forward and backward graphs exactly as inductor would receive them but
skips code generation, so graph breaks (which ``fullgraph=True`` turns into errors) are found in seconds.
"""

from __future__ import annotations

import pytest
import torch

from gmlp import create_model
from gmlp.nn import GMLPBlock


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_vision_model_compiles_fullgraph_for_training_and_inference(grad_checkpointing: bool) -> None:
    model = create_model("gmlp_micro4_28", drop_path_rate=0.1)
    model.set_grad_checkpointing(grad_checkpointing)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 1, 28, 28)
    model.eval()
    torch.testing.assert_close(compiled(x), model(x))
    model.train()
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("toeplitz", [False, True])
def test_block_with_mask_causal_and_tiny_attention_compiles_fullgraph(toeplitz: bool) -> None:
    block = GMLPBlock(16, 32, 12, toeplitz=toeplitz, causal=True, attn_dim=8)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(10, 2, 16)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    torch.testing.assert_close(compiled(x, mask), block(x, mask))
    compiled(x, mask).sum().backward()


def test_fft_toeplitz_path_compiles_fullgraph() -> None:
    block = GMLPBlock(16, 32, 12, toeplitz=True)
    block.sgu.proj.fft_threshold = 4
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(10, 2, 16)
    torch.testing.assert_close(compiled(x), block(x))


@pytest.mark.slow  # two compilations, about 2.5 s
def test_compiled_block_keeps_padding_and_causality_at_every_length() -> None:
    """A compiled causal aMLP block (Toeplitz W, two heads), at two lengths (the second one recompiled with
    a dynamic length), with a left-padded sample (its real tokens see the pads before them unless masked):
    real outputs are the eager block's whatever the pads hold, and output t of the real sample beside it
    depends on no later token and no token of the other sample (exactly), and on every earlier one."""
    torch.manual_seed(0)
    block = GMLPBlock(8, 16, 12, toeplitz=True, causal=True, heads=2, attn_dim=4)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    for n in (12, 7):
        x = torch.randn(n, 2, 8)
        mask = torch.ones(2, n, dtype=torch.bool)
        mask[0, : n - 5] = False
        garbage = torch.where(mask.t().unsqueeze(-1), x, torch.randn_like(x) * 1e4)
        ref = block(garbage, mask)
        for t in (0, 4, n - 1) if n > 7 else range(n):  # a fresh forward each: the backward frees its graph
            xg = x.clone().requires_grad_(True)
            out = compiled(xg, mask)
            (grad,) = torch.autograd.grad(out[t, 1].sum(), xg)
            assert torch.all(grad[:, 0] == 0)  # nor on the other sample
            assert torch.all(grad[t + 1 :, 1] == 0) and grad[: t + 1, 1].abs().amax(-1).min() > 0
        real = mask.t()
        torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)


def test_compiled_vision_model_takes_channels_last_batch_of_one() -> None:
    """A channels_last batch of one image through the compiled model gives the eager contiguous result."""
    model = create_model("gmlp_micro4_28").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 1, 28, 28)
    out = compiled(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)
    assert out.abs().max() > 1e-3
