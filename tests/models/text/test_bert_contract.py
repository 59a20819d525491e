"""The text heads against BERT's contract, side by side: a tiny ``BertForX`` and a tiny ``GMLPForX`` built
from equivalent configs (vocabulary, width, depth, ``num_labels``), checked for everything a transformers user
sees that is not the model's internals: ``problem_type`` inference, the loss of given logits (computed by
BERT's own code path: BERT's head is replaced by a module returning our logits), -100 handling, tuple
outputs, hidden states, attentions, label/vocabulary resizing, tying, gradient checkpointing, dtypes.

Deliberate differences (docs/text_models.md) are asserted as such: integer labels of any dtype mean
single-label (BERT: int64/int32 only, other dtypes reach BCE and fail), labels are cast (BERT's losses
refuse int32), QA refuses negative positions (BERT clamps them to 0), a gMLP without tiny attention refuses
``output_attentions=True``, and the base model has no pooler output.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertLMHeadModel,
    BertModel,
)
from transformers.utils import logging as hf_logging

from gmlp.models.text import (
    GMLPConfig,
    GMLPForCausalLM,
    GMLPForMaskedLM,
    GMLPForQuestionAnswering,
    GMLPForSequenceClassification,
    GMLPForTokenClassification,
    GMLPModel,
)

VOCAB, DIM, LAYERS, N = 40, 16, 2, 12

# (our class, BERT's class, the attribute of BERT's head that makes the logits)
HEADS: dict[str, tuple[type[nn.Module], type[nn.Module], str]] = {
    "mlm": (GMLPForMaskedLM, BertForMaskedLM, "cls"),
    "seqcls": (GMLPForSequenceClassification, BertForSequenceClassification, "classifier"),
    "tokcls": (GMLPForTokenClassification, BertForTokenClassification, "classifier"),
    "qa": (GMLPForQuestionAnswering, BertForQuestionAnswering, "qa_outputs"),
    "causal": (GMLPForCausalLM, BertLMHeadModel, "cls"),
}
SETTINGS = {"deadline": None, "derandomize": True}


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    """BERT's and our construction warnings (causal copy, is_decoder) are expected here."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    yield
    hf_logging.set_verbosity(level)


def _ours(kind: str, **kwargs: Any) -> nn.Module:
    config = GMLPConfig(
        vocab_size=VOCAB, hidden_size=DIM, num_hidden_layers=LAYERS, intermediate_size=32,
        max_position_embeddings=N, **kwargs,
    )
    return (GMLPModel if kind == "base" else HEADS[kind][0])(config).eval()


def _bert(kind: str, **kwargs: Any) -> nn.Module:
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=DIM, num_hidden_layers=LAYERS, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=N, attn_implementation="eager",
        is_decoder=kind == "causal", **kwargs,
    )
    return (BertModel if kind == "base" else HEADS[kind][1])(config).eval()


