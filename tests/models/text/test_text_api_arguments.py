"""Every argument of the text models' Python API has an effect, is refused with an error naming it, or is
accepted only where it changes nothing (what transformers' own machinery passes). Table-driven: one row per
argument and model; the BERT-style keyword arguments a transformers user passes are the rows."""

from __future__ import annotations

import tempfile
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from text_hf_helpers import tiny_config
from transformers import DynamicCache

from gmlp.models.text import (
    GMLPConfig,
    GMLPForCausalLM,
    GMLPForMaskedLM,
    GMLPForQuestionAnswering,
    GMLPForSequenceClassification,
    GMLPForTokenClassification,
    GMLPModel,
)

HEADS = {
    "base": GMLPModel,
    "mlm": GMLPForMaskedLM,
    "causal": GMLPForCausalLM,
    "seq": GMLPForSequenceClassification,
    "tok": GMLPForTokenClassification,
    "qa": GMLPForQuestionAnswering,
}
IDS = torch.tensor([[2, 7, 9, 11, 3], [2, 8, 12, 3, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
LEFT_IDS = torch.tensor([[2, 7, 9, 11], [0, 2, 8, 9]])
LEFT_MASK = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])


def _model(head: str, **config) -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = tiny_config(num_labels=3, **({"causal": True} if head == "causal" else {}), **config)
        return HEADS[head](cfg).eval()


def _main_output(out) -> torch.Tensor:
    for name in ("last_hidden_state", "logits", "start_logits"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    raise AssertionError(out)


_CAUSAL_MODEL = _model("causal")


def _filled_cache() -> DynamicCache:
    cache = DynamicCache()
    cache.update(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4), layer_idx=0)
    return cache


# ---------------------------------------------------------------------------------------------------------
# forward(): refused arguments, each with the name, the value it got and what is expected
# ---------------------------------------------------------------------------------------------------------
REFUSED = [
    # (heads, keyword arguments, error, message)
    # a cache of earlier tokens would be dropped and input_ids read as a sequence of their own
    (["causal"], lambda: {"past_key_values": _filled_cache()}, ValueError,
     r"past_key_values must be None \(or an empty cache\).*got DynamicCache holding 3 tokens"),
    (["causal"], lambda: {"cache": ((torch.zeros(1), torch.zeros(1)),)}, ValueError,
     r"cache must be None \(or an empty cache\).*got tuple of 1 layers"),
    (["causal"], lambda: {"cache_position": torch.arange(3, 8)}, ValueError,
     r"cache_position must be None or the positions 0 \.\. seq_len - 1 = 0 \.\. 4 .*got \[3, 4, 5, 6, 7\]"),
    (["causal"], lambda: {"cache_position": torch.arange(5)[None]}, ValueError,
     r"cache_position must be None or .*got \(1, 5\) torch.int64"),
    (["causal"], lambda: {"position_ids": torch.arange(5)[None] + 1}, ValueError,
     r"position_ids\[0, 0\] is 1, but that token is at position 0"),
    # an integer mask with other values than 0/1 (packed segment ids 1, 2, ...) was read as "all real"
    (list(HEADS), lambda: {"attention_mask": torch.tensor([[1, 1, 2, 2, 2], [1, 1, 1, 1, 0]])}, ValueError,
     r"attention_mask must hold 0 \(padding\) and 1 \(real token\) only, got 2"),
    (list(HEADS), lambda: {"attention_mask": torch.tensor([[1, 1, 1, 1, -1], [1, 1, 1, 1, 0]])}, ValueError,
     r"attention_mask must hold 0 .* only, got -1"),
    (list(HEADS), lambda: {"attention_mask": MASK.float() * -1e9}, ValueError,
     r"attention_mask must hold 0 .* only, got -1000000000.0; a float mask .*additive bias"),
    (list(HEADS), lambda: {"attention_mask": torch.ones(2, 1, 5, 5)}, ValueError,
     r"attention_mask must have shape \(batch, seq_len\) = \(2, 5\) like the input, got \(2, 1, 5, 5\)"),
    # BERT clamped a negative answer position to 0 (a silent [CLS] target); "ignored" is >= seq_len
    (["qa"], lambda: {"start_positions": torch.tensor([-1, 1]), "end_positions": torch.tensor([2, 2])},
     ValueError, r"start_positions of example 0 is -1; token indices must be >= 0 .*seq_len=5"),
    (["qa"], lambda: {"start_positions": torch.tensor([1, 1]), "end_positions": torch.tensor([2, -100])},
     ValueError, r"end_positions of example 1 is -100; token indices must be >= 0"),
    (["tok", "mlm", "causal"], lambda: {"labels": torch.zeros(2, 5, 1, dtype=torch.long)}, ValueError,
     r"labels must be an integer tensor of shape \(batch, seq_len\) = \(2, 5\) .*got \(2, 5, 1\)"),
    (["tok"], lambda: {"labels": torch.full((2, 5), 3)}, ValueError,  # (it said "vocab_size=3")
     r"labels contains 3 outside \[0, num_labels=3\)"),
    (["seq"], lambda: {"labels": torch.tensor([[0, 1, 2], [1, 0, 0]])}, ValueError,
     r"labels must be an integer tensor of shape \(batch,\) = \(2,\) or \(batch, 1\) of class ids"),
    (["qa"], lambda: {"start_positions": torch.tensor([1, 1])}, ValueError,
     r"start_positions was given without end_positions"),
    # arguments of BERT that gMLP has no counterpart for: Python's refusal names them
    (list(HEADS), lambda: {"head_mask": torch.ones(2)}, TypeError, r"head_mask"),
    (list(HEADS), lambda: {"encoder_hidden_states": torch.zeros(2, 5, 32)}, TypeError,
     r"encoder_hidden_states"),
    ([h for h in HEADS if h != "causal"], lambda: {"position_ids": torch.arange(5)[None]}, TypeError,
     r"position_ids"),
    ([h for h in HEADS if h != "causal"], lambda: {"past_key_values": None}, TypeError, r"past_key_values"),
]


@pytest.mark.parametrize(
    ("head", "kwargs", "error", "match"),
    [(head, kwargs, error, match) for heads, kwargs, error, match in REFUSED for head in heads],
)
def test_an_argument_that_cannot_be_honoured_is_refused_by_name(head, kwargs, error, match) -> None:
    model = _CAUSAL_MODEL if head == "causal" else _model(head)
    call = {"attention_mask": MASK, **kwargs()}
    with torch.no_grad(), pytest.raises(error, match=match):
        model(IDS, **call)


# ---------------------------------------------------------------------------------------------------------
# forward(): accepted where they change nothing (what generate, pipelines and Trainer pass)
# ---------------------------------------------------------------------------------------------------------
NO_CHANGE = [
    # (heads, config overrides, keyword arguments)
    (["causal"], {}, lambda: {"use_cache": True}),
    (["causal"], {}, lambda: {"use_cache": False, "past_key_values": None, "cache_position": None}),
    (["causal"], {}, lambda: {"past_key_values": DynamicCache()}),
    (["causal"], {}, lambda: {"cache": ()}),
    (["causal"], {}, lambda: {"cache_position": torch.arange(4)}),
    (["causal"], {}, lambda: {"position_ids": torch.tensor([[0, 1, 2, 3], [0, 0, 1, 2]])}),
    (["causal"], {}, lambda: {"position_ids": torch.tensor([[0, 1, 2, 3], [7, 0, 1, 2]])}),  # (pad: any)
    (["causal"], {}, lambda: {"logits_to_keep": 0}),
    (list(HEADS), {"type_vocab_size": 0}, lambda: {"token_type_ids": torch.zeros(2, 4, dtype=torch.long)}),
    (list(HEADS), {}, lambda: {"token_type_ids": torch.zeros(2, 4, dtype=torch.long)}),
    (list(HEADS), {}, lambda: {"attention_mask": LEFT_MASK.float()}),
    (list(HEADS), {}, lambda: {"attention_mask": LEFT_MASK.bool()}),
    (list(HEADS), {}, lambda: {"attention_mask": LEFT_MASK.to(torch.int8)}),
    (list(HEADS), {}, lambda: {"output_hidden_states": False, "return_dict": True}),
    (["base", "mlm", "seq", "tok", "qa"], {"tiny_attn_size": None}, lambda: {"output_attentions": False}),
]


@pytest.mark.parametrize(
    ("head", "config", "kwargs"),
    [(head, config, kwargs) for heads, config, kwargs in NO_CHANGE for head in heads],
)
def test_an_argument_accepted_for_compatibility_changes_nothing(head, config, kwargs) -> None:
    model = _CAUSAL_MODEL if head == "causal" and not config else _model(head, **config)
    call = kwargs()
    with torch.no_grad():
        plain = _main_output(model(LEFT_IDS, attention_mask=LEFT_MASK))
        given_ = _main_output(model(LEFT_IDS, **{"attention_mask": LEFT_MASK, **call}))
    assert torch.equal(plain, given_)


# ---------------------------------------------------------------------------------------------------------
# forward(): arguments that have an effect
# ---------------------------------------------------------------------------------------------------------
EFFECT = [
    # (heads, config overrides, keyword arguments, what the output must show)
    (list(HEADS), {}, lambda: {"token_type_ids": torch.ones(2, 4, dtype=torch.long)}, "differs"),
    (list(HEADS), {}, lambda: {"attention_mask": torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]])}, "differs"),
    (list(HEADS), {}, lambda: {"output_hidden_states": True}, "hidden_states"),
    (list(HEADS), {}, lambda: {"output_attentions": True}, "attentions"),
    (["mlm", "causal", "tok"], {}, lambda: {"labels": torch.tensor([[-100, 1, 2, -100], [0, 1, 2, 0]])},
     "loss"),
    (["seq"], {}, lambda: {"labels": torch.tensor([0, 2])}, "loss"),
    (["qa"], {}, lambda: {"start_positions": torch.tensor([1, 9]), "end_positions": torch.tensor([2, 9])},
     "loss"),
    (["causal"], {}, lambda: {"logits_to_keep": 1}, "last"),
]


