"""Input validation of the gMLP text models: integer dtypes are cast, bad labels, positions, embeddings
and configs give clear errors that name the argument (never a shape or dtype error from inside torch)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from gmlp.models.text import (
    GMLPConfig,
    GMLPForCausalLM,
    GMLPForMaskedLM,
    GMLPForQuestionAnswering,
    GMLPForSequenceClassification,
    GMLPModel,
)

VOCAB, DIM, FFN, LAYERS, SEQ, BATCH = 50, 16, 32, 2, 12, 4


def tiny_config(**overrides) -> GMLPConfig:
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=LAYERS,
        max_position_embeddings=SEQ,
    )
    kwargs.update(overrides)
    return GMLPConfig(**kwargs)


def build(cls, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    if cls is GMLPForCausalLM:
        overrides.setdefault("causal", True)
    return cls(tiny_config(**overrides)).eval()


def ids(batch: int = BATCH, seq: int = 8) -> torch.Tensor:
    return torch.randint(5, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def mlm_labels(x: torch.Tensor) -> torch.Tensor:
    labels = torch.full_like(x, -100)
    labels[:, 2] = x[:, 2]
    labels[0, 5] = 7
    return labels


LM_CASES = [
    pytest.param(GMLPForMaskedLM, {}, id="mlm"),
    pytest.param(GMLPForMaskedLM, {"sparse_prediction": True}, id="mlm-sparse"),
    pytest.param(GMLPForMaskedLM, {"sparse_prediction": True, "max_predictions_per_seq": 3}, id="mlm-static"),
    pytest.param(GMLPForCausalLM, {}, id="clm"),
]


def lm_labels(cls, x: torch.Tensor) -> torch.Tensor:
    return x.clone() if cls is GMLPForCausalLM else mlm_labels(x)


# ---------------------------------------------------------------------------------------------------
# A2/A3: masked / causal LM labels
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8])
@pytest.mark.parametrize(("cls", "extra"), LM_CASES)
def test_lm_labels_of_any_integer_dtype_give_the_int64_loss(cls, extra, dtype) -> None:
    model = build(cls, **extra)
    x = ids()
    labels = lm_labels(cls, x)
    with torch.no_grad():
        ref = model(x, labels=labels)
        got = model(x, labels=labels.to(dtype))
    torch.testing.assert_close(got.loss, ref.loss, atol=0, rtol=0)
    torch.testing.assert_close(got.logits, ref.logits, atol=0, rtol=0)


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 10, -5])
@pytest.mark.parametrize(("cls", "extra"), LM_CASES)
def test_lm_labels_outside_the_vocabulary_raise(cls, extra, bad: int) -> None:
    model = build(cls, **extra)
    x = ids()
    labels = lm_labels(cls, x)
    labels[1, 2] = bad
    with pytest.raises(ValueError, match=rf"labels contains {bad} outside \[0, vocab_size={VOCAB}\).*-100"):
        model(x, labels=labels)


def test_mlm_uint8_labels_cannot_hold_minus_100() -> None:
    """-100 wraps to 156 in uint8: that is out of the vocabulary, not silently a wrong target."""
    model = build(GMLPForMaskedLM)
    x = ids()
    with pytest.raises(ValueError, match=r"labels contains 156 outside \[0, vocab_size=50\)"):
        model(x, labels=mlm_labels(x).to(torch.uint8))


# ---------------------------------------------------------------------------------------------------
# A4/A4b: input_ids, token_type_ids and inputs_embeds dtypes
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16])
@pytest.mark.parametrize("cls", [GMLPModel, GMLPForMaskedLM, GMLPForCausalLM])
def test_small_integer_input_ids_are_accepted(cls, dtype) -> None:
    model = build(cls)
    x = ids()
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    with torch.no_grad():
        ref = model(x, attention_mask=mask)[0]
        got = model(x.to(dtype), attention_mask=mask)[0]
    torch.testing.assert_close(got, ref, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int16, torch.uint8, torch.int8])
def test_small_integer_and_bool_token_type_ids_are_accepted(dtype) -> None:
    model = build(GMLPModel)
    x = ids()
    types = torch.zeros_like(x)
    types[:, 4:] = 1
    with torch.no_grad():
        ref = model(x, token_type_ids=types).last_hidden_state
        got = model(x, token_type_ids=types.to(dtype)).last_hidden_state
    torch.testing.assert_close(got, ref, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16, torch.long])
@pytest.mark.parametrize("types", [2, 0])
def test_inputs_embeds_of_another_dtype_raise(dtype, types: int) -> None:
    model = build(GMLPModel, type_vocab_size=types)
    embeds = torch.randn(BATCH, 8, DIM).to(dtype)
    with pytest.raises(ValueError, match=rf"inputs_embeds has dtype {dtype}, but the model's parameters are "
                       r"torch.float32"):  # fmt: skip
        model(inputs_embeds=embeds)


def test_inputs_embeds_matching_the_model_or_autocast_dtype_are_accepted() -> None:
    model = build(GMLPModel)
    embeds = torch.randn(BATCH, 8, DIM, dtype=torch.float64)
    assert model.double()(inputs_embeds=embeds).last_hidden_state.dtype == torch.float64
    model.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(inputs_embeds=embeds.to(torch.bfloat16))
        with pytest.raises(ValueError, match=r"inputs_embeds has dtype torch.float64"):
            model(inputs_embeds=embeds)


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        ({"input_ids": torch.ones(4, 8)},
         r"input_ids must be an integer tensor of shape \(batch, seq_len\), got \(4, 8\) torch.float32"),
        ({"input_ids": torch.ones(4, 8, dtype=torch.bool)}, r"got \(4, 8\) torch.bool"),
        ({"input_ids": torch.ones(4, 8, dtype=torch.complex64)}, r"got \(4, 8\) torch.complex64"),
        ({"input_ids": torch.ones(4, 8, dtype=torch.long), "token_type_ids": torch.zeros(4, 8)},
         r"token_type_ids must be an integer or bool tensor of shape \(batch, seq_len\) = \(4, 8\), "
         r"got \(4, 8\) torch.float32"),
        ({"input_ids": torch.ones(4, 8, dtype=torch.long), "attention_mask": torch.ones(4, 7)},
         r"attention_mask must have shape \(batch, seq_len\) = \(4, 8\).*got \(4, 7\) torch.float32"),
        ({"inputs_embeds": torch.ones(4, 8, DIM + 1, dtype=torch.float64)},
         rf"inputs_embeds must have shape \(batch, seq_len, hidden_size={DIM}\), got \(4, 8, {DIM + 1}\) "
         r"torch.float64"),
    ],
)
def test_dtype_errors_state_the_dtype(inputs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build(GMLPModel)(**inputs)


# ---------------------------------------------------------------------------------------------------
# A5/A6: sequence classification and regression labels
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8])
def test_classification_labels_of_any_integer_dtype_are_class_ids(dtype) -> None:
    model = build(GMLPForSequenceClassification, num_labels=3)
    x, labels = ids(), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        out = model(x, labels=labels.to(dtype))
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    assert model.config.problem_type == "single_label_classification"
    labels = torch.tensor([0, -100, 2, 1])  # a (batch, 1) column; -100 = example ignored
    with torch.no_grad():
        out = model(x, labels=labels[:, None].to(torch.int32))
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (torch.tensor([0, 1, 5, 0]), r"labels contains 5 outside \[0, num_labels=3\)"),
        (torch.tensor([0, -1, 2, 0]), r"labels contains -1 outside \[0, num_labels=3\)"),
        (torch.zeros(4, 2, dtype=torch.long),
         r"labels must be an integer tensor of shape \(batch,\) = \(4,\) or \(batch, 1\) .*"
         r"single_label_classification.*got \(4, 2\) torch.int64"),
        (torch.zeros(3, dtype=torch.long), r"got \(3,\) torch.int64"),
        (torch.zeros(4, dtype=torch.bool), r"got \(4,\) torch.bool"),
        ([0, 1, 2, 0], r"labels must be a torch.Tensor of shape \(batch,\) .*got list"),
        (torch.zeros(4), r"labels must be a float tensor of shape \(batch, num_labels\) = \(4, 3\) .*"
                         r"multi_label_classification.*got \(4,\) torch.float32"),
        (torch.full((4, 3), 2.0), r"labels contains 2.0 outside \[0, 1\]"),
    ],
)
def test_bad_classification_labels_raise(labels, match: str) -> None:
    model = build(GMLPForSequenceClassification, num_labels=3)
    with pytest.raises(ValueError, match=match):
        model(ids(), labels=labels)


def test_problem_type_inferred_from_float_labels_is_named_by_later_errors() -> None:
    """The first labels decide ``config.problem_type`` (kept, as in transformers); a later call with the
    other kind of labels gets an error that names problem_type and how to change it."""
    model = build(GMLPForSequenceClassification, num_labels=3)
    x = ids()
    model(x, labels=torch.tensor([[1.0, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 1]]))
    assert model.config.problem_type == "multi_label_classification"
    with pytest.raises(ValueError, match=r"config.problem_type='multi_label_classification'.*inferred from "
                       r"the labels of an earlier call"):  # fmt: skip
        model(x, labels=torch.tensor([0, 1, 2, 0]))
    model.config.problem_type = "single_label_classification"
    model(x, labels=torch.tensor([0, 1, 2, 0]))


def test_explicit_problem_type_decides_the_kind_of_labels() -> None:
    model = build(GMLPForSequenceClassification, num_labels=3, problem_type="single_label_classification")
    with pytest.raises(ValueError, match=r"labels must be an integer tensor .*config.problem_type="
                       r"'single_label_classification' \(set in the config\)"):  # fmt: skip
        model(ids(), labels=torch.zeros(4))
    # multi-label: integer or bool multi-hot labels are the float targets
    model = build(GMLPForSequenceClassification, num_labels=3, problem_type="multi_label_classification")
    target = torch.tensor([[1.0, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 1]])
    with torch.no_grad():
        ref = model(ids(), labels=target).loss
        for dtype in (torch.long, torch.bool, torch.uint8):
            torch.testing.assert_close(model(ids(), labels=target.to(dtype)).loss, ref)


@pytest.mark.parametrize("shape", [(3, 3), (3, 2), (3, 1, 1), (2,)])
def test_regression_labels_of_the_wrong_shape_raise(shape) -> None:
    model = build(GMLPForSequenceClassification, num_labels=1)
    with pytest.raises(ValueError, match=r"labels must be a float tensor of shape \(batch,\) = \(3,\) or "
                       rf"\(batch, 1\).*got \({', '.join(map(str, shape))},?\) torch.float32"):  # fmt: skip
        model(ids(3), labels=torch.randn(shape))


def test_regression_labels_as_column_or_integers() -> None:
    model = build(GMLPForSequenceClassification, num_labels=1)
    x, target = ids(3), torch.tensor([0.5, -1.0, 2.0])
    with torch.no_grad():
        ref = model(x, labels=target).loss
        torch.testing.assert_close(model(x, labels=target[:, None]).loss, ref)
        torch.testing.assert_close(
            model(x, labels=torch.tensor([1, 0, 2])).loss, model(x, labels=torch.tensor([1.0, 0, 2])).loss
        )
    with pytest.raises(ValueError, match=r"regression.*got \(3,\) torch.bool"):
        model(x, labels=torch.ones(3, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------
# A7: question answering positions
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("start", "end", "match"),
    [
        (torch.ones(4), torch.ones(4), r"start_positions must be an integer tensor of shape \(batch,\) = "
                                       r"\(4,\) or \(batch, 1\).*got \(4,\) torch.float32"),
        (torch.ones(4, 2, dtype=torch.long), torch.ones(4, 2, dtype=torch.long), r"got \(4, 2\) torch.int64"),
        (torch.ones(4, dtype=torch.long), torch.ones(3, dtype=torch.long),
         r"end_positions must be an integer tensor .*got \(3,\) torch.int64"),
        ([1, 2, 3, 4], [1, 2, 3, 4], r"start_positions must be an integer tensor.*got list"),
        (torch.tensor([1, 2, 3, 4]), None, r"start_positions was given without end_positions"),
        (None, torch.tensor([1, 2, 3, 4]), r"end_positions was given without start_positions"),
    ],
)
def test_bad_answer_positions_raise(start, end, match: str) -> None:
    model = build(GMLPForQuestionAnswering)
    with pytest.raises(ValueError, match=match):
        model(ids(), start_positions=start, end_positions=end)


def test_answer_positions_as_columns_and_small_integers() -> None:
    model = build(GMLPForQuestionAnswering)
    x, start, end = ids(), torch.tensor([1, 3, 0, 7]), torch.tensor([2, 99, 4, 7])
    with torch.no_grad():
        ref = model(x, start_positions=start, end_positions=end).loss
        got = model(x, start_positions=start[:, None].int(), end_positions=end[:, None].to(torch.uint8)).loss
    torch.testing.assert_close(got, ref, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------
# A12: num_labels and problem_type
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_labels", [0, -2, 2.5, True, None])
def test_config_refuses_non_positive_num_labels(num_labels) -> None:
    with pytest.raises(ValueError, match=rf"num_labels must be a positive int, got {num_labels!r}"):
        tiny_config(num_labels=num_labels)


def test_config_refuses_unknown_problem_type() -> None:
    with pytest.raises(ValueError, match=r"problem_type must be None or one of .*'regression'.*got 'bogus'"):
        tiny_config(problem_type="bogus")


def test_config_label_defaults_and_round_trip_unchanged(tmp_path) -> None:
    assert GMLPConfig().num_labels == 2
    config = tiny_config(num_labels=4, problem_type="multi_label_classification")
    config.save_pretrained(tmp_path)
    loaded = GMLPConfig.from_pretrained(tmp_path)
    assert (loaded.num_labels, loaded.problem_type) == (4, "multi_label_classification")
    assert GMLPConfig.from_pretrained(tmp_path, num_labels=4).num_labels == 4
    with pytest.raises(ValueError, match=r"num_labels must be a positive int, got 0"):
        GMLPConfig.from_pretrained(tmp_path, num_labels=0)


@pytest.mark.parametrize("num_labels", [0, -2, 2.5, True])
@pytest.mark.parametrize("loader", [GMLPConfig, AutoConfig, AutoModelForSequenceClassification])
def test_num_labels_override_is_checked_on_every_loading_path(tmp_path, loader, num_labels) -> None:
    """A bad num_labels given to from_pretrained is refused however the config is loaded (transformers 4.x
    set it as an attribute after the checks: 0 or -2 gave an empty label map); a good one still replaces
    the saved label maps, as transformers does."""
    config = tiny_config(num_labels=4, id2label={i: f"c{i}" for i in range(4)})
    GMLPForSequenceClassification(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"num_labels must be a positive int, got {num_labels!r}"):
        loader.from_pretrained(tmp_path, num_labels=num_labels)
    model = loader is AutoModelForSequenceClassification
    extra = {"ignore_mismatched_sizes": True} if model else {}  # the classifier is re-drawn for 3 labels
    loaded = loader.from_pretrained(tmp_path, num_labels=3, **extra)
    config = loaded.config if model else loaded
    assert (config.num_labels, len(config.id2label)) == (3, 3)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"hidden_dropout_prob": 1.5}, r"hidden_dropout_prob must be a float in \[0, 1\), got 1.5"),
        ({"toeplitz": "no"}, r"toeplitz must be a bool, got 'no'"),
        ({"sgu_variant": "bogus"}, r"sgu_variant must be one of .*got 'bogus'"),
        ({"sgu_heads": 3}, r"sgu_heads must divide the gate width .*got 3"),
        ({"pad_token_id": VOCAB}, rf"pad_token_id must be None or an int in \[0, vocab_size={VOCAB}\)"),
        ({"max_predictions_per_seq": 4}, r"max_predictions_per_seq needs sparse_prediction=True"),
        ({"problem_type": "regresion"}, r"problem_type must be None or one of .*got 'regresion'"),
    ],
)
def test_from_pretrained_overrides_are_validated(tmp_path, override: dict, match: str) -> None:
    """transformers sets from_pretrained's config overrides as attributes after building the config; here
    they are checked like the constructor's arguments (a bad one used to be taken silently)."""
    tiny_config(num_labels=3).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=match):
        GMLPConfig.from_pretrained(tmp_path, **override)
    with pytest.raises(ValueError, match=match):
        AutoModelForSequenceClassification.from_pretrained(tmp_path, **override)
    config, unused = GMLPConfig.from_pretrained(
        tmp_path, hidden_dropout_prob=0.25, sgu_heads=2, problem_type="regression", unknown_option=1,
        return_unused_kwargs=True,
    )  # valid overrides are applied as before; unknown ones still come back unused
    assert (config.hidden_dropout_prob, config.sgu_heads, config.problem_type) == (0.25, 2, "regression")
    assert unused == {"unknown_option": 1}