class _Given(nn.Module):
    """A head that returns the given output whatever its input: BERT's loss code then runs on our logits."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.output


def _bert_loss(kind: str, bert: nn.Module, logits: torch.Tensor, ids: torch.Tensor, **labels: Any) -> Any:
    """BERT's loss (its own forward and loss code) of ``logits``, our head's output."""
    setattr(bert, HEADS[kind][2], _Given(logits))
    return bert(ids, **labels).loss


def _ids(batch: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(5, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def _same_loss(ours: torch.Tensor, bert: torch.Tensor) -> None:
    assert ours.dtype == bert.dtype
    if math.isnan(float(bert.detach())):
        assert math.isnan(float(ours.detach()))
    else:
        torch.testing.assert_close(ours, bert, rtol=1e-6, atol=0)


# -- sequence classification: problem_type and losses ------------------------------------------------------
LABEL_KINDS = ["int64", "int32", "int64_column", "float", "float16", "regression", "regression_column",
               "regression_int"]  # fmt: skip


def _seq_labels(kind: str, batch: int, k: int, gen: torch.Generator) -> torch.Tensor:
    if kind.startswith("int"):
        labels = torch.randint(0, k, (batch,), generator=gen)
        labels = labels.to(torch.int32) if kind == "int32" else labels
        return labels[:, None] if kind == "int64_column" else labels
    if kind in ("float", "float16"):
        return torch.rand(batch, k, generator=gen).to(torch.float16 if kind == "float16" else torch.float32)
    if kind == "regression_int":
        return torch.randint(0, 6, (batch,), generator=gen)
    values = 5 * torch.rand(batch, generator=gen)
    return values[:, None] if kind == "regression_column" else values


@settings(max_examples=16, **SETTINGS)
@given(
    kind=st.sampled_from(LABEL_KINDS), batch=st.integers(1, 4), k=st.integers(2, 4),
    explicit=st.booleans(), seed=st.integers(0, 2**16),
)
def test_sequence_classification_problem_type_and_loss_match_bert(
    kind: str, batch: int, k: int, explicit: bool, seed: int
) -> None:
    """The problem type inferred from the first labels is BERT's (regression for one label, single-label for
    int64/int32, multi-label for float), stored in the config as BERT stores it; an explicit
    config.problem_type wins; and the loss of our logits is what BERT's code computes from them (labels
    that BERT's losses refuse, int32 class ids and float16 targets, given to it as int64 / float32)."""
    gen = torch.Generator().manual_seed(seed)
    num_labels = 1 if kind.startswith("regression") else k
    labels = _seq_labels(kind, batch, num_labels, gen)
    expected = (
        "regression" if num_labels == 1
        else "single_label_classification" if kind.startswith("int")
        else "multi_label_classification"
    )
    problem = {"problem_type": expected} if explicit else {}
    ours = _ours("seqcls", num_labels=num_labels, **problem)
    bert = _bert("seqcls", num_labels=num_labels, **problem)
    ids = _ids(batch, 7, seed)
    out = ours(ids, labels=labels)
    for_bert = labels.long() if kind.startswith("int") else labels
    if kind == "float16":
        for_bert = labels.float()
    assert ours.config.problem_type == expected
    bert_loss = _bert_loss("seqcls", bert, out.logits, ids, labels=for_bert)
    assert bert.config.problem_type == expected
    _same_loss(out.loss, bert_loss)


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8, torch.int8])
def test_any_integer_labels_mean_single_label(dtype: torch.dtype) -> None:
    """Deliberate difference: integer labels of any dtype are class ids (BERT infers multi-label for dtypes
    other than int64/int32 and then fails inside BCE); the loss is that of the int64 labels."""
    labels = torch.tensor([0, 2, 1], dtype=dtype)
    ours, ids = _ours("seqcls", num_labels=3), _ids(3, 6, 0)
    out = ours(ids, labels=labels)
    assert ours.config.problem_type == "single_label_classification"
    torch.testing.assert_close(out.loss, nn.functional.cross_entropy(out.logits, labels.long()))


@pytest.mark.parametrize(
    ("problem_type", "labels"),
    [
        ("multi_label_classification", torch.tensor([[0.0], [1.0], [0.5]])),  # one label, BCE
        ("regression", torch.tensor([[0.5, 1.0], [2.0, -1.0], [0.0, 3.0]])),  # several values per example
        ("multi_label_classification", torch.tensor([[0, 1], [1, 1], [0, 0]])),  # int targets: cast
    ],
)
def test_explicit_problem_type_wins(problem_type: str, labels: torch.Tensor) -> None:
    """An explicit config.problem_type is used whatever the labels or num_labels would infer, as in BERT."""
    k = labels.shape[1]
    ours, bert = _ours("seqcls", num_labels=k, problem_type=problem_type), _bert(
        "seqcls", num_labels=k, problem_type=problem_type
    )
    ids = _ids(3, 5, 1)
    out = ours(ids, labels=labels)
    assert ours.config.problem_type == problem_type
    _same_loss(out.loss, _bert_loss("seqcls", bert, out.logits, ids, labels=labels.float()))


def _forward_counter(model: nn.Module) -> list[int]:
    calls: list[int] = []
    model.gmlp.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize(
    ("num_labels", "labels", "match"),
    [
        (3, torch.tensor([0, 5, 1]), r"labels contains 5 outside \[0, num_labels=3\)"),
        (3, torch.tensor([0, -2, 1], dtype=torch.int32), r"labels contains -2 outside \[0, num_labels=3\)"),
        (2, torch.tensor([[0.0, 1.5], [0.0, 1.0]]), r"labels contains 1.5 outside \[0, 1\]"),
        (2, torch.tensor([0.0, 1.0]), r"labels must be a float tensor of shape \(batch, num_labels\)"),
    ],
)
def test_bad_sequence_labels_refused_before_the_forward(
    num_labels: int, labels: torch.Tensor, match: str
) -> None:
    """Where BERT lets cross entropy fail (an IndexError, or a device-side assert on a GPU), a label outside
    [0, num_labels) is a ValueError naming labels, the value and num_labels; it is raised before the model
    runs (no wasted forward, and on a GPU no read-back in the middle of the step), and no problem type is
    stored from bad labels."""
    ours = _ours("seqcls", num_labels=num_labels)
    calls = _forward_counter(ours)
    ids = _ids(labels.shape[0], 6, 2)
    with pytest.raises(ValueError, match=match):
        ours(ids, labels=labels)
    assert calls == []
    assert ours.config.problem_type is None
    if labels.dtype == torch.int64:  # BERT: an error from inside the loss
        bert = _bert("seqcls", num_labels=num_labels)
        with pytest.raises((IndexError, RuntimeError)):
            bert(ids, labels=labels)