@pytest.mark.parametrize(
    ("head", "config", "kwargs", "effect"),
    [(head, config, kwargs, effect) for heads, config, kwargs, effect in EFFECT for head in heads],
)
def test_an_argument_with_a_meaning_has_its_effect(head, config, kwargs, effect) -> None:
    model = _CAUSAL_MODEL if head == "causal" and not config else _model(head, **config)
    with torch.no_grad():
        plain = model(LEFT_IDS)
        out = model(LEFT_IDS, **kwargs())
    if effect == "differs":
        assert not torch.allclose(_main_output(plain), _main_output(out))
    elif effect == "last":
        assert torch.equal(_main_output(out), _main_output(plain)[:, -1:])
    elif effect == "hidden_states":
        assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    elif effect == "attentions":
        assert len(out.attentions) == model.config.num_hidden_layers
    else:
        assert out.loss is not None and torch.isfinite(out.loss)


def test_return_dict_false_gives_the_fields_as_a_tuple() -> None:
    for head in HEADS:
        model = _CAUSAL_MODEL if head == "causal" else _model(head)
        with torch.no_grad():
            out = model(LEFT_IDS, return_dict=False)
        assert isinstance(out, tuple) and torch.equal(out[0], _main_output(model(LEFT_IDS)))


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    values=st.lists(st.integers(-3, 3), min_size=8, max_size=8),
    dtype=st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.float32]),
)
def test_an_attention_mask_of_0_and_1_in_any_dtype_is_the_bool_mask_else_refused(values, dtype) -> None:
    """A 0/1 mask of any integer or float dtype gives exactly the outputs of the bool mask; any other value
    is refused (it was read as a real token: packed sequences' segment ids were mixed into one)."""
    model = _model("base")
    raw = torch.tensor(values).reshape(2, 4)
    if dtype == torch.uint8:
        raw = raw.abs()
    raw[:, 0] = 1  # at least one real token per row
    mask = raw.to(dtype)
    if bool(((raw != 0) & (raw != 1)).any()):
        with pytest.raises(ValueError, match="attention_mask must hold 0 .* and 1 .* only, got"):
            model(LEFT_IDS, attention_mask=mask)
        return
    with torch.no_grad():
        assert torch.equal(
            model(LEFT_IDS, attention_mask=mask).last_hidden_state,
            model(LEFT_IDS, attention_mask=mask.bool()).last_hidden_state,
        )


