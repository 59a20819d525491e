"""torch.compile(fullgraph=True) captures the text models (aot_eager backend: graphs, no code generation)."""

from __future__ import annotations

import pytest
import torch

from gmlp.models.text import (
    GMLPConfig,
    GMLPForCausalLM,
    GMLPForMaskedLM,
    GMLPForQuestionAnswering,
    GMLPForSequenceClassification,
    GMLPModel,
)


def _config(**kw) -> GMLPConfig:
    return GMLPConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        max_position_embeddings=12,
        **kw,
    )


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("cls", "kw"),
    [
        (GMLPForMaskedLM, {}),
        (GMLPForMaskedLM, {"tiny_attn_size": 8}),
        (GMLPForSequenceClassification, {}),
        (GMLPForCausalLM, {"causal": True, "tiny_attn_size": 8}),
    ],
)
def test_text_model_compiles_fullgraph_right_padded(cls, kw) -> None:
    model = cls(_config(**kw)).eval()
    ids = torch.randint(1, 40, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0  # right padding: the compiled path needs no data-dependent reordering
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ref = model(input_ids=ids, attention_mask=mask).logits
    out = compiled(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out, ref)
    model.train()
    compiled(input_ids=ids, attention_mask=mask).logits.sum().backward()


@pytest.mark.parametrize(
    ("cls", "outputs"),
    [(GMLPModel, ("last_hidden_state",)), (GMLPForQuestionAnswering, ("start_logits", "end_logits"))],
)
def test_base_model_and_qa_head_compile_fullgraph(cls, outputs: tuple[str, ...]) -> None:
    """The models whose outputs are not ``logits``: same values compiled, and they train."""
    model = cls(_config(tiny_attn_size=8)).eval()
    ids = torch.randint(1, 40, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, 8:] = 0
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ref, out = model(input_ids=ids, attention_mask=mask), compiled(input_ids=ids, attention_mask=mask)
    for name in outputs:
        torch.testing.assert_close(getattr(out, name), getattr(ref, name))
    model.train()
    out = compiled(input_ids=ids, attention_mask=mask)
    sum(getattr(out, name).sum() for name in outputs).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_left_padding_compiles_fullgraph_and_matches_eager() -> None:
    model = GMLPForMaskedLM(_config(tiny_attn_size=8)).eval()
    ids = torch.randint(1, 40, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding: real tokens are moved to the front inside the model
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    real = mask.bool()
    torch.testing.assert_close(
        compiled(input_ids=ids, attention_mask=mask).logits[real],
        model(input_ids=ids, attention_mask=mask).logits[real],
    )


@pytest.mark.parametrize("cls", [GMLPForCausalLM, GMLPForMaskedLM, GMLPForQuestionAnswering])
def test_padded_losses_compile_fullgraph_and_match_eager(cls) -> None:
    """The losses that skip padded positions (causal LM targets, MLM labels, QA pad logits) capture
    fullgraph too, with left padding, and give the eager loss and gradients."""
    torch.manual_seed(0)
    model = cls(_config(causal=cls is GMLPForCausalLM))
    ids = torch.randint(1, 40, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    if cls is GMLPForQuestionAnswering:
        targets = {"start_positions": torch.tensor([1, 4]), "end_positions": torch.tensor([2, 6])}
    else:
        targets = {"labels": ids.clone()}
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    losses, grads = [], []
    for run in (model, compiled):
        model.zero_grad()
        loss = run(input_ids=ids, attention_mask=mask, **targets).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(losses[1], losses[0])
    for got, expected in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, expected)


def test_compiled_model_gives_each_padded_row_its_unpadded_logits() -> None:
    """Compiled MLM (two heads, tiny attention, FFT Toeplitz mixing from 4 tokens on): rows with left, right
    and inner padding of different amounts give at their real tokens the eager logits of the row with its
    padding deleted, and changing the pad ids changes none of them."""
    torch.manual_seed(0)
    model = GMLPForMaskedLM(_config(tiny_attn_size=8, sgu_heads=2, spatial_fft_threshold=4)).eval()
    for block in model.gmlp.blocks:  # a large W, so that any leak would show
        torch.nn.init.normal_(block.sgu.proj.weight, std=0.3)
    ids = torch.randint(1, 40, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[0, :4] = 0  # left
    mask[1, 6:] = 0  # right
    mask[2, 2:5] = 0  # inner
    mask[2, 9:] = 0
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    logits = compiled(input_ids=ids, attention_mask=mask).logits
    other = torch.where(mask.bool(), ids, torch.randint(1, 40, ids.shape))
    torch.testing.assert_close(compiled(input_ids=other, attention_mask=mask).logits[mask.bool()],
                               logits[mask.bool()])  # fmt: skip
    for row in range(3):
        real = mask[row].bool()
        alone = model(input_ids=ids[row : row + 1, real]).logits[0]
        torch.testing.assert_close(logits[row, real], alone, atol=1e-5, rtol=1e-5)