def _bf16_targets() -> tuple[torch.Tensor, torch.Tensor]:
    regression = torch.tensor([3.7, 1.234, 0.333, 4.999])  # none of them exact in bf16
    multi = torch.tensor([[0.3, 0.71, 0.123]]).expand(4, 3).contiguous()
    assert not torch.equal(regression.bfloat16().float(), regression)
    return regression, multi


@pytest.mark.parametrize("where", ["bf16 model", "bf16 autocast"])
def test_float_targets_are_not_rounded_to_the_logits_dtype(where: str) -> None:
    """float32 regression / multi-label targets of a bf16 model, or under bf16 autocast (Trainer's
    bf16=True), are compared with the logits in float32, as torch promotes them in BERT's losses: they
    were cast to bf16 (3.7 -> 3.703125), a silently different target."""
    regression, multi = _bf16_targets()
    for labels, num_labels, loss_fn in (
        (regression, 1, nn.functional.mse_loss),
        (multi, 3, nn.functional.binary_cross_entropy_with_logits),
    ):
        ours, ids = _ours("seqcls", num_labels=num_labels), _ids(4, 7, 3)
        if where == "bf16 model":
            out = ours.to(torch.bfloat16)(ids, labels=labels)
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = ours(ids, labels=labels)
        assert out.logits.dtype == torch.bfloat16
        assert out.loss.dtype == torch.float32
        reference = loss_fn(out.logits.double().reshape(labels.shape), labels.double())
        torch.testing.assert_close(out.loss.double(), reference, rtol=1e-6, atol=0)


# -- token-level losses: -100, all ignored, dtypes ---------------------------------------------------------
@settings(max_examples=12, **SETTINGS)
@given(
    kind=st.sampled_from(["mlm", "tokcls", "causal"]), batch=st.integers(1, 3), n=st.integers(2, 8),
    ignored=st.sampled_from([0.0, 0.5, 1.0]), dtype=st.sampled_from([torch.int64, torch.int32]),
    right_padding=st.booleans(), seed=st.integers(0, 2**16),
)
def test_token_losses_match_bert(
    kind: str, batch: int, n: int, ignored: float, dtype: torch.dtype, right_padding: bool, seed: int
) -> None:
    """Masked LM, token classification and the causal LM's shifted loss: -100 is ignored, a batch with
    every label -100 gives BERT's NaN (the mean over no target), the loss of our logits is BERT's (BERT's
    losses take int64 labels only: ours cast any integer dtype). With right padding whose labels are -100
    (what the collators make) the padding changes nothing."""
    gen = torch.Generator().manual_seed(seed)
    classes = 5 if kind == "tokcls" else VOCAB
    extra = {"num_labels": classes} if kind == "tokcls" else {}
    ours, bert = _ours(kind, **extra), _bert(kind, **extra)
    ids = _ids(batch, n, seed)
    labels = torch.randint(0, classes, (batch, n), generator=gen)
    labels[torch.rand(batch, n, generator=gen) < ignored] = -100
    mask = None
    if right_padding:
        lengths = torch.randint(1, n + 1, (batch,), generator=gen)
        mask = (torch.arange(n) < lengths[:, None]).long()
        labels[mask == 0] = -100
    out = ours(ids, attention_mask=mask, labels=labels.to(dtype))
    _same_loss(out.loss, _bert_loss(kind, bert, out.logits, ids, labels=labels))


@pytest.mark.parametrize("kind", ["mlm", "tokcls", "causal"])
def test_token_loss_of_all_ignored_labels_with_num_items(kind: str) -> None:
    """With Trainer's num_items_in_batch the loss is a sum over targets divided by it: 0 for a micro-batch
    without targets (as transformers' own losses give), not NaN."""
    ours = _ours(kind, **({"num_labels": 3} if kind == "tokcls" else {}))
    ids = _ids(2, 5, 4)
    loss = ours(ids, labels=torch.full_like(ids, -100), num_items_in_batch=7).loss
    assert float(loss) == 0.0