# ---------------------------------------------------------------------------------------------------------
# generate()
# ---------------------------------------------------------------------------------------------------------
def _generate(**kwargs) -> torch.Tensor:
    options = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0, **kwargs}
    return _CAUSAL_MODEL.generate(LEFT_IDS, attention_mask=LEFT_MASK, **options)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"position_ids": torch.tensor([[0, 1, 2, 3], [0, 0, 1, 2]])},  # the positions generate() computes
        {"position_ids": torch.tensor([[0, 1, 2, 3], [1, 0, 1, 2]])},  # (any value on padding)
        {"use_cache": False},
        {"use_cache": True},
        {"num_beams": 1},
    ],
)
def test_generate_arguments_that_change_nothing(kwargs) -> None:
    assert torch.equal(_generate(**kwargs), _generate())


def test_generate_refuses_position_ids_it_cannot_honour() -> None:
    """They were passed to generate(), extended by transformers each step and silently dropped."""
    shifted = torch.tensor([[5, 6, 7, 8], [0, 5, 6, 7]])
    with pytest.raises(ValueError, match=r"position_ids\[0, 0\] is 5, but that token is at position 0"):
        _generate(position_ids=shifted)
    with pytest.raises(ValueError, match=r"position_ids must be an integer tensor of shape"):
        _generate(position_ids=torch.zeros(2, 4))


