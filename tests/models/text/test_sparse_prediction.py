"""``GMLPConfig.sparse_prediction``: the MLM decoder on the labelled tokens only, same loss and gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gmlp.models.text import GMLPConfig, GMLPForCausalLM, GMLPForMaskedLM

VOCAB, SEQ = 50, 12


def _model(sparse: bool, **kw) -> GMLPForMaskedLM:
    torch.manual_seed(0)
    cfg = GMLPConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        max_position_embeddings=SEQ,
        sparse_prediction=sparse,
        **kw,
    )
    return GMLPForMaskedLM(cfg).double()


def _batch(seed: int, batch: int, seq: int, rate: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, seq), generator=g)
    labels = torch.where(torch.rand(batch, seq, generator=g) < rate, ids, -100)
    labels[0, seq // 2] = ids[0, seq // 2]  # at least one predicted token
    lengths = torch.randint(1, seq + 1, (batch,), generator=g)
    mask = (torch.arange(seq) < lengths[:, None]).long()
    labels = labels.masked_fill(mask == 0, -100)  # padding is never predicted
    labels[0, 0] = ids[0, 0]
    return ids, mask, labels


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 4),
    seq=st.integers(2, SEQ),
    rate=st.floats(0.0, 1.0, allow_subnormal=False),
    aMLP=st.booleans(),
)
def test_sparse_prediction_gives_the_dense_loss_gradients_and_logits(seed, batch, seq, rate, aMLP) -> None:
    kw = {"tiny_attn_size": 8} if aMLP else {}
    dense, sparse = _model(False, **kw), _model(True, **kw)
    ids, mask, labels = _batch(seed, batch, seq, rate)
    out_d = dense(input_ids=ids, attention_mask=mask, labels=labels)
    out_s = sparse(input_ids=ids, attention_mask=mask, labels=labels)
    keep = labels != -100
    assert out_s.logits.shape == (int(keep.sum()), VOCAB)
    torch.testing.assert_close(out_s.logits, out_d.logits[keep], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_s.loss, out_d.loss, rtol=1e-12, atol=1e-12)
    out_d.loss.backward()
    out_s.loss.backward()
    gd, gs = _grads(dense), _grads(sparse)
    assert gd.keys() == gs.keys() and "decoder.bias" in gs and "gmlp.embed.weight" in gs
    for name in gd:
        torch.testing.assert_close(gs[name], gd[name], rtol=1e-10, atol=1e-12, msg=name)


def test_without_labels_the_logits_stay_dense() -> None:
    model = _model(True).eval()
    ids, mask, _ = _batch(0, 2, SEQ, 0.2)
    assert model(input_ids=ids, attention_mask=mask).logits.shape == (2, SEQ, VOCAB)


def test_sparse_prediction_is_saved_with_the_config(tmp_path) -> None:
    _model(True).save_pretrained(tmp_path)
    assert GMLPForMaskedLM.from_pretrained(tmp_path).config.sparse_prediction is True
    assert GMLPConfig().sparse_prediction is False


def test_sparse_prediction_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match=r"sparse_prediction must be a bool, got 'yes'"):
        GMLPConfig(sparse_prediction="yes")


@pytest.mark.parametrize("cls", [GMLPForMaskedLM, GMLPForCausalLM])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize(
    ("labels", "got"),
    [
        (torch.zeros(2, 5, dtype=torch.long), r"\(2, 5\) torch.int64"),
        (torch.zeros(2, SEQ), r"\(2, 12\) torch.float32"),
        (torch.zeros(2, SEQ, dtype=torch.bool), r"\(2, 12\) torch.bool"),
        ([[1, 2]], "list"),
    ],
)
def test_bad_labels_get_a_clear_error(cls, sparse, labels, got) -> None:
    cfg = GMLPConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        max_position_embeddings=SEQ, sparse_prediction=sparse, causal=cls is GMLPForCausalLM,
    )  # fmt: skip
    ids = torch.randint(5, VOCAB, (2, SEQ))
    with pytest.raises(ValueError, match=r"labels must be an integer tensor of shape \(batch, seq_len\) = "
                       rf"\(2, 12\) like the input ids \(-100 = no prediction\), got {got}"):  # fmt: skip
        cls(cfg)(input_ids=ids, labels=labels)


def _compiled_equals_eager(eager: torch.nn.Module, model: torch.nn.Module, *batch: torch.Tensor):
    """``model`` compiled (fullgraph, aot_eager) gives ``eager``'s loss and parameter gradients on
    ``batch`` = (ids, mask, labels); returns the compiled model."""
    ids, mask, labels = batch
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ref = eager(input_ids=ids, attention_mask=mask, labels=labels)
    out = compiled(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss)
    ref.loss.backward()
    out.loss.backward()
    for name, grad in _grads(eager).items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, msg=name)
    return compiled


def test_sparse_prediction_compiles_fullgraph_and_trains() -> None:
    torch._dynamo.reset()
    eager, model = _model(True).float(), _model(True).float()
    ids, mask, labels = _batch(3, 3, SEQ, 0.3)
    _compiled_equals_eager(eager, model, ids, mask, labels)


# --- max_predictions_per_seq: a static number of predicted rows per sequence --------------------------------


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 4), seq=st.integers(2, SEQ),
       rate=st.floats(0.0, 1.0, allow_subnormal=False), slack=st.integers(0, 3))  # fmt: skip
def test_static_sparse_prediction_gives_the_dense_loss_gradients_and_logits(seed, batch, seq, rate, slack):
    ids, mask, labels = _batch(seed, batch, seq, rate)
    keep = labels != -100
    per_seq = int(keep.sum(1).max()) + slack  # the tightest bound that fits, or a looser one
    dense, static = _model(False), _model(True, max_predictions_per_seq=per_seq)
    out_d = dense(input_ids=ids, attention_mask=mask, labels=labels)
    out_s = static(input_ids=ids, attention_mask=mask, labels=labels)
    k = min(per_seq, seq)
    assert out_s.logits.shape == (batch * k, VOCAB)
    rows = out_s.logits.view(batch, k, VOCAB)
    for b in range(batch):  # each sequence's block starts with its labelled tokens, in order
        count = int(keep[b].sum())
        torch.testing.assert_close(rows[b, :count], out_d.logits[b][keep[b]], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_s.loss, out_d.loss, rtol=1e-12, atol=1e-12)
    out_d.loss.backward()
    out_s.loss.backward()
    gd, gs = _grads(dense), _grads(static)
    assert gd.keys() == gs.keys()
    for name in gd:
        torch.testing.assert_close(gs[name], gd[name], rtol=1e-10, atol=1e-12, msg=name)


def test_static_sparse_prediction_refuses_a_sequence_with_too_many_labels() -> None:
    ids, mask, labels = _batch(1, 3, SEQ, 0.0)
    labels[2, :5] = ids[2, :5]
    model = _model(True, max_predictions_per_seq=4)
    with pytest.raises(ValueError, match=r"labels: sequence 2 has 5 labelled tokens .* more than "
                       r"max_predictions_per_seq=4"):  # fmt: skip
        model(input_ids=ids, attention_mask=mask, labels=labels)
    labels[2, 4] = -100  # 4 fit
    assert torch.isfinite(model(input_ids=ids, attention_mask=mask, labels=labels).loss)


def test_static_sparse_prediction_compiles_fullgraph_and_poisons_an_unchecked_overflow() -> None:
    """Under torch.compile no count is read back: the loss equals the eager one, and a batch with more
    labelled tokens than fit gives NaN (never a loss over a silently shortened set of tokens)."""
    torch._dynamo.reset()
    eager, model = (_model(True, max_predictions_per_seq=6).float() for _ in range(2))
    ids, mask, labels = _batch(3, 3, SEQ, 0.3)
    labels[:, 6:] = -100
    compiled = _compiled_equals_eager(eager, model, ids, mask, labels)
    labels[1, :8] = ids[1, :8]  # 8 labelled tokens in sequence 1, more than 6
    mask[1, :8] = 1  # real tokens (labels at padded positions are ignored)
    assert torch.isnan(compiled(input_ids=ids, attention_mask=mask, labels=labels).loss)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparse_prediction": True, "max_predictions_per_seq": 0},
         "max_predictions_per_seq must be a positive int, got 0"),
        ({"sparse_prediction": True, "max_predictions_per_seq": 2.5},
         "max_predictions_per_seq must be a positive int, got 2.5"),
        ({"max_predictions_per_seq": 20}, "max_predictions_per_seq needs sparse_prediction=True, got "
         "max_predictions_per_seq=20 with sparse_prediction=False"),
    ],
)  # fmt: skip
def test_max_predictions_per_seq_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GMLPConfig(**kwargs)


def test_max_predictions_per_seq_is_saved_with_the_config(tmp_path) -> None:
    _model(True, max_predictions_per_seq=7).save_pretrained(tmp_path)
    assert GMLPForMaskedLM.from_pretrained(tmp_path).config.max_predictions_per_seq == 7
    assert GMLPConfig().max_predictions_per_seq is None
