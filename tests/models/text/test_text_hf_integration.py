"""The gMLP text models inside the Hugging Face stack: Auto classes, save/load, pipelines, generate, Trainer.

Everything is built locally (tiny models, an in-memory WordLevel tokenizer): nothing comes from the Hub.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from text_hf_helpers import SEQ, VOCAB, make_tokenizer, randomize, tiny_config
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    pipeline,
)

from gmlp.models.text import (
    GMLPConfig,
    GMLPForCausalLM,
    GMLPForMaskedLM,
    GMLPForQuestionAnswering,
    GMLPForSequenceClassification,
    GMLPModel,
)

CASES = [
    (AutoModel, GMLPModel, {}),
    (AutoModelForMaskedLM, GMLPForMaskedLM, {}),
    (AutoModelForMaskedLM, GMLPForMaskedLM, {"tie_word_embeddings": False, "toeplitz": False}),
    (AutoModelForSequenceClassification, GMLPForSequenceClassification, {"num_labels": 3}),
    (AutoModelForQuestionAnswering, GMLPForQuestionAnswering, {"type_vocab_size": 0}),
    (AutoModelForCausalLM, GMLPForCausalLM, {"causal": True}),
    (AutoModelForCausalLM, GMLPForCausalLM, {"causal": True, "tie_word_embeddings": False, "sgu_heads": 2}),
]


def _first_output(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else (
        out.logits if hasattr(out, "logits") else torch.stack([out.start_logits, out.end_logits])
    )


@pytest.mark.parametrize(("auto", "cls", "overrides"), CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_save_and_auto_load_round_trip(tmp_path, auto, cls, overrides) -> None:
    torch.manual_seed(0)
    model = randomize(cls(tiny_config(**overrides)))
    ids = torch.randint(0, len(VOCAB), (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    with torch.no_grad():
        expected = _first_output(model(input_ids=ids, attention_mask=mask))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not (tmp_path / "pytorch_model.bin").exists()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), GMLPConfig)
    loaded = auto.from_pretrained(tmp_path).eval()
    assert type(loaded) is cls
    with torch.no_grad():
        got = _first_output(loaded(input_ids=ids, attention_mask=mask))
    assert torch.equal(got, expected)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    head = loaded.get_output_embeddings()
    if head is not None:
        tied = loaded.config.tie_word_embeddings
        assert (head.weight is loaded.gmlp.embed.weight) == tied
        if tied:  # a tied matrix is stored once
            stored = load_file(tmp_path / "model.safetensors")
            assert "decoder.weight" not in stored and "lm_head.weight" not in stored


def test_loading_into_another_head_keeps_the_spatial_weights(tmp_path) -> None:
    """from_pretrained initialises only missing weights: loaded W and b survive, missing ones get b = 1."""
    mlm = randomize(GMLPForMaskedLM(tiny_config()))
    mlm.save_pretrained(tmp_path)
    clf = GMLPForSequenceClassification.from_pretrained(tmp_path, num_labels=2)
    for a, b in zip(mlm.gmlp.parameters(), clf.gmlp.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(clf.classifier.bias, torch.zeros(2))

    # A checkpoint without one block's b: only b is re-initialised (to 1), the loaded W of the same module
    # is kept (transformers 5 calls _init_weights on partially loaded modules).
    state = load_file(tmp_path / "model.safetensors")
    del state["gmlp.blocks.1.sgu.proj.bias"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    partial = GMLPForMaskedLM.from_pretrained(tmp_path)
    proj = partial.gmlp.blocks[1].sgu.proj
    assert torch.equal(proj.bias, torch.ones_like(proj.bias))  # the paper's init
    assert torch.equal(proj.weight, mlm.gmlp.blocks[1].sgu.proj.weight)
    # without any W and b for a block, both get the paper's near-identity init
    del state["gmlp.blocks.1.sgu.proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    proj = GMLPForMaskedLM.from_pretrained(tmp_path).gmlp.blocks[1].sgu.proj
    assert torch.equal(proj.bias, torch.ones_like(proj.bias))
    assert 0 < proj.weight.abs().max() < 1e-4


def test_resized_model_saves_and_loads(tmp_path) -> None:
    model = randomize(GMLPForMaskedLM(tiny_config()))
    ids = torch.randint(0, len(VOCAB), (1, 10))
    with torch.no_grad():
        expected = model(ids).logits
    model.resize_sequence_length(10)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert loaded.config.max_position_embeddings == 10
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------
# pipelines
# ---------------------------------------------------------------------------------------------------
def test_fill_mask_pipeline() -> None:
    tok = make_tokenizer()
    model = randomize(GMLPForMaskedLM(tiny_config()))
    fill = pipeline("fill-mask", model=model, tokenizer=tok, device="cpu")
    results = fill("the cat [MASK] on the mat", top_k=3)
    assert len(results) == 3
    assert all(r["token_str"] in VOCAB for r in results)
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    batch = fill(["the [MASK] sat", "a big red [MASK] ran fast"], top_k=2)
    assert len(batch) == 2 and len(batch[1]) == 2


def test_text_classification_pipeline() -> None:
    tok = make_tokenizer()
    config = tiny_config(num_labels=2, id2label={0: "NEG", 1: "POS"}, label2id={"NEG": 0, "POS": 1})
    model = randomize(GMLPForSequenceClassification(config))
    clf = pipeline("text-classification", model=model, tokenizer=tok, device="cpu")
    single = clf("the cat sat on the mat")
    assert single[0]["label"] in {"NEG", "POS"}
    batch = clf(["the cat sat", "a big red dog ran fast and the cat was slow"], batch_size=2)
    alone = clf("the cat sat")
    assert batch[0]["label"] == alone[0]["label"]
    assert abs(batch[0]["score"] - alone[0]["score"]) < 1e-5  # padding in the batch changes nothing
    pair = clf({"text": "who sat", "text_pair": "the cat sat"})
    assert pair[0]["label"] in {"NEG", "POS"} if isinstance(pair, list) else pair["label"] in {"NEG", "POS"}


def test_question_answering_pipeline() -> None:
    from transformers.pipelines import SUPPORTED_TASKS

    tok = make_tokenizer()
    model = randomize(GMLPForQuestionAnswering(tiny_config()))
    context = "paris is the capital of france and london is the capital of england"
    question = "what is the capital of france"
    if "question-answering" in SUPPORTED_TASKS:  # transformers < 5.2x
        qa = pipeline("question-answering", model=model, tokenizer=tok, device="cpu")
        answer = qa(question=question, context=context)
        assert set(answer) >= {"answer", "start", "end", "score"}
        assert context[answer["start"] : answer["end"]] == answer["answer"]
    # What the (since removed) pipeline does: encode the pair, pick the best span inside the context.
    enc = tok(question, context, return_offsets_mapping=True, return_tensors="pt")
    offsets = enc.pop("offset_mapping")[0]
    with torch.no_grad():
        out = model(**enc)
    in_context = torch.tensor([s == 1 for s in enc.sequence_ids(0)])
    start = out.start_logits[0].masked_fill(~in_context, -1e9)
    end = out.end_logits[0].masked_fill(~in_context, -1e9)
    scores = (start[:, None] + end[None, :]).triu()  # end >= start
    i, j = divmod(int(scores.argmax()), scores.shape[1])
    assert in_context[i] and in_context[j] and i <= j
    span = context[int(offsets[i, 0]) : int(offsets[j, 1])]
    assert span and span in context


def test_text_generation_pipeline() -> None:
    tok = make_tokenizer()
    model = _causal_model()
    gen = pipeline("text-generation", model=model, tokenizer=tok, device="cpu")
    out = gen("the cat", max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"].startswith("the cat")


# ---------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------
def _causal_model() -> GMLPForCausalLM:
    torch.manual_seed(0)
    return randomize(GMLPForCausalLM(tiny_config(causal=True, pad_token_id=0, eos_token_id=None)))


def test_generate_greedy_matches_a_manual_loop() -> None:
    model = _causal_model()
    prompt = torch.tensor([[2, 7, 9, 11]])
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 10)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_generate_left_padded_batch_equals_single_prompts() -> None:
    model = _causal_model()
    prompts = [[2, 7, 9, 11, 13], [2, 8]]
    batch = torch.tensor([prompts[0], [0, 0, 0, *prompts[1]]])
    mask = torch.tensor([[1] * 5, [0, 0, 0, 1, 1]])
    out = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False)
    for row, prompt in zip(out, prompts, strict=True):
        single = model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False)
        assert torch.equal(row[-5:], single[0, -5:])


def test_generate_up_to_max_position_embeddings() -> None:
    model = _causal_model()
    out = model.generate(torch.tensor([[2, 7]]), max_length=SEQ, do_sample=True, top_k=5)
    assert out.shape == (1, SEQ)
    with pytest.raises(ValueError, match=rf"more than max_position_embeddings={SEQ}"):
        model.generate(torch.tensor([[2, 7]]), max_length=SEQ + 2, do_sample=False)


def test_generate_past_max_position_embeddings_names_the_length_arguments() -> None:
    """Asking for more tokens than fit gets an error about generate's lengths, not the model's advice to
    truncate the tokenizer's input."""
    model = _causal_model()
    with pytest.raises(ValueError, match=rf"generate\(\) reached {SEQ + 1} tokens .*max_position_embeddings="
                       rf"{SEQ}.*max_new_tokens <= {SEQ} - prompt length"):  # fmt: skip
        model.generate(torch.tensor([[2, 7, 9]]), max_new_tokens=SEQ, do_sample=False)


