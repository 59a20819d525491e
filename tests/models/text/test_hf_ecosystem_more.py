"""What an experienced transformers user does next with the gMLP text models (beyond test_hf_ecosystem):
reduced-precision inference, sharded checkpoints, the ``generate`` options, gradient checkpointing against
plain training, ``Trainer`` with gradient accumulation / evaluation / best-model reloading / ``predict``,
peft LoRA, parameter counting, embedding accessors and the config's JSON round trip.

Everything is local (tiny models, an in-memory tokenizer): nothing comes from the Hub.
"""

from __future__ import annotations

import copy
import inspect
import json

import pytest
import torch
import transformers
from packaging.version import Version
from text_hf_helpers import VOCAB, loading_options, make_tokenizer, randomize, tiny_config
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    DataCollatorForLanguageModeling,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from gmlp.models.text import (
    GMLPConfig,
    GMLPForCausalLM,
    GMLPForMaskedLM,
    GMLPForQuestionAnswering,
    GMLPForSequenceClassification,
    GMLPForTokenClassification,
)

TEXTS = [
    "the cat sat on the mat", "the dog ran", "a big red dog sat on a small mat and the cat ran fast",
    "paris", "london is the capital of england", "the blue river ran slow",
]  # fmt: skip


def _model(cls: type, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    if cls is GMLPForCausalLM:
        overrides.setdefault("causal", True)
    return randomize(cls(tiny_config(**overrides)), seed)


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows: unpadded, left-padded (4 pads), right-padded (3 pads)."""
    ids = torch.randint(5, len(VOCAB), (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, 7:] = 0
    return ids, mask


# ---------------------------------------------------------------------------------------------------
# reduced precision and sharded checkpoints
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [GMLPForCausalLM, GMLPForQuestionAnswering])
def test_reduced_precision_inference_is_close_and_padding_invariant(tmp_path, cls, dtype) -> None:
    """from_pretrained(dtype=...) on the CPU: outputs of that dtype close to float32, and a padded row still
    gives exactly the outputs of the row alone (the padding is deleted, not approximately ignored)."""
    model = _model(cls)
    ids, mask = _padded_batch()
    with torch.no_grad():
        reference = model(ids, attention_mask=mask)[0]
    model.save_pretrained(tmp_path)
    low = cls.from_pretrained(tmp_path, **loading_options({"dtype": dtype})).eval()
    assert low.dtype == dtype
    with torch.no_grad():
        out = low(ids, attention_mask=mask)[0]
        alone = low(ids[1:2, 4:])[0]
    assert out.dtype == dtype
    real = mask.bool()
    tol = 0.02 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(out.float()[real], reference[real], atol=tol, rtol=tol)
    assert torch.equal(out[1:2, 4:], alone)


def test_half_model_trains_and_generates_like_float32() -> None:
    model = _model(GMLPForCausalLM)
    prompt = torch.tensor([[2, 7, 9, 11]])
    expected = model.generate(prompt, max_new_tokens=5, do_sample=False)
    half = copy.deepcopy(model).to(torch.bfloat16).train()
    ids, mask = _padded_batch()
    half(ids, attention_mask=mask, labels=ids).loss.backward()
    assert half.gmlp.blocks[0].sgu.proj.weight.grad.dtype == torch.bfloat16
    assert torch.equal(half.eval().generate(prompt, max_new_tokens=5, do_sample=False), expected)


@pytest.mark.parametrize(("cls", "auto", "tied"), [
    (GMLPForMaskedLM, AutoModelForMaskedLM, True), (GMLPForCausalLM, AutoModelForCausalLM, False),
])  # fmt: skip
def test_sharded_save_loads_identically(tmp_path, cls, auto, tied: bool) -> None:
    model = _model(cls, hidden_size=64, intermediate_size=128, num_hidden_layers=3, tie_word_embeddings=tied)
    ids = torch.randint(5, len(VOCAB), (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / shard).exists() for shard in shards)
    assert ("decoder.weight" in index["weight_map"] or "lm_head.weight" in index["weight_map"]) != tied
    loaded = auto.from_pretrained(tmp_path).eval()
    assert type(loaded) is cls
    assert (loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight) == tied
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


# ---------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------
def _lm() -> GMLPForCausalLM:
    model = _model(GMLPForCausalLM, eos_token_id=None)
    with torch.no_grad():  # sharper next-token distributions than the near-uniform init
        model.lm_head.weight.mul_(30)
    return model


def test_generate_use_cache_changes_nothing_and_returns_no_cache() -> None:
    model, prompt = _lm(), torch.tensor([[2, 7, 9, 11]])
    plain = model.generate(prompt, max_new_tokens=5, do_sample=False)
    for use_cache in (True, False):
        out = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=use_cache,
                             return_dict_in_generate=True)  # fmt: skip
        assert torch.equal(out.sequences, plain)
        assert out.past_key_values is None


def test_generate_scores_are_the_logits_of_each_prefix() -> None:
    model = _lm()
    prompts, mask = torch.tensor([[2, 7, 9], [0, 2, 8]]), torch.tensor([[1, 1, 1], [0, 1, 1]])
    out = model.generate(prompts, attention_mask=mask, max_new_tokens=4, do_sample=False,
                         return_dict_in_generate=True, output_scores=True, output_logits=True)  # fmt: skip
    assert len(out.scores) == len(out.logits) == 4
    for step in range(4):
        step_mask = torch.cat([mask, torch.ones(2, step, dtype=mask.dtype)], dim=1)
        with torch.no_grad():
            expected = model(out.sequences[:, : 3 + step], attention_mask=step_mask).logits[:, -1]
        torch.testing.assert_close(out.scores[step], expected)
        torch.testing.assert_close(out.logits[step], expected)
        assert torch.equal(out.sequences[:, 3 + step], expected.argmax(-1))


def test_generate_sampling_with_a_seed_is_a_manual_sampling_loop() -> None:
    model, prompt = _lm(), torch.tensor([[2, 7, 9, 11]])
    torch.manual_seed(3)
    out = model.generate(prompt, max_new_tokens=6, do_sample=True, top_k=0, top_p=1.0)
    torch.manual_seed(3)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            probs = torch.softmax(model(ids).logits[:, -1], dim=-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1)], dim=1)
    assert torch.equal(out, ids)


def test_generate_min_new_tokens_holds_eos_back() -> None:
    model, prompt = _lm(), torch.tensor([[2, 7, 9, 11]])
    free = model.generate(prompt, max_new_tokens=6, do_sample=False)
    eos = int(free[0, 4])  # the first generated token becomes the stop token
    stopped = model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=eos)
    assert stopped.tolist() == free[:, :5].tolist()
    held = model.generate(prompt, max_new_tokens=6, min_new_tokens=3, do_sample=False, eos_token_id=eos)
    assert held.shape[1] >= 4 + 3 and eos not in held[0, 4:7].tolist()


@pytest.mark.parametrize("options", [
    {"num_beams": 2}, {"num_beams": 2, "num_return_sequences": 2}, {"num_beams": 3, "length_penalty": 0.0},
])  # fmt: skip
def test_generate_beam_search_left_padded_batch_equals_single_prompts(options: dict) -> None:
    model = _lm()
    prompts = [[2, 7, 9, 11, 13], [2, 8]]
    batch = torch.tensor([prompts[0], [0, 0, 0, *prompts[1]]])
    mask = torch.tensor([[1] * 5, [0, 0, 0, 1, 1]])
    out = model.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False, **options)
    k = options.get("num_return_sequences", 1)
    for i, prompt in enumerate(prompts):
        single = model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False, **options)
        assert torch.equal(out[i * k : (i + 1) * k, -4:], single[:, -4:])


@pytest.mark.parametrize("eos_token_id", [None, 3])
@pytest.mark.parametrize("assistant", ["prompt_lookup", "assistant_model"])
def test_assisted_decoding_needs_a_cache_and_says_so(assistant: str, eos_token_id) -> None:
    """No key/value cache: assisted and prompt-lookup decoding are refused with the same error on every
    transformers version (4.x crashed inside them: AttributeError on past_key_values, or a TypeError from
    prompt lookup without an eos token)."""
    model, prompt = _lm(), torch.tensor([[2, 7, 9, 7, 9]])
    model.config.eos_token_id = model.generation_config.eos_token_id = eos_token_id
    options = {"prompt_lookup_num_tokens": 2} if assistant == "prompt_lookup" else {"assistant_model": _lm()}
    with pytest.raises(RuntimeError, match="Assisted decoding requires a cache.*no key/value cache"):
        model.generate(prompt, max_new_tokens=3, do_sample=False, **options)


# ---------------------------------------------------------------------------------------------------
# gradient checkpointing
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reentrant", [None, True, False])
@pytest.mark.parametrize("freeze_embeddings", [False, True])
def test_gradient_checkpointing_gives_every_gradient_of_plain_training(reentrant, freeze_embeddings) -> None:
    """With dropout and stochastic depth (the recomputation replays the RNG), a left/right-padded batch,
    both checkpoint flavours and frozen embeddings (reentrant checkpointing then needs the input gradients
    that transformers switches on): every parameter gets the gradient of plain training."""
    ids, mask = _padded_batch()
    grads = []
    for checkpointing in (False, True):
        model = _model(GMLPForCausalLM, hidden_dropout_prob=0.2, drop_path_rate=0.2).train()
        if freeze_embeddings:
            model.gmlp.embed.weight.requires_grad_(False)
        if checkpointing:
            kwargs = None if reentrant is None else {"use_reentrant": reentrant}
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            assert model.gmlp.gradient_checkpointing
        torch.manual_seed(1)
        model(ids, attention_mask=mask, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert grads[1][name] is not None, name
        torch.testing.assert_close(grads[1][name], grad, msg=name)


# ---------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------
# Trainer and gradient accumulation by transformers version: 4.45 averages the micro-batches' mean losses
# (no num_items_in_batch); 4.46-4.47 count the targets but hand them only to forwards with **kwargs (4.46:
# named loss_kwargs) and no longer divide the other losses by the accumulation steps (a transformers bug:
# steps that many times too large, for every model); 4.48 on honour accepts_loss_kwargs.
_transformers_version = Version(transformers.__version__)


def _head_data(cls: type) -> tuple[list[dict], object, dict]:
    tok = make_tokenizer()
    if cls is GMLPForCausalLM:
        return [tok(t) for t in TEXTS], DataCollatorForLanguageModeling(tok, mlm=False), {}
    if cls is GMLPForMaskedLM:  # every other token labelled: the rows have different numbers of targets
        data = [dict(enc, labels=[i if j % 2 else -100 for j, i in enumerate(enc["input_ids"])])
                for enc in map(tok, TEXTS)]  # fmt: skip
        return data, DataCollatorForTokenClassification(tok), {}
    if cls is GMLPForTokenClassification:
        data = [dict(enc, labels=[i % 2 for i in enc["input_ids"]]) for enc in map(tok, TEXTS)]
        return data, DataCollatorForTokenClassification(tok), {"num_labels": 2}
    data = [dict(tok(t), labels=i % 2) for i, t in enumerate(TEXTS)]
    return data, DataCollatorWithPadding(tok), {"num_labels": 2}


def _one_sgd_step(tmp_path, cls: type, batch_size: int, accumulation: int) -> torch.nn.Module:
    data, collator, overrides = _head_data(cls)
    model = _model(cls, **overrides).train()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1.0, optim="sgd",
        lr_scheduler_type="constant", max_grad_norm=0, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        save_strategy="no", dataloader_num_workers=0,
    )
    Trainer(model=model, args=args, train_dataset=data, data_collator=collator).train()
    return model


@pytest.mark.parametrize("cls", [
    GMLPForCausalLM, GMLPForMaskedLM, GMLPForTokenClassification, GMLPForSequenceClassification,
])  # fmt: skip
def test_trainer_gradient_accumulation_equals_the_full_batch(tmp_path, cls: type) -> None:
    """Batches of 3 accumulated twice make the same optimizer step as batches of 6, although the rows have
    different numbers of target tokens: the per-token heads take Trainer's num_items_in_batch (they used
    to average each micro-batch, which weights the tokens of short micro-batches more)."""
    if Version("4.46") <= _transformers_version < Version("4.48"):
        pytest.skip("transformers 4.46-4.47's Trainer mis-scales accumulated losses (fixed in 4.48)")
    if cls.accepts_loss_kwargs and _transformers_version < Version("4.46"):
        pytest.skip("Trainer passes num_items_in_batch from transformers 4.46 on (4.45: micro-batch means)")
    full = _one_sgd_step(tmp_path / "full", cls, 6, 1)
    accumulated = _one_sgd_step(tmp_path / "accumulated", cls, 3, 2)
    start = _model(cls, **_head_data(cls)[2])
    moved = max((p - q).abs().max() for p, q in zip(full.parameters(), start.parameters(), strict=True))
    assert moved > 1e-3  # the step did something
    for (name, p), q in zip(full.named_parameters(), accumulated.parameters(), strict=True):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("cls", [GMLPForCausalLM, GMLPForMaskedLM, GMLPForTokenClassification])
def test_num_items_in_batch_divides_the_summed_loss(cls: type) -> None:
    ids, mask = _padded_batch()
    labels = ids % 2 if cls is GMLPForTokenClassification else ids
    model = _model(cls, **({"num_labels": 2} if cls is GMLPForTokenClassification else {}))
    with torch.no_grad():
        mean = model(ids, attention_mask=mask, labels=labels).loss
        summed = model(ids, attention_mask=mask, labels=labels, num_items_in_batch=1).loss
        counted = model(ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(7)).loss
    targets = int(torch.round(summed / mean))
    assert targets > 7
    torch.testing.assert_close(counted, summed / 7)
    with pytest.raises(ValueError, match=r"num_items_in_batch must be None, a positive number .* got 0"):
        model(ids, labels=labels, num_items_in_batch=0)


def test_trainer_evaluates_keeps_the_best_checkpoint_and_predicts(tmp_path) -> None:
    data, collator, overrides = _head_data(GMLPForSequenceClassification)
    torch.manual_seed(0)
    model = GMLPForSequenceClassification(tiny_config(**overrides))
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=3, per_device_eval_batch_size=4,
        gradient_accumulation_steps=2, max_steps=12, learning_rate=1e-2, eval_strategy="steps", eval_steps=3,
        save_strategy="steps", save_steps=3, load_best_model_at_end=True, metric_for_best_model="loss",
        logging_steps=3, report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )

    def accuracy(p) -> dict[str, float]:
        return {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}

    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, data_collator=collator,
                      compute_metrics=accuracy)  # fmt: skip
    trainer.train()
    evals = {log["step"]: log["eval_loss"] for log in trainer.state.log_history if "eval_loss" in log}
    assert sorted(evals) == [3, 6, 9, 12]
    best = min(evals, key=evals.get)
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best}")
    prediction = trainer.predict(data)  # the reloaded best model
    assert prediction.metrics["test_loss"] == pytest.approx(evals[best], rel=1e-5)
    assert prediction.predictions.shape == (6, 2) and prediction.label_ids.tolist() == [0, 1] * 3
    tok = make_tokenizer()
    model.eval()
    with torch.no_grad():  # the padded batches of predict give each text's own logits
        alone = torch.cat([model(**tok(t, return_tensors="pt")).logits for t in TEXTS])
    torch.testing.assert_close(torch.from_numpy(prediction.predictions), alone, atol=1e-5, rtol=1e-5)
    unlabelled = trainer.predict([tok(t) for t in TEXTS])
    assert unlabelled.label_ids is None and unlabelled.predictions.shape == (6, 2)


# ---------------------------------------------------------------------------------------------------
# peft
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("targets", [["fc1", "fc2"], ["fc1", "fc2", "qkv", "out"], "all-linear"])
def test_peft_lora_trains_and_merges_to_the_same_outputs(targets) -> None:
    """The names print(model) shows for the Linear layers of a block (fc1, fc2; tiny_attn.qkv/out in aMLP)
    take LoRA; the spatial projection (sgu.proj, a TokenProjection) does not (train it fully with
    modules_to_save=["proj"])."""
    peft = pytest.importorskip("peft")
    ids, mask = _padded_batch()
    base = _model(GMLPForSequenceClassification, num_labels=2)
    with torch.no_grad():
        before = base(ids, attention_mask=mask).logits
    config = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, target_modules=targets, r=4,
                             init_lora_weights=False)  # fmt: skip
    model = peft.get_peft_model(copy.deepcopy(base), config).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 0])).loss.backward()
    assert all(p.grad is not None for p in trainable)
    optimizer.step()
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before)
    assert (adapted - before).abs().max() > 1e-3
    merged = model.merge_and_unload()
    assert type(merged) is GMLPForSequenceClassification
    with torch.no_grad():
        torch.testing.assert_close(merged(ids, attention_mask=mask).logits, adapted, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="TokenProjection"):
        peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["proj"]))


# ---------------------------------------------------------------------------------------------------
# parameters, embeddings, config
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
def test_num_parameters_counts_shared_weights_once(tied: bool) -> None:
    model = _model(GMLPForMaskedLM, tie_word_embeddings=tied)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert model.num_parameters() == sum(unique.values())
    embeddings = model.gmlp.embed.weight.numel() + model.gmlp.token_type_embed.weight.numel()
    assert model.num_parameters(exclude_embeddings=True) == model.num_parameters() - embeddings
    model.gmlp.embed.weight.requires_grad_(False)  # (the tied decoder with it: the same tensor)
    frozen = model.gmlp.embed.weight.numel()
    assert model.num_parameters(only_trainable=True) == model.num_parameters() - frozen


def test_set_input_embeddings_then_tie_weights_and_reload(tmp_path) -> None:
    model = _model(GMLPForCausalLM)
    new = torch.nn.Embedding(len(VOCAB), 32)
    model.set_input_embeddings(new)
    assert model.get_input_embeddings() is new
    model.tie_weights()
    assert model.lm_head.weight is new.weight
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded.tie_weights()  # idempotent after loading
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    assert torch.equal(loaded.get_input_embeddings().weight, new.weight)


def test_config_json_and_from_dict_round_trip_every_field(tmp_path) -> None:
    config = tiny_config(
        toeplitz=False, tiny_attn_size=None, causal=True, sgu_variant="multiplicative", sgu_heads=2,
        hidden_dropout_prob=0.1, classifier_dropout=0.2, drop_path_rate=0.1, drop_path_schedule="linear",
        layer_norm_eps=1e-5, sgu_norm_eps=1e-6, initializer_range=0.03, spatial_init_std=1e-3,
        type_vocab_size=0, tie_word_embeddings=False, sparse_prediction=True, max_predictions_per_seq=5,
        pad_token_id=1, cls_token_id=None, sep_token_id=5, mask_token_id=6, bos_token_id=7,
        eos_token_id=[8, 9], num_labels=3, problem_type="multi_label_classification",
    )
    fields = set(inspect.signature(GMLPConfig.__init__).parameters) - {"self", "kwargs"}
    as_dict = config.to_dict()
    assert fields <= set(as_dict)
    for again in (GMLPConfig.from_dict(as_dict), GMLPConfig.from_dict(json.loads(config.to_json_string()))):
        assert again.to_dict() == as_dict
    fft = tiny_config(spatial_fft_threshold=16)
    assert GMLPConfig.from_dict(json.loads(fft.to_json_string())).spatial_fft_threshold == 16
    config.save_pretrained(tmp_path)
    assert GMLPConfig.from_pretrained(tmp_path).to_dict() == as_dict