def test_causal_lm_loss_of_half_logits_is_float32_like_transformers() -> None:
    """transformers' causal-LM loss (ForCausalLMLoss, BertLMHeadModel's) upcasts the logits to float32; ours
    was computed in bf16 for a bf16 model (a bf16 loss, off by bf16 rounding)."""
    ours, bert = _ours("causal", initializer_range=1.0), _bert("causal")
    ours, bert = ours.to(torch.bfloat16), bert.to(torch.bfloat16)
    ids = _ids(3, 10, 5)
    labels = ids.clone()
    labels[:, ::3] = -100
    out = ours(ids, labels=labels)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    # (float logits: transformers 4.45's BertLMHeadModel took the loss in the logits' dtype, 5.x in float32)
    _same_loss(out.loss, _bert_loss("causal", bert, out.logits.float(), ids, labels=labels))


# -- question answering ----------------------------------------------------------------------------------
@settings(max_examples=12, **SETTINGS)
@given(
    batch=st.integers(1, 4), n=st.integers(2, 8), column=st.booleans(),
    dtype=st.sampled_from([torch.int64, torch.int32]), seed=st.integers(0, 2**16),
)
def test_question_answering_loss_matches_bert(
    batch: int, n: int, column: bool, dtype: torch.dtype, seed: int
) -> None:
    """Positions inside the sequence, at seq_len and past it (clamped to seq_len = ignored_index, ignored),
    shaped (batch,) or (batch, 1): the loss of our logits is BERT's (NaN where every position is ignored)."""
    gen = torch.Generator().manual_seed(seed)
    ours, bert = _ours("qa"), _bert("qa")
    ids = _ids(batch, n, seed)
    start, end = (torch.randint(0, n + 3, (batch,), generator=gen) for _ in range(2))
    if column:
        start, end = start[:, None], end[:, None]
    out = ours(ids, start_positions=start.to(dtype), end_positions=end.to(dtype))
    logits = torch.stack([out.start_logits, out.end_logits], dim=-1)
    _same_loss(out.loss, _bert_loss("qa", bert, logits, ids, start_positions=start, end_positions=end))


def test_question_answering_refuses_negative_positions() -> None:
    """Deliberate difference: BERT clamps a negative position to 0 (a silent [CLS] target); ours refuses
    it."""
    ours = _ours("qa")
    with pytest.raises(ValueError, match=r"start_positions of example 1 is -1"):
        ours(_ids(2, 5, 6), start_positions=torch.tensor([1, -1]), end_positions=torch.tensor([2, 3]))


# -- outputs ---------------------------------------------------------------------------------------------
def _call(kind: str, model: nn.Module, ids: torch.Tensor, with_labels: bool, **kwargs: Any) -> Any:
    if not with_labels:
        return model(ids, **kwargs)
    if kind == "qa":
        positions = torch.zeros(ids.shape[0], dtype=torch.long)
        return model(ids, start_positions=positions, end_positions=positions, **kwargs)
    labels = torch.zeros(ids.shape[0], dtype=torch.long) if kind == "seqcls" else ids % 2
    return model(ids, labels=labels, **kwargs)


@pytest.mark.parametrize(
    ("kind", "with_labels"),
    [(kind, labels) for kind in (*HEADS, "base") for labels in (False, True) if kind != "base" or not labels],
)  # (the base model takes no labels)
@pytest.mark.parametrize("hidden", [False, True])
def test_tuple_outputs_match_bert(kind: str, with_labels: bool, hidden: bool) -> None:
    """return_dict=False (as an argument or config.return_dict=False): a tuple with BERT's fields in BERT's
    order (loss first when labels are given), Nones left out; output_hidden_states (as an argument or in the
    config) gives num_hidden_layers + 1 states like BERT's, the last one the final hidden state. The base
    model has no pooler, so its tuple has no pooler_output (BERT's outputs[1])."""
    extra = {"num_labels": 2} if kind in ("seqcls", "tokcls") else {}
    ours, bert = _ours(kind, **extra), _bert(kind, **extra)
    ids = _ids(2, 6, 7)
    dict_out = _call(kind, ours, ids, with_labels, output_hidden_states=hidden)
    bert_dict = _call(kind, bert, ids, with_labels, output_hidden_states=hidden)
    ours_fields = list(dict_out.keys())
    bert_fields = [f for f in bert_dict if f not in ("pooler_output", "past_key_values", "cache")]
    assert ours_fields == bert_fields
    as_tuple = _call(kind, ours, ids, with_labels, output_hidden_states=hidden, return_dict=False)
    ours.config.return_dict = False
    ours.config.output_hidden_states = hidden
    from_config = _call(kind, ours, ids, with_labels)
    for out in (as_tuple, from_config):
        assert isinstance(out, tuple) and len(out) == len(ours_fields)
        for value, field in zip(out, ours_fields, strict=True):
            if isinstance(dict_out[field], tuple):
                assert len(value) == len(dict_out[field]) == len(bert_dict[field]) == LAYERS + 1
            torch.testing.assert_close(value, dict_out[field])
    if hidden:  # the last state is the final one (after the final norm), as BERT's last is its output
        base = ours if kind == "base" else ours.gmlp
        torch.testing.assert_close(dict_out.hidden_states[-1], base(ids, return_dict=True).last_hidden_state)