def test_generate_passes_token_type_ids_on_and_refuses_a_wrong_shape() -> None:
    """token_type_ids given to generate() reach every step (transformers extends them with the last type);
    ones that do not match the prompt get forward()'s error instead of being dropped silently."""
    model = _causal_model()
    with torch.no_grad():
        model.gmlp.token_type_embed.weight.normal_(0, 1, generator=torch.Generator().manual_seed(2))
    prompt, types = torch.tensor([[2, 7, 9]]), torch.tensor([[0, 1, 1]])
    out = model.generate(prompt, token_type_ids=types, max_new_tokens=4, do_sample=False)
    ids = prompt
    with torch.no_grad():
        for _ in range(4):
            step_types = torch.cat([types, types[:, -1:].expand(1, ids.shape[1] - 3)], dim=1)
            ids = torch.cat([ids, model(ids, token_type_ids=step_types).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ids)
    with pytest.raises(ValueError, match=r"token_type_ids must be .* = \(1, 3\), got \(1, 2\)"):
        model.generate(prompt, token_type_ids=types[:, :2], max_new_tokens=2, do_sample=False)


def test_generate_beam_search_and_sampling_run() -> None:
    model = _causal_model()
    prompts = torch.tensor([[2, 7, 9], [0, 2, 8]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    beams = model.generate(prompts, attention_mask=mask, max_new_tokens=4, num_beams=3, do_sample=False)
    assert beams.shape == (2, 7)
    sampled = model.generate(prompts, attention_mask=mask, max_new_tokens=4, do_sample=True,
                             num_return_sequences=2)
    assert sampled.shape == (4, 7)
    with pytest.raises(ValueError, match="inputs_embeds"):  # no cache: generation needs token ids
        model.generate(inputs_embeds=torch.randn(1, 3, 32), max_new_tokens=2)


def test_generate_returns_hidden_states_and_attentions() -> None:
    """generate(output_hidden_states=True) reaches the model (transformers 5 passes it through
    prepare_inputs_for_generation): one tuple per step, equal to a forward on that step's prefix. So does
    output_attentions (aMLP's tiny attention maps); a gMLP without tiny attention refuses it."""
    model = _causal_model()
    prompts, mask = torch.tensor([[2, 7, 9], [0, 2, 8]]), torch.tensor([[1, 1, 1], [0, 1, 1]])
    out = model.generate(prompts, attention_mask=mask, max_new_tokens=3, do_sample=False,
                         return_dict_in_generate=True, output_hidden_states=True)
    assert len(out.hidden_states) == 3
    for step, states in enumerate(out.hidden_states):
        n = 3 + step
        assert len(states) == model.config.num_hidden_layers + 1
        step_mask = torch.cat([mask, torch.ones(2, step, dtype=mask.dtype)], dim=1)
        with torch.no_grad():
            expected = model(out.sequences[:, :n], attention_mask=step_mask).logits
        real = step_mask.bool()
        got = model.lm_head(states[-1])
        torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
    out = model.generate(prompts, attention_mask=mask, max_new_tokens=2, do_sample=False,
                         return_dict_in_generate=True, output_attentions=True)
    assert len(out.attentions) == 2
    for step, maps in enumerate(out.attentions):
        n = 3 + step
        assert len(maps) == model.config.num_hidden_layers
        step_mask = torch.cat([mask, torch.ones(2, step, dtype=mask.dtype)], dim=1)
        with torch.no_grad():
            again = model(out.sequences[:, :n], attention_mask=step_mask, output_attentions=True)
        for got, want in zip(maps, again.attentions, strict=True):
            assert got.shape == (2, 1, n, n)
            torch.testing.assert_close(got, want)
    plain = randomize(GMLPForCausalLM(tiny_config(causal=True, tiny_attn_size=None)))
    with pytest.raises(ValueError, match="output_attentions=True needs the tiny attention of aMLP"):
        plain.generate(prompts, attention_mask=mask, max_new_tokens=2, do_sample=False,
                       return_dict_in_generate=True, output_attentions=True)


@pytest.mark.parametrize("cls", [GMLPForMaskedLM, GMLPForCausalLM])
def test_resize_token_embeddings_keeps_tying(cls) -> None:
    model = randomize(cls(tiny_config(causal=cls is GMLPForCausalLM)))
    model.resize_token_embeddings(len(VOCAB) + 7)
    head = model.get_output_embeddings()
    assert model.config.vocab_size == len(VOCAB) + 7
    assert head.weight is model.get_input_embeddings().weight
    assert head.bias.shape == (len(VOCAB) + 7,)
    assert model(torch.tensor([[len(VOCAB) + 6, 3]])).logits.shape == (1, 2, len(VOCAB) + 7)


# ---------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------
def test_trainer_trains_masked_lm(tmp_path) -> None:
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tok = make_tokenizer()
    texts = [
        "the cat sat on the mat", "the dog ran fast", "a big red dog sat on a small mat",
        "paris is the capital of france", "london is the capital of england", "the blue river ran slow",
    ] * 4
    dataset = [tok(t, truncation=True) for t in texts]
    torch.manual_seed(0)
    model = GMLPForMaskedLM(tiny_config(hidden_size=64, intermediate_size=128))
    collator = DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=0.3)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=40, learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, losses