def test_config_takes_a_list_of_eos_token_ids(tmp_path) -> None:
    """eos_token_id may list several stop tokens, as in transformers' own configs (GPT-2, Llama, ...)."""
    config = tiny_config(causal=True, eos_token_id=[5, 6])
    config.save_pretrained(tmp_path)
    assert GMLPConfig.from_pretrained(tmp_path).eos_token_id == [5, 6]
    model = GMLPForCausalLM(config).eval()
    assert model.generation_config.eos_token_id == [5, 6]
    with torch.no_grad():  # a head that always predicts token 6: generation stops after it
        model.lm_head.bias.copy_(torch.arange(VOCAB) == 6)
        model.lm_head.bias.mul_(100)
    out = model.generate(torch.tensor([[2, 7, 9]]), max_new_tokens=5, do_sample=False)
    assert out.tolist() == [[2, 7, 9, 6]]
    for bad in ([5, VOCAB], [], [5, True]):
        with pytest.raises(ValueError, match=r"eos_token_id must be None or an int or a non-empty list"):
            tiny_config(eos_token_id=bad)
    with pytest.raises(ValueError, match=r"bos_token_id must be None or an int in"):
        tiny_config(bos_token_id=[1])


def test_classification_head_refuses_a_config_changed_to_bad_labels() -> None:
    config = tiny_config(num_labels=3)
    config.num_labels = 0  # id2label = {}: nothing to classify
    with pytest.raises(ValueError, match=r"GMLPForSequenceClassification needs config.num_labels >= 1 "
                       r".*got 0"):  # fmt: skip
        GMLPForSequenceClassification(config)
    config = tiny_config(num_labels=3)
    config.problem_type = "bogus"
    with pytest.raises(ValueError, match=r"problem_type must be None or one of .*got 'bogus'"):
        GMLPForSequenceClassification(config)


# ---------------------------------------------------------------------------------------------------
# A13: GMLPForCausalLM leaves the caller's config alone
# ---------------------------------------------------------------------------------------------------
def test_causal_lm_does_not_change_the_callers_config(tmp_path) -> None:
    config = tiny_config(causal=False)
    model = GMLPForCausalLM(config)
    assert config.causal is False
    assert model.config.causal is True and model.config is not config
    assert all(block.sgu.proj.causal for block in model.gmlp.blocks)
    assert not any(block.sgu.proj.causal for block in GMLPForMaskedLM(config).gmlp.blocks)

    model.eval().save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, GMLPForCausalLM) and loaded.config.causal is True
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=0, rtol=0)
