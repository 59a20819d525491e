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