def test_generate_refuses_model_arguments_gmlp_has_not() -> None:
    with pytest.raises(ValueError, match=r"not used by the model: \['head_mask'\]"):
        _generate(head_mask=torch.ones(2))


@pytest.mark.parametrize("kwargs", [{"num_beams": 2}, {"do_sample": True, "top_k": 3}, {"min_new_tokens": 2}])
def test_generate_decoding_options_run(kwargs) -> None:
    torch.manual_seed(0)
    assert _generate(**kwargs).shape == (2, 7)


# ---------------------------------------------------------------------------------------------------------
# methods
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "multiple", "match"),
    [(3, None, r"config.sep_token_id=3 outside the vocabulary \[0, 3\)"),
     (4, None, r"config.mask_token_id=4 outside the vocabulary \[0, 4\)"),
     (2, 2, r"config.cls_token_id=2 outside the vocabulary \[0, 2\)")],
)
def test_resize_token_embeddings_refuses_to_cut_off_a_special_token(size, multiple, match) -> None:
    """The saved config then failed to load (its ids are checked against vocab_size)."""
    model = _model("mlm")
    before = model.get_input_embeddings().weight.shape
    with pytest.raises(ValueError, match=match):
        model.resize_token_embeddings(size, pad_to_multiple_of=multiple)
    assert model.get_input_embeddings().weight.shape == before


def test_config_keeps_every_special_token_id_through_save_and_load(tmp_path) -> None:
    """transformers 4.x's PretrainedConfig.__init__ reset sep_token_id to None (so did every saved config)."""
    ids = {"pad_token_id": 1, "cls_token_id": 2, "sep_token_id": 3, "mask_token_id": 4, "bos_token_id": 5,
           "eos_token_id": 6}  # fmt: skip
    config = tiny_config(**ids)
    config.save_pretrained(tmp_path)
    for loaded in (config, GMLPConfig.from_pretrained(tmp_path)):
        assert {name: getattr(loaded, name) for name in ids} == ids


def test_resize_token_embeddings_keeps_a_model_that_saves_and_loads(tmp_path) -> None:
    model = _model("mlm")
    model.resize_token_embeddings(13, pad_to_multiple_of=4)  # 16 > every special id (0..4), every input id
    assert model.config.vocab_size == 16 and model.decoder.bias.shape == (16,)
    model.save_pretrained(tmp_path)
    loaded = GMLPForMaskedLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(LEFT_IDS).logits, model(LEFT_IDS).logits)


# ---------------------------------------------------------------------------------------------------------
# config arguments
# ---------------------------------------------------------------------------------------------------------
CONFIG_REFUSED = [
    ({"is_decoder": True}, r"is_decoder=True .* use causal=True .*got is_decoder=True with causal=False"),
    ({"add_cross_attention": True}, r"add_cross_attention=True is not supported: gMLP has no cross-atten"),
]


@pytest.mark.parametrize(("kwargs", "match"), CONFIG_REFUSED)
def test_config_refuses_an_argument_that_would_have_no_effect(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_config(**kwargs)
    with tempfile.TemporaryDirectory() as path:  # the same as a loading override (it was dropped there)
        tiny_config().save_pretrained(path)
        with pytest.raises(ValueError, match=match):
            GMLPConfig.from_pretrained(path, **kwargs)


def test_config_is_decoder_with_causal_is_accepted() -> None:
    assert tiny_config(is_decoder=True, causal=True).causal
    assert not tiny_config(is_decoder=False, add_cross_attention=False).causal


@pytest.mark.parametrize(
    ("kwargs", "warns"),
    [({"num_attention_heads": 8}, True), ({"attention_probs_dropout_prob": 0.1}, True),
     ({"hidden_act": "relu"}, True), ({"hidden_act": "gelu"}, False),
     ({"position_embedding_type": "absolute"}, True), ({"chunk_size_feed_forward": 0}, False)],
)
def test_config_warns_about_bert_arguments_without_effect(kwargs, warns) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_config(**kwargs)
    messages = [str(w.message) for w in caught if "an argument of BERT" in str(w.message)]
    assert len(messages) == int(warns)
    if warns:
        key = next(iter(kwargs))
        assert f"GMLPConfig got {key}=" in messages[0] and "no effect" in messages[0]
