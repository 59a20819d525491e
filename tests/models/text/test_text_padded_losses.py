"""Losses with padding: a padded row gives the loss (and gradients) of the row with its padding deleted.

The outputs at padded positions are unspecified (they depend on the pad ids, not on the real tokens), so
no loss may read them: not the causal LM (with left or inner padding, a pad position would predict the
first real token after it), not the MLM (labels at padded positions), not question answering (padded
positions in the softmax over start/end positions).
"""

from __future__ import annotations

import pytest
import torch

from gmlp.models.text import (
    GMLPConfig,
    GMLPForCausalLM,
    GMLPForMaskedLM,
    GMLPForQuestionAnswering,
    GMLPForSequenceClassification,
)
from gmlp.nn import TokenProjection

VOCAB, SEQ = 40, 16


def _model(cls, **overrides):
    torch.manual_seed(0)
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        max_position_embeddings=SEQ, tiny_attn_size=8, causal=cls is GMLPForCausalLM,
    )
    kwargs.update(overrides)
    model = cls(GMLPConfig(**kwargs))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # large random W and b: the token mixing really mixes
        for module in model.modules():
            if isinstance(module, TokenProjection):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.5)
                module.bias.copy_(1 + torch.randn(module.bias.shape, generator=gen) * 0.5)
    return model.eval()


def _padded(ids: torch.Tensor, layout: str, width: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids`` (n,) placed in a row of ``width`` random (real-looking) pad ids: pads on the right, the left,
    or both sides and in between."""
    n = ids.numel()
    real = {
        "right": list(range(n)),
        "left": list(range(width - n, width)),
        "inner": [1, 2, 5, 6, 7, 10][:n],
    }[layout]
    row = torch.randint(5, VOCAB, (width,), generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(width, dtype=torch.long)
    row[real], mask[real] = ids, 1
    return row[None], mask[None]


@pytest.mark.parametrize("layout", ["right", "left", "inner"])
@pytest.mark.parametrize("pad_labels", ["ignored", "ids"], ids=["pad_labels_-100", "pad_labels_ids"])
def test_causal_lm_loss_of_a_padded_row_is_the_unpadded_loss(layout: str, pad_labels: str) -> None:
    """Position t predicts the next *real* token; labels at padded positions are never targets."""
    model = _model(GMLPForCausalLM)
    ids = torch.randint(5, VOCAB, (6,), generator=torch.Generator().manual_seed(1))
    row, mask = _padded(ids, layout)
    labels = row.clone()
    if pad_labels == "ignored":  # what DataCollatorForLanguageModeling(mlm=False) gives
        labels[mask == 0] = -100
    expected = model(ids[None], labels=ids[None]).loss
    got = model(row, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_causal_lm_loss_of_a_left_padded_batch_weights_every_token_once() -> None:
    model = _model(GMLPForCausalLM)
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randint(5, VOCAB, (n,), generator=gen) for n in (7, 3)]
    width = 7
    ids = torch.stack([torch.cat([torch.zeros(width - r.numel(), dtype=torch.long), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - r.numel()), torch.ones(r.numel())]) for r in rows])
    labels = ids.masked_fill(mask == 0, -100)
    got = model(ids, attention_mask=mask.long(), labels=labels).loss
    # mean over the (n - 1) predicted tokens of every row, each row run alone
    total = sum(model(r[None], labels=r[None]).loss * (r.numel() - 1) for r in rows)
    torch.testing.assert_close(got, total / sum(r.numel() - 1 for r in rows), atol=1e-6, rtol=0)


@pytest.mark.parametrize("sparse", [{}, {"sparse_prediction": True}], ids=["dense", "sparse"])
@pytest.mark.parametrize("layout", ["right", "left", "inner"])
def test_masked_lm_labels_at_padded_positions_are_ignored(layout: str, sparse: dict) -> None:
    model = _model(GMLPForMaskedLM, **sparse)
    ids = torch.randint(5, VOCAB, (6,), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, -100)
    labels[[1, 4]] = ids[[1, 4]]
    row, mask = _padded(ids, layout)
    padded_labels = row.clone()  # every padded position labelled (with its pad id)
    padded_labels[mask == 1] = labels
    expected = model(ids[None], labels=labels[None]).loss
    got = model(row, attention_mask=mask, labels=padded_labels).loss
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("layout", ["right", "left"])
def test_question_answering_loss_ignores_padded_positions(layout: str) -> None:
    model = _model(GMLPForQuestionAnswering)
    ids = torch.randint(5, VOCAB, (6,), generator=torch.Generator().manual_seed(1))
    row, mask = _padded(ids, layout)
    offset = int(mask[0].argmax())  # index of the first real token in the padded row
    expected = model(ids[None], start_positions=torch.tensor([1]), end_positions=torch.tensor([3])).loss
    out = model(
        row, attention_mask=mask,
        start_positions=torch.tensor([1 + offset]), end_positions=torch.tensor([3 + offset]),
    )
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=0)
    # padded positions can never be picked as the answer
    assert int(out.start_logits.argmax()) in range(offset, offset + 6)
    assert bool((out.start_logits[mask == 0] < -1e30).all() & (out.end_logits[mask == 0] < -1e30).all())


def test_question_answering_positions_on_padding_raise() -> None:
    model = _model(GMLPForQuestionAnswering)
    row, mask = _padded(torch.arange(5, 11), "right")
    with pytest.raises(ValueError, match=r"end_positions of example 0 is 9, a padded position"):
        model(row, attention_mask=mask, start_positions=torch.tensor([2]), end_positions=torch.tensor([9]))
    # outside the sequence is still "ignored", as in BERT
    rows, masks = row.repeat(2, 1), mask.repeat(2, 1)
    loss = model(rows, attention_mask=masks, start_positions=torch.tensor([2, 2]),
                 end_positions=torch.tensor([99, 4])).loss
    assert torch.isfinite(loss)


@pytest.mark.parametrize("layout", ["right", "left", "inner"])
def test_a_causal_classifier_pools_the_last_real_token(layout: str) -> None:
    """In a causal model the first token sees only itself: the classifier pools the last real token (as
    GPT-2's does), so the logits depend on the whole text and padding changes nothing."""
    model = _model(GMLPForSequenceClassification, causal=True, num_labels=3)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (6,), generator=gen)
    other = ids.clone()
    other[3:] = torch.randint(5, VOCAB, (3,), generator=gen)  # the same first tokens, another ending
    expected = model(ids[None]).logits
    assert not torch.allclose(model(other[None]).logits, expected)
    row, mask = _padded(ids, layout)
    torch.testing.assert_close(model(row, attention_mask=mask).logits, expected, atol=1e-6, rtol=0)


def test_trainer_label_smoothing_shifts_the_causal_lm_s_labels(tmp_path) -> None:
    """transformers' Trainer computes a label-smoothed loss itself and shifts the labels only for the causal
    LMs it knows: with gMLP registered there, a tiny smoothing gives the model's own (next-token) loss."""
    from transformers import Trainer, TrainingArguments

    model = _model(GMLPForCausalLM)
    ids = torch.randint(5, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    args = TrainingArguments(
        output_dir=str(tmp_path), label_smoothing_factor=1e-6, report_to=[], use_cpu=True
    )
    trainer = Trainer(model=model, args=args)
    with torch.no_grad():
        got = trainer.compute_loss(model, {"input_ids": ids, "labels": ids.clone()})
        expected = model(ids, labels=ids).loss
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