@pytest.mark.parametrize("kind", [*HEADS, "base"])
def test_output_attentions(kind: str) -> None:
    """aMLP returns one (batch, 1, seq, seq) map per block (BERT: one per layer, a map per head) whose rows
    sum to 1; a gMLP without tiny attention has no maps and refuses output_attentions=True with a
    ValueError (never a silently empty or wrong tuple); config.output_attentions=True gives it None."""
    extra = {"num_labels": 2} if kind in ("seqcls", "tokcls") else {}
    ids = _ids(2, 6, 8)
    maps = _ours(kind, tiny_attn_size=8, **extra)(ids, output_attentions=True).attentions
    bert_maps = _bert(kind, **extra)(ids, output_attentions=True).attentions
    assert len(maps) == len(bert_maps) == LAYERS
    for probs in maps:
        assert probs.shape == (2, 1, 6, 6)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 1, 6))
    with pytest.raises(ValueError, match="output_attentions=True needs the tiny attention"):
        _ours(kind, **extra)(ids, output_attentions=True)
    # the config's flag (a config shared with other models, say): maps where there are maps, else None
    assert len(_ours(kind, tiny_attn_size=8, output_attentions=True, **extra)(ids).attentions) == LAYERS
    assert _ours(kind, output_attentions=True, **extra)(ids).attentions is None


# -- loading, resizing, tying ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["seqcls", "tokcls"])
def test_num_labels_change_and_label_names_round_trip(kind: str, tmp_path: Any) -> None:
    """from_pretrained(num_labels=..., ignore_mismatched_sizes=True) gives a new classifier of that size and
    keeps every other weight, id2label/label2id survive save/load, as for BERT."""
    names = {0: "neg", 1: "neu", 2: "pos"}
    cls = HEADS[kind][0]
    ours = _ours(kind, num_labels=3, id2label=names, label2id={v: k for k, v in names.items()})
    ours.save_pretrained(tmp_path / "ours")
    bert = _bert(kind, num_labels=3, id2label=names, label2id={v: k for k, v in names.items()})
    bert.save_pretrained(tmp_path / "bert")
    bert_cls = HEADS[kind][1]
    loaded, bert_loaded = cls.from_pretrained(tmp_path / "ours"), bert_cls.from_pretrained(tmp_path / "bert")
    assert loaded.config.id2label == bert_loaded.config.id2label == names
    assert loaded.config.label2id == bert_loaded.config.label2id
    resized = cls.from_pretrained(tmp_path / "ours", num_labels=5, ignore_mismatched_sizes=True)
    bert_resized = bert_cls.from_pretrained(tmp_path / "bert", num_labels=5, ignore_mismatched_sizes=True)
    assert resized.config.num_labels == bert_resized.config.num_labels == 5
    assert resized.config.id2label == bert_resized.config.id2label
    assert resized.classifier.weight.shape == (5, DIM) and resized.num_labels == 5
    torch.testing.assert_close(resized.gmlp.embed.weight, ours.gmlp.embed.weight)
    torch.testing.assert_close(resized.gmlp.blocks[0].fc1.weight, ours.gmlp.blocks[0].fc1.weight)
    labels = torch.tensor([4, 0]) if kind == "seqcls" else torch.tensor([[4, 0, 1], [2, 3, -100]])
    assert torch.isfinite(resized(_ids(2, 3, 9), labels=labels).loss)


