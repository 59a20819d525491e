"""What a transformers user expects of the gMLP text models beyond the basics of test_text_hf_integration:
aMLP attention maps (``output_attentions``), ``logits_to_keep``, ``position_ids`` (packed rows refused),
loading options, vocabulary resizing, feature extraction, ``Trainer`` with every head.

Everything is local (tiny models, an in-memory tokenizer): nothing comes from the Hub.
"""

from __future__ import annotations

import pytest
import torch
from text_hf_helpers import VOCAB, WORDS, loading_options, make_tokenizer, randomize, tiny_config
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, pipeline

from gmlp.models.text import (
    GMLPForCausalLM,
    GMLPForMaskedLM,
    GMLPForQuestionAnswering,
    GMLPForSequenceClassification,
    GMLPForTokenClassification,
    GMLPModel,
)

HEADS = [GMLPModel, GMLPForMaskedLM, GMLPForSequenceClassification, GMLPForTokenClassification,
         GMLPForQuestionAnswering, GMLPForCausalLM]  # fmt: skip


def _model(cls: type, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    if cls is GMLPForCausalLM:
        overrides.setdefault("causal", True)
    model = cls(tiny_config(**overrides))
    base = model.gmlp if hasattr(model, "gmlp") else model
    with torch.no_grad():  # a tiny attention that really prefers some keys (the init is near uniform)
        for block in base.blocks:
            if block.tiny_attn is not None:
                block.tiny_attn.qkv.weight.normal_(0, 0.5)
    return randomize(model, seed)


# ---------------------------------------------------------------------------------------------------
# output_attentions (aMLP)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_attention_maps_are_the_ones_the_tiny_attention_uses(causal: bool) -> None:
    """Parity with the module itself: out(maps @ v) is the tiny attention's output, for a padded batch."""
    model = _model(GMLPModel, causal=causal)
    ids = torch.randint(5, len(VOCAB), (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding: the blocks see the input's positions
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def keep(module, args, output) -> None:
        seen.append((args[0], args[1], output))

    hooks = [block.tiny_attn.register_forward_hook(keep) for block in model.blocks]
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_attentions=True)
    for hook in hooks:
        hook.remove()
    assert len(out.attentions) == len(seen) == model.config.num_hidden_layers
    for maps, (x, block_mask, output), block in zip(out.attentions, seen, model.blocks, strict=True):
        assert maps.shape == (3, 1, 9, 9)
        attn = block.tiny_attn
        x = x.masked_fill(~block_mask.t().unsqueeze(-1), 0.0)
        v = attn.qkv(x).chunk(3, dim=-1)[2].transpose(0, 1)  # (batch, seq, attn_dim)
        rebuilt = attn.out(maps[:, 0] @ v).transpose(0, 1)
        torch.testing.assert_close(rebuilt, output, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(maps.sum(-1), torch.ones(3, 1, 9))
        real = mask.bool()
        assert (maps[1, 0][real[1]][:, ~real[1]] == 0).all()  # no real query reads a padded key
        if causal:
            assert (maps[:, 0].triu(1) == 0).all()


@pytest.mark.parametrize("layout", ["left", "inner"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_maps_of_a_padded_row_are_the_unpadded_maps(layout: str, causal: bool) -> None:
    """Left or inner padding (the real tokens are moved inside the model): the maps come back in the input's
    positions, equal at real tokens to the maps of the row without its padding."""
    model = _model(GMLPForSequenceClassification, causal=causal, num_labels=2)
    row = torch.randint(5, len(VOCAB), (1, 6))
    pads = torch.full((1, 3), 9)
    padded = torch.cat([pads, row], 1) if layout == "left" else torch.cat([row[:, :2], pads, row[:, 2:]], 1)
    mask = (torch.arange(9) >= 3) if layout == "left" else ~((torch.arange(9) >= 2) & (torch.arange(9) < 5))
    with torch.no_grad():
        alone = model(row, output_attentions=True).attentions
        got = model(padded, attention_mask=mask[None].long(), output_attentions=True).attentions
    for a, g in zip(alone, got, strict=True):
        torch.testing.assert_close(g[0, 0][mask][:, mask], a[0, 0], atol=1e-6, rtol=1e-5)
        assert (g[0, 0][mask][:, ~mask] == 0).all()


@pytest.mark.parametrize("cls", HEADS)
def test_every_head_returns_attentions_and_tuples_in_order(cls: type) -> None:
    model = _model(cls, num_labels=2)
    ids = torch.randint(5, len(VOCAB), (2, 7))
    with torch.no_grad():
        out = model(ids, output_attentions=True, output_hidden_states=True)
        flat = model(ids, output_attentions=True, output_hidden_states=True, return_dict=False)
        plain = model(ids)
    assert len(out.attentions) == model.config.num_hidden_layers
    assert out.attentions[0].shape == (2, 1, 7, 7)
    # the tuple is the ModelOutput's fields in order, (..., hidden_states, attentions)
    assert len(flat) == len(out.to_tuple())
    for a, b in zip(flat, out.to_tuple(), strict=True):
        if isinstance(a, tuple):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        else:
            assert torch.equal(a, b)
    assert plain.attentions is None
    first = plain.to_tuple()[0]
    assert torch.equal(first, out.to_tuple()[0])  # asking for maps changes no output


@pytest.mark.parametrize("cls", HEADS)
def test_plain_gmlp_refuses_output_attentions_clearly(cls: type) -> None:
    model = _model(cls, tiny_attn_size=None, num_labels=2)
    ids = torch.randint(5, len(VOCAB), (1, 5))
    assert model(ids, output_attentions=False).attentions is None
    with pytest.raises(ValueError, match=r"output_attentions=True needs the tiny attention of aMLP"):
        model(ids, output_attentions=True)


def test_config_output_attentions_is_the_default() -> None:
    model = _model(GMLPForMaskedLM, output_attentions=True)
    with torch.no_grad():
        assert len(model(torch.tensor([[2, 7, 9]])).attentions) == model.config.num_hidden_layers
        assert model(torch.tensor([[2, 7, 9]]), output_attentions=False).attentions is None
    # a gMLP saved with output_attentions=True in its config keeps working (no maps to give); only an
    # explicit output_attentions=True is refused
    plain = _model(GMLPForMaskedLM, output_attentions=True, tiny_attn_size=None)
    with torch.no_grad():
        assert plain(torch.tensor([[2, 7, 9]])).attentions is None


def test_position_ids_are_checked_before_the_model_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(GMLPForCausalLM)
    monkeypatch.setattr(model.gmlp, "forward", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(ValueError, match=r"position_ids\[0, 3\] is 0"):
        model(torch.tensor([[5, 6, 7, 8, 9]]), position_ids=torch.tensor([[0, 1, 2, 0, 1]]))


def test_logits_to_keep_takes_numpy_ints() -> None:
    import numpy as np

    model = _model(GMLPForCausalLM)
    with torch.no_grad():
        assert model(torch.tensor([[5, 6, 7, 8]]), logits_to_keep=np.int64(2)).logits.shape[1] == 2
    with pytest.raises(ValueError, match="logits_to_keep must be an int >= 0"):
        model(torch.tensor([[5, 6, 7, 8]]), logits_to_keep=True)


def test_attention_maps_carry_gradients() -> None:
    model = _model(GMLPModel).train()
    maps = model(torch.tensor([[2, 7, 9, 11]]), output_attentions=True).attentions
    maps[0][0, 0, 2, 1].backward()
    assert model.blocks[0].tiny_attn.qkv.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------
# causal LM keyword arguments: logits_to_keep, position_ids
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["logits_to_keep", "num_logits_to_keep"])
def test_logits_to_keep_returns_those_positions(name: str) -> None:
    model = _model(GMLPForCausalLM)
    ids = torch.randint(5, len(VOCAB), (2, 8))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding, as in generation
    with torch.no_grad():
        full = model(ids, attention_mask=mask, labels=ids)
        for keep, index in ((0, slice(None)), (1, slice(-1, None)), (3, slice(-3, None)), (20, slice(None))):
            out = model(ids, attention_mask=mask, **{name: keep})
            torch.testing.assert_close(out.logits, full.logits[:, index], atol=1e-6, rtol=0)
            with_labels = model(ids, attention_mask=mask, labels=ids, **{name: keep})
            torch.testing.assert_close(with_labels.loss, full.loss)  # the loss covers every position
            assert with_labels.logits.shape == full.logits[:, index].shape
        positions = torch.tensor([0, 5, 7])
        out = model(ids, attention_mask=mask, **{name: positions})
        torch.testing.assert_close(out.logits, full.logits[:, positions], atol=1e-6, rtol=0)
    for bad in (-1, 1.5, True, torch.tensor([[1]])):
        with pytest.raises(ValueError, match="logits_to_keep must be an int >= 0"):
            model(ids, **{name: bad})


def test_packed_rows_with_restarting_position_ids_are_refused() -> None:
    """DataCollatorWithFlattening packs several sequences into one row and marks them by position_ids
    restarting at 0; gMLP cannot honour that (no position embeddings), so it must not mix them silently."""
    from transformers import DataCollatorWithFlattening

    model = _model(GMLPForCausalLM)
    batch = DataCollatorWithFlattening()([{"input_ids": [2, 7, 9, 11, 3]}, {"input_ids": [2, 8, 3]}])
    assert "position_ids" in batch and "attention_mask" not in batch
    with pytest.raises(ValueError, match=r"position_ids\[0, 5\] is 0, but that token is at position 5 .*"
                       r"DataCollatorWithFlattening"):  # fmt: skip
        model(**batch)


def test_position_ids_that_repeat_the_model_s_positions_are_accepted() -> None:
    model = _model(GMLPForCausalLM)
    ids = torch.randint(5, len(VOCAB), (2, 6))
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        generate_style = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # what generate() computes
        torch.testing.assert_close(
            model(ids, attention_mask=mask, position_ids=generate_style).logits, expected
        )
        model(ids, position_ids=torch.arange(6)[None])  # (1, seq_len), no mask
    with pytest.raises(ValueError, match=r"position_ids\[0, 0\] is 3"):
        model(ids, position_ids=torch.arange(3, 9)[None])  # shifted: not what the model does
    with pytest.raises(ValueError, match=r"position_ids must be an integer tensor of shape \(batch, seq_len"):
        model(ids, position_ids=torch.arange(5)[None])


# ---------------------------------------------------------------------------------------------------
# loading, resizing, pipelines, Trainer (regression cover of what already works)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options", [{"dtype": "auto"}, {"device_map": "cpu"}, {"low_cpu_mem_usage": True}], ids=str
)
@pytest.mark.parametrize(("auto", "cls"), [(AutoModelForMaskedLM, GMLPForMaskedLM),
                                           (AutoModelForCausalLM, GMLPForCausalLM)])  # fmt: skip
def test_loading_options_give_identical_tied_models(tmp_path, options: dict, auto, cls) -> None:
    model = _model(cls).eval()
    ids = torch.randint(5, len(VOCAB), (2, 8))
    model.save_pretrained(tmp_path, safe_serialization=True)
    loaded = auto.from_pretrained(tmp_path, **loading_options(options)).eval()
    assert loaded.dtype == torch.float32
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_dtype_auto_keeps_the_saved_dtype(tmp_path) -> None:
    _model(GMLPForMaskedLM).to(torch.bfloat16).save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path, **loading_options({"dtype": "auto"}))
    assert loaded.dtype == torch.bfloat16
    assert loaded(torch.tensor([[2, 7, 9]])).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("cls", [GMLPForMaskedLM, GMLPForCausalLM])
def test_resize_token_embeddings_untied_resizes_head_and_bias(tmp_path, cls: type) -> None:
    model = _model(cls, tie_word_embeddings=False).eval()
    ids = torch.randint(5, len(VOCAB), (1, 6))
    with torch.no_grad():
        before = model(ids).logits
    model.resize_token_embeddings(len(VOCAB) + 5)
    head = model.get_output_embeddings()
    assert head.weight.shape == (len(VOCAB) + 5, 32) and head.bias.shape == (len(VOCAB) + 5,)
    assert head.weight is not model.get_input_embeddings().weight
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[..., : len(VOCAB)], before)
    model.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_feature_extraction_pipeline_batched_equals_single() -> None:
    tok = make_tokenizer()
    extract = pipeline("feature-extraction", model=_model(GMLPModel).eval(), tokenizer=tok, device="cpu")
    texts = ["the cat sat", "a big red dog ran fast and the cat was slow"]
    batched = extract(texts, batch_size=2)
    for text, features in zip(texts, batched, strict=True):
        alone = torch.tensor(extract(text))
        torch.testing.assert_close(torch.tensor(features)[:, : alone.shape[1]], alone, atol=1e-5, rtol=0)


TEXTS = [
    "the cat sat on the mat", "the dog ran fast", "a big red dog sat on a small mat",
    "paris is the capital of france", "london is the capital of england", "the blue river ran slow",
]


def _train(tmp_path, model, data, collator, metrics=None, steps=15):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=6, per_device_eval_batch_size=4,
        max_steps=steps, learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    model.gradient_checkpointing_enable()
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, data_collator=collator,
                      compute_metrics=metrics)  # fmt: skip
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < 0.7 * losses[0], losses
    return trainer


@pytest.mark.parametrize("kind", ["single_label", "regression", "multi_label"])
def test_trainer_trains_sequence_classification(tmp_path, kind: str) -> None:
    from transformers import DataCollatorWithPadding

    tok = make_tokenizer()
    labels = {
        "single_label": lambda i: i % 3,
        "regression": lambda i: i / 5,
        "multi_label": lambda i: [float(i % 2), float(i % 3 == 0)],
    }[kind]
    data = [dict(tok(t), labels=labels(i)) for i, t in enumerate(TEXTS)]
    num_labels = {"single_label": 3, "regression": 1, "multi_label": 2}[kind]
    torch.manual_seed(0)
    model = GMLPForSequenceClassification(tiny_config(num_labels=num_labels))

    def accuracy(p):
        return {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}

    trainer = _train(tmp_path, model, data, DataCollatorWithPadding(tok),
                     accuracy if kind == "single_label" else None, steps=40)  # fmt: skip
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics
    if kind == "single_label":
        assert metrics["eval_accuracy"] == 1.0
    assert model.config.problem_type == f"{kind}_classification" if kind != "regression" else "regression"


def test_trainer_trains_question_answering_with_its_label_names(tmp_path) -> None:
    from transformers import DataCollatorWithPadding

    tok = make_tokenizer()
    data = [dict(tok("what is", t), start_positions=4 + i % 2, end_positions=5 + i % 2)
            for i, t in enumerate(TEXTS)]  # fmt: skip
    torch.manual_seed(0)
    trainer = _train(tmp_path, GMLPForQuestionAnswering(tiny_config()), data, DataCollatorWithPadding(tok))
    prediction = trainer.predict(data)
    start, end = prediction.label_ids  # Trainer found both position arguments as labels
    assert start.tolist() == [4, 5] * 3 and end.tolist() == [5, 6] * 3
    assert (prediction.predictions[0].argmax(-1) == start).all()


def test_trainer_trains_causal_lm(tmp_path) -> None:
    from transformers import DataCollatorForLanguageModeling

    tok = make_tokenizer()
    torch.manual_seed(0)
    model = GMLPForCausalLM(tiny_config(causal=True))
    _train(tmp_path, model, [tok(t) for t in TEXTS], DataCollatorForLanguageModeling(tok, mlm=False))


# ---------------------------------------------------------------------------------------------------
# token classification
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_token_classification_is_padding_invariant_and_its_loss_ignores_pads(causal: bool) -> None:
    """Left, right or inner padding changes no real token's logits; the loss is BERT's mean cross-entropy
    over labelled real tokens, and labels put at padded positions are not targets."""
    model = _model(GMLPForTokenClassification, num_labels=4, causal=causal)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, len(VOCAB), (1, 6), generator=gen)
    labels = torch.randint(0, 4, (1, 6), generator=gen)
    labels[0, 2] = -100
    with torch.no_grad():
        alone = model(ids, labels=labels)
        for real in ([1] * 6 + [0] * 3, [0] * 3 + [1] * 6, [1, 1, 0, 0, 1, 1, 1, 1, 0]):
            mask = torch.tensor([real])
            padded_ids = torch.zeros(1, 9, dtype=torch.long)
            padded_ids[mask.bool()] = ids[0]
            padded_labels = torch.randint(0, 4, (1, 9), generator=gen)  # junk labels on the pads
            padded_labels[mask.bool()] = labels[0]
            out = model(padded_ids, attention_mask=mask, labels=padded_labels)
            torch.testing.assert_close(out.logits[mask.bool()], alone.logits[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.loss, alone.loss, atol=1e-6, rtol=1e-5)
    keep = labels[0] != -100
    manual = torch.nn.functional.cross_entropy(alone.logits[0][keep], labels[0][keep])
    torch.testing.assert_close(alone.loss, manual)


def test_token_classification_names_bad_labels_and_sizes() -> None:
    model = _model(GMLPForTokenClassification, num_labels=3)
    ids = torch.randint(5, len(VOCAB), (2, 5))
    with pytest.raises(ValueError, match=r"labels contains 3 outside \[0, vocab_size=3\)|labels contains 3"):
        model(ids, labels=torch.full((2, 5), 3))
    with pytest.raises(ValueError, match=r"labels must be an integer tensor of shape \(batch, seq_len\)"):
        model(ids, labels=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"needs config.num_labels >= 2, got 1"):
        GMLPForTokenClassification(tiny_config(num_labels=1))


def test_token_classification_auto_class_pipeline_and_trainer(tmp_path) -> None:
    """AutoModelForTokenClassification loads the saved model with identical logits; the token-classification
    pipeline tags each word; Trainer with DataCollatorForTokenClassification learns a word -> tag task."""
    from transformers import AutoModelForTokenClassification, DataCollatorForTokenClassification

    tok = make_tokenizer()
    tags = {w: i % 3 for i, w in enumerate(WORDS)}
    data = []
    for text in TEXTS:
        enc = tok(text)
        words = text.split()
        enc["labels"] = [-100] + [tags[w] for w in words] + [-100]  # [CLS] and [SEP] are not tagged
        data.append(dict(enc))
    torch.manual_seed(0)
    config = tiny_config(num_labels=3, id2label={0: "A", 1: "B", 2: "C"}, label2id={"A": 0, "B": 1, "C": 2})
    model = GMLPForTokenClassification(config)
    trainer = _train(tmp_path / "run", model, data, DataCollatorForTokenClassification(tok))
    model = trainer.model.eval()
    model.save_pretrained(tmp_path / "saved", safe_serialization=True)
    loaded = AutoModelForTokenClassification.from_pretrained(tmp_path / "saved").eval()
    assert type(loaded) is GMLPForTokenClassification
    ids = torch.tensor([tok("the cat sat on the mat")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    tagger = pipeline("token-classification", model=loaded, tokenizer=tok, device="cpu")
    found = tagger("the big dog ran")
    assert [t["word"] for t in found] == ["the", "big", "dog", "ran"]
    assert all(t["entity"] in {"A", "B", "C"} for t in found)