@pytest.mark.parametrize("kind", ["mlm", "causal"])
@pytest.mark.parametrize(("size", "multiple"), [(VOCAB + 7, None), (VOCAB + 3, 8), (VOCAB - 5, None)])
def test_resize_token_embeddings_like_bert(kind: str, size: int, multiple: int | None) -> None:
    """resize_token_embeddings resizes the embedding, the tied output layer and its bias, and
    config.vocab_size, to BERT's sizes (pad_to_multiple_of too); the kept rows and bias entries are kept,
    the decoder stays tied, and the new ids run."""
    ours, bert = _ours(kind), _bert(kind)
    old_embed = ours.get_input_embeddings().weight.detach().clone()
    old_bias = ours.get_output_embeddings().bias.detach().clone()
    embed = ours.resize_token_embeddings(size, pad_to_multiple_of=multiple)
    bert_embed = bert.resize_token_embeddings(size, pad_to_multiple_of=multiple)
    assert embed.weight.shape == bert_embed.weight.shape
    out = ours.get_output_embeddings()
    bert_out = bert.get_output_embeddings()
    assert out.weight.shape == bert_out.weight.shape and out.bias.shape == bert_out.bias.shape
    assert ours.config.vocab_size == bert.config.vocab_size == embed.weight.shape[0]
    assert out.weight is embed.weight
    kept = min(size, VOCAB)
    torch.testing.assert_close(embed.weight[:kept], old_embed[:kept])
    torch.testing.assert_close(out.bias[:kept], old_bias[:kept])
    top = torch.tensor([[embed.weight.shape[0] - 1, 6]])
    assert ours(top).logits.shape == (1, 2, embed.weight.shape[0])


@pytest.mark.parametrize("kind", ["mlm", "causal"])
def test_set_input_embeddings_and_tie_weights(kind: str) -> None:
    """set_input_embeddings replaces the word embedding; tie_weights ties the output layer to it (as BERT)
    and leaves it untied with tie_word_embeddings=False."""
    for tie in (True, False):
        ours, bert = _ours(kind, tie_word_embeddings=tie), _bert(kind, tie_word_embeddings=tie)
        for model in (ours, bert):
            new = nn.Embedding(VOCAB, DIM)
            model.set_input_embeddings(new)
            assert model.get_input_embeddings() is new
            model.tie_weights()
            assert (model.get_output_embeddings().weight is new.weight) == tie
        ids = _ids(1, 4, 10)
        direct = nn.functional.embedding(ids, ours.get_input_embeddings().weight)
        assert torch.equal(ours.gmlp.embed(ids), direct)


# -- training switches and dtypes ------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("kind", ["mlm", "seqcls", "causal"])
def test_gradient_checkpointing_gives_the_same_gradients(kind: str) -> None:
    """gradient_checkpointing_enable() (no dropout) leaves the loss and every gradient unchanged."""
    ours = _ours(kind, tiny_attn_size=8, **({"num_labels": 3} if kind == "seqcls" else {})).train()
    ids = _ids(3, 8, 11)
    labels = torch.tensor([0, 2, 1]) if kind == "seqcls" else ids

    def gradients() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ours.zero_grad()
        loss = ours(ids, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}

    loss, plain = gradients()
    ours.gradient_checkpointing_enable()
    assert ours.gmlp.gradient_checkpointing
    loss_ckpt, ckpt = gradients()
    assert torch.equal(loss, loss_ckpt)
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("kind", [*HEADS, "base"])
def test_num_parameters_dtype_and_bfloat16(kind: str) -> None:
    """num_parameters counts each parameter once (tied matrices once, as for BERT),
    exclude_embeddings=True drops the word and token-type embeddings; model.dtype follows .to(bfloat16),
    and the bf16 model runs with labels, giving bf16 outputs and a finite loss."""
    extra = {"num_labels": 2} if kind in ("seqcls", "tokcls") else {}
    ours = _ours(kind, **extra)
    unique = {p.data_ptr(): p.numel() for p in ours.parameters()}
    assert ours.num_parameters() == sum(unique.values())
    embeddings = VOCAB * DIM + 2 * DIM  # word embedding, 2 token types
    assert ours.num_parameters(exclude_embeddings=True) == ours.num_parameters() - embeddings
    assert ours.dtype == torch.float32
    half = ours.to(torch.bfloat16)
    assert half.dtype == torch.bfloat16
    ids = _ids(2, 6, 12)
    out = _call(kind, half, ids, with_labels=kind != "base")
    first = out[0] if kind == "base" else (out.logits if hasattr(out, "logits") else out.start_logits)
    assert first.dtype == torch.bfloat16
    if kind != "base":
        assert torch.isfinite(out.loss)
