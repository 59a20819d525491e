"""The gMLP text models: padding invariance, causality, heads, losses, input errors, resizing, conversion."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gmlp.models.text import (
    GMLPConfig,
    GMLPForCausalLM,
    GMLPForMaskedLM,
    GMLPForQuestionAnswering,
    GMLPForSequenceClassification,
    GMLPModel,
    from_g_mlp_pytorch_lm,
)
from gmlp.nn import TokenProjection
from gmlp.utils.io import CheckpointError

VOCAB, DIM, FFN, LAYERS, SEQ = 50, 32, 64, 2, 16

HEADS = {
    "base": GMLPModel,
    "mlm": GMLPForMaskedLM,
    "seqcls": GMLPForSequenceClassification,
    "qa": GMLPForQuestionAnswering,
    "causal": GMLPForCausalLM,
}


def tiny_config(**overrides) -> GMLPConfig:
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=LAYERS,
        max_position_embeddings=SEQ, num_labels=3,
    )
    kwargs.update(overrides)
    return GMLPConfig(**kwargs)


def randomize_spatial(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every W and b large random values, so the token mixing really mixes (the init is ~identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TokenProjection):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.5)
                module.bias.copy_(1 + torch.randn(module.bias.shape, generator=gen) * 0.5)
    return model


def build(head: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    if head == "causal":
        overrides.setdefault("causal", True)
    return randomize_spatial(HEADS[head](tiny_config(**overrides)), seed).eval()


def outputs(model: torch.nn.Module, **inputs) -> dict[str, torch.Tensor]:
    """Per-token outputs (batch, seq, ...) and per-sequence outputs (batch, ...) of any head."""
    with torch.no_grad():
        out = model(**inputs)
    if isinstance(model, GMLPModel):
        return {"tokens": out.last_hidden_state}
    if isinstance(model, GMLPForSequenceClassification):
        return {"sequence": out.logits}
    if isinstance(model, GMLPForQuestionAnswering):
        return {"tokens": torch.stack([out.start_logits, out.end_logits], dim=-1)}
    return {"tokens": out.logits}


# ---------------------------------------------------------------------------------------------------
# padding invariance
# ---------------------------------------------------------------------------------------------------
def _pad(
    ids: torch.Tensor, left: int, right: int, pad_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    n = ids.numel()
    seq = torch.cat([pad_ids[:left], ids, pad_ids[left : left + right]])
    mask = torch.cat([torch.zeros(left, dtype=torch.long), torch.ones(n, dtype=torch.long),
                      torch.zeros(right, dtype=torch.long)])
    return seq, mask


@pytest.mark.parametrize("toeplitz", [True, False], ids=["toeplitz", "full"])
@pytest.mark.parametrize("attn", [None, 8], ids=["gmlp", "amlp"])
@pytest.mark.parametrize("head", sorted(HEADS))
def test_padding_invariance(head: str, attn: int | None, toeplitz: bool) -> None:
    """Outputs at real tokens do not depend on the pad ids, the amount of padding or its side, and equal
    the outputs of the unpadded sequence run alone."""
    model = build(head, tiny_attn_size=attn, toeplitz=toeplitz)
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 9, 12]
    seqs = [torch.randint(5, VOCAB, (n,), generator=gen) for n in lengths]
    ref = [outputs(model, input_ids=s[None]) for s in seqs]  # unpadded, one sequence at a time
    for width in (12, SEQ):  # how many pads
        for fill in ("pad", "random"):  # pad id 0, or random (real) token ids under the mask
            for side in ("right", "left", "both"):
                rows, masks = [], []
                for s in seqs:
                    pads = width - s.numel()
                    left = {"right": 0, "left": pads, "both": pads // 2}[side]
                    if fill == "pad":
                        fill_ids = torch.zeros(width, dtype=torch.long)
                    else:
                        fill_ids = torch.randint(0, VOCAB, (width,), generator=gen)
                    row, mask = _pad(s, left, pads - left, fill_ids)
                    rows.append(row)
                    masks.append(mask)
                ids, mask = torch.stack(rows), torch.stack(masks)
                got = outputs(model, input_ids=ids, attention_mask=mask)
                for i in range(len(seqs)):
                    real = mask[i].bool()
                    for key, value in got.items():
                        actual = value[i][real] if key == "tokens" else value[i]
                        torch.testing.assert_close(actual, ref[i][key][0], atol=1e-5, rtol=0)


@settings(max_examples=20, deadline=None)
@given(
    data=st.data(),
    length=st.integers(1, SEQ),
)
def test_padding_anywhere_equals_unpadded_run(data, length: int) -> None:
    """Property: any 0/1 mask (pads before, between or after the real tokens) gives the unpadded outputs."""
    model = _PROPERTY_MODEL
    total = data.draw(st.integers(length, SEQ))
    real_positions = sorted(data.draw(st.permutations(range(total)))[:length])
    pad_fill = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=total, max_size=total))
    real_ids = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=length, max_size=length))
    ids = torch.tensor(pad_fill)
    mask = torch.zeros(total, dtype=torch.long)
    ids[real_positions] = torch.tensor(real_ids)
    mask[real_positions] = 1
    with torch.no_grad():
        got = model(input_ids=ids[None], attention_mask=mask[None]).logits[0, mask.bool()]
        expected = model(input_ids=torch.tensor(real_ids)[None]).logits[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


_PROPERTY_MODEL = build("mlm", seed=3, tiny_attn_size=8)


def test_padding_matters_without_mask() -> None:
    """The invariance tests can fail: without the mask, pad tokens do change the real outputs."""
    model = build("mlm", tiny_attn_size=8)
    ids = torch.randint(5, VOCAB, (1, 6))
    padded = torch.cat([ids, torch.full((1, 4), 7)], dim=1)
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = model(input_ids=padded).logits[:, :6]
    assert (a - b).abs().max() > 1e-3


def test_left_padded_batch_classifies_from_first_real_token() -> None:
    model = build("seqcls")
    ids = torch.randint(5, VOCAB, (1, 7))
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], dim=1)
    with torch.no_grad():
        got = model(left, attention_mask=mask).logits
        torch.testing.assert_close(got, model(ids).logits, atol=1e-5, rtol=0)


def test_float_and_bool_masks_agree() -> None:
    model = build("base")
    ids = torch.randint(0, VOCAB, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, 7:] = 0
    a = outputs(model, input_ids=ids, attention_mask=mask)["tokens"]
    b = outputs(model, input_ids=ids, attention_mask=mask.bool())["tokens"]
    c = outputs(model, input_ids=ids, attention_mask=mask.float())["tokens"]
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a, c, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------
# causality
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("toeplitz", [True, False], ids=["toeplitz", "full"])
@pytest.mark.parametrize("attn", [None, 8], ids=["gmlp", "amlp"])
def test_causal_lm_gradients_ignore_the_future(attn: int | None, toeplitz: bool) -> None:
    model = build("causal", tiny_attn_size=attn, toeplitz=toeplitz)
    n = 10
    embeds = torch.randn(2, n, DIM, requires_grad=True)
    logits = model(inputs_embeds=embeds).logits
    for t in range(n):
        (grad,) = torch.autograd.grad(logits[:, t].sum(), embeds, retain_graph=True)
        per_position = grad.abs().sum(dim=(0, 2))
        assert torch.all(per_position[t + 1 :] == 0), (t, per_position)
        assert torch.all(per_position[: t + 1] > 0), (t, per_position)  # the past does matter


def test_non_causal_model_sees_the_future() -> None:
    """Sanity check of the causality test: without causal=True later tokens do get gradient."""
    model = build("mlm", tiny_attn_size=8)
    embeds = torch.randn(1, 8, DIM, requires_grad=True)
    (grad,) = torch.autograd.grad(model(inputs_embeds=embeds).logits[:, 0].sum(), embeds)
    assert grad[0, 1:].abs().sum() > 0


def test_causal_lm_logits_do_not_depend_on_later_tokens() -> None:
    model = build("causal", tiny_attn_size=8)
    ids = torch.randint(0, VOCAB, (1, 12))
    changed = ids.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_causal_lm_forces_causal_config() -> None:
    config = tiny_config(causal=False)
    model = GMLPForCausalLM(config)
    assert model.config.causal is True
    assert all(block.sgu.proj.causal for block in model.gmlp.blocks)


# ---------------------------------------------------------------------------------------------------
# heads and losses
# ---------------------------------------------------------------------------------------------------
def test_base_model_outputs_and_hidden_states() -> None:
    model = build("base")
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        tup = model(ids, return_dict=False)
    assert out.last_hidden_state.shape == (2, 9, DIM)
    assert len(out.hidden_states) == LAYERS + 1
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    assert torch.equal(tup[0], out.last_hidden_state)
    # the final LayerNorm (weight 1, bias 0 at init) normalises every token
    torch.testing.assert_close(out.last_hidden_state.mean(-1), torch.zeros(2, 9), atol=1e-5, rtol=0)


def test_token_types_change_outputs_and_default_to_zero() -> None:
    model = build("base")
    ids = torch.randint(0, VOCAB, (1, 8))
    zeros, ones = torch.zeros_like(ids), torch.ones_like(ids)
    a = outputs(model, input_ids=ids)["tokens"]
    got = outputs(model, input_ids=ids, token_type_ids=zeros)["tokens"]
    torch.testing.assert_close(got, a, atol=0, rtol=0)
    assert not torch.allclose(outputs(model, input_ids=ids, token_type_ids=ones)["tokens"], a)


def test_no_token_types_accepts_all_zero_type_ids() -> None:
    model = build("base", type_vocab_size=0)
    assert model.token_type_embed is None
    ids = torch.randint(0, VOCAB, (1, 8))
    torch.testing.assert_close(
        outputs(model, input_ids=ids, token_type_ids=torch.zeros_like(ids))["tokens"],
        outputs(model, input_ids=ids)["tokens"], atol=0, rtol=0,
    )


def test_mlm_loss_ignores_minus_100() -> None:
    model = build("mlm")
    ids = torch.randint(0, VOCAB, (2, 8))
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 5] = 7, 11
    out = model(ids, labels=labels)
    expected = F.cross_entropy(torch.stack([out.logits[0, 2], out.logits[1, 5]]), torch.tensor([7, 11]))
    torch.testing.assert_close(out.loss, expected)
    assert out.logits.shape == (2, 8, VOCAB)
    assert model.decoder.weight is model.gmlp.embed.weight


def test_untied_mlm_has_its_own_decoder() -> None:
    model = GMLPForMaskedLM(tiny_config(tie_word_embeddings=False))
    assert model.decoder.weight is not model.gmlp.embed.weight


@pytest.mark.parametrize(
    ("num_labels", "labels", "problem_type"),
    [
        (1, torch.tensor([0.5, -1.0]), "regression"),
        (3, torch.tensor([0, 2]), "single_label_classification"),
        (3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), "multi_label_classification"),
    ],
)
def test_sequence_classification_losses(num_labels: int, labels: torch.Tensor, problem_type: str) -> None:
    model = build("seqcls", num_labels=num_labels)
    ids = torch.randint(0, VOCAB, (2, 8))
    out = model(ids, labels=labels)
    assert model.config.problem_type == problem_type
    assert out.logits.shape == (2, num_labels)
    if problem_type == "regression":
        expected = F.mse_loss(out.logits.squeeze(-1), labels)
    elif problem_type == "single_label_classification":
        expected = F.cross_entropy(out.logits, labels)
    else:
        expected = F.binary_cross_entropy_with_logits(out.logits, labels)
    torch.testing.assert_close(out.loss, expected)


def test_question_answering_loss() -> None:
    model = build("qa")
    ids = torch.randint(0, VOCAB, (2, 8))
    start, end = torch.tensor([1, 3]), torch.tensor([2, 99])  # 99: outside the sequence, ignored
    out = model(ids, start_positions=start, end_positions=end)
    expected = (F.cross_entropy(out.start_logits, start) + F.cross_entropy(out.end_logits[:1], end[:1])) / 2
    torch.testing.assert_close(out.loss, expected)
    assert out.start_logits.shape == out.end_logits.shape == (2, 8)


def test_causal_lm_loss_is_shifted() -> None:
    model = build("causal")
    ids = torch.randint(0, VOCAB, (2, 8))
    out = model(ids, labels=ids)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("variant", ["multiplicative", "additive", "linear", "none"])
def test_ablation_variants_and_sgu_heads_run(variant: str) -> None:
    model = build("mlm", sgu_variant=variant, sgu_heads=2 if variant != "none" else 1)
    ids = torch.randint(0, VOCAB, (2, 8))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert out.logits.shape == (2, 8, VOCAB)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    ids = torch.randint(0, VOCAB, (2, 10))
    grads = []
    for checkpointing in (False, True):
        model = build("mlm", tiny_attn_size=8).train()
        if checkpointing:
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
            assert model.gmlp.gradient_checkpointing
        model(ids, labels=ids).loss.backward()
        grads.append(model.gmlp.blocks[0].fc1.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("every", [1, 2, 3])
def test_activation_checkpointing_every_n_layers(every: int) -> None:
    """transformers 5's activation_checkpointing_enable(every_n_layers=k) checkpoints blocks 0, k, 2k, ...
    (it used to be ignored: every block was checkpointed), with unchanged gradients."""
    model = build("mlm", num_hidden_layers=5, tiny_attn_size=8).train()
    if not hasattr(model, "activation_checkpointing_enable"):
        pytest.skip("every_n_layers needs transformers 5's activation_checkpointing_enable")
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    model.activation_checkpointing_enable(every_n_layers=every)
    checkpointed = []
    run = model.gmlp._gradient_checkpointing_func

    def spy(function, *args, **kwargs):
        checkpointed.append(next(i for i, b in enumerate(model.gmlp.blocks) if b.__call__ == function))
        return run(function, *args, **kwargs)

    model.gmlp._gradient_checkpointing_func = spy
    model(ids, labels=ids).loss.backward()
    assert checkpointed == list(range(0, 5, every))
    for got, want in zip((p.grad for p in model.parameters()), expected, strict=True):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match=r"every_n_layers must be a positive int, got 0"):
        model.activation_checkpointing_enable(every_n_layers=0)


def test_weight_init() -> None:
    torch.manual_seed(0)
    model = GMLPForMaskedLM(tiny_config(hidden_size=64, intermediate_size=256, spatial_init_std=1e-6))
    proj = model.gmlp.blocks[0].sgu.proj
    assert torch.equal(proj.bias, torch.ones_like(proj.bias))
    assert 0 < proj.weight.std() < 1e-5
    assert abs(model.gmlp.blocks[0].fc1.weight.std().item() - 0.02) < 0.002
    assert abs(model.gmlp.embed.weight.std().item() - 0.02) < 0.002
    assert torch.equal(model.gmlp.norm.weight, torch.ones(64))
    assert torch.equal(model.decoder.bias, torch.zeros(VOCAB))


def test_dropout_is_active_in_training_only() -> None:
    model = build("mlm", hidden_dropout_prob=0.5, drop_path_rate=0.2)
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits)


# ---------------------------------------------------------------------------------------------------
# input errors
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        ({"input_ids": torch.tensor([[1, 2, VOCAB + 3]])},
         rf"token id {VOCAB + 3} outside \[0, vocab_size={VOCAB}\)"),
        ({"input_ids": torch.tensor([[1, -4, 2]])}, r"token id -4 outside"),
        ({"input_ids": torch.ones(1, SEQ + 1, dtype=torch.long)},
         rf"sequence length {SEQ + 1}, longer than max_position_embeddings={SEQ}"),
        ({"input_ids": torch.ones(2, 5, dtype=torch.long),
          "attention_mask": torch.ones(2, 6, dtype=torch.long)},
         r"attention_mask must have shape \(batch, seq_len\) = \(2, 5\).*got \(2, 6\)"),
        ({"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.full((2, 5), 0.5)},
         r"attention_mask must hold 0 .* and 1"),
        ({"input_ids": torch.ones(1, 5, dtype=torch.long), "token_type_ids": torch.full((1, 5), 2)},
         r"token_type_ids contains type 2 outside \[0, type_vocab_size=2\)"),
        ({"input_ids": torch.ones(1, 5, dtype=torch.long),
          "token_type_ids": torch.zeros(1, 4, dtype=torch.long)},
         r"token_type_ids must be an integer or bool tensor of shape \(batch, seq_len\) = \(1, 5\)"),
        ({"input_ids": torch.ones(5, dtype=torch.long)},
         r"input_ids must be an integer tensor of shape \(batch, seq_len\)"),
        ({"input_ids": torch.ones(1, 5)}, r"input_ids must be an integer tensor"),
        ({"input_ids": torch.ones(1, 5, dtype=torch.long), "inputs_embeds": torch.ones(1, 5, DIM)},
         r"exactly one of input_ids or inputs_embeds"),
        ({}, r"exactly one of input_ids or inputs_embeds"),
        ({"inputs_embeds": torch.ones(1, 5, DIM + 1)},
         rf"inputs_embeds must have shape \(batch, seq_len, hidden_size={DIM}\)"),
        ({"input_ids": torch.ones(1, 0, dtype=torch.long)}, r"sequence length 0"),
    ],
)
def test_bad_inputs_raise(inputs: dict, match: str) -> None:
    model = build("mlm")
    with pytest.raises(ValueError, match=match):
        model(**inputs)


def test_token_types_refused_without_type_embedding() -> None:
    model = build("base", type_vocab_size=0)
    with pytest.raises(ValueError, match=r"type_vocab_size=0\) \(the model has no token types\)"):
        model(torch.ones(1, 5, dtype=torch.long), token_type_ids=torch.ones(1, 5, dtype=torch.long))


def test_causal_lm_rejects_unknown_kwargs_and_attentions() -> None:
    model = build("causal")
    ids = torch.ones(1, 5, dtype=torch.long)
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        model(ids, labelz=ids)
    with pytest.raises(ValueError, match="output_attentions"):
        model(ids, output_attentions=True)
    model(ids, use_cache=True, position_ids=torch.arange(5)[None])  # generate() leftovers are ignored


# ---------------------------------------------------------------------------------------------------
# resize_sequence_length
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("toeplitz", [True, False], ids=["toeplitz", "full"])
def test_resize_sequence_length_keeps_short_outputs(toeplitz: bool, heads: int) -> None:
    model = build("mlm", toeplitz=toeplitz, sgu_heads=heads, tiny_attn_size=8)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, VOCAB, (2, n), generator=gen) for n in (1, 4, 7, 8)]
    with torch.no_grad():
        before = [model(ids).logits for ids in inputs]
    m = 8
    model.resize_sequence_length(m)
    assert model.config.max_position_embeddings == m
    proj = model.gmlp.blocks[0].sgu.proj
    lead = (heads,) if heads > 1 else ()
    assert proj.weight.shape == (*lead, *((2 * m - 1,) if toeplitz else (m, m)))
    assert proj.bias.shape == (*lead, m)
    with torch.no_grad():
        for ids, ref in zip(inputs, before, strict=True):
            torch.testing.assert_close(model(ids).logits, ref, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="longer than max_position_embeddings=8"):
        model(torch.ones(1, 9, dtype=torch.long))


def test_resize_toeplitz_keeps_central_offsets() -> None:
    model = GMLPModel(tiny_config(toeplitz=True, max_position_embeddings=6))
    proj = model.blocks[0].sgu.proj
    with torch.no_grad():
        proj.weight.copy_(torch.arange(11, dtype=torch.float32))  # weight[k] = offset k - 5
    dense_before = proj.matrix(3)
    model.resize_sequence_length(3)
    assert proj.weight.tolist() == [3.0, 4.0, 5.0, 6.0, 7.0]  # offsets -2..2
    assert torch.equal(proj.matrix(3), dense_before)


def test_resize_rejects_longer_or_bad_lengths() -> None:
    model = GMLPModel(tiny_config())
    for bad in (SEQ + 1, 0, 3.0):
        with pytest.raises(ValueError, match=r"new_len must be an int in \[1, max_position_embeddings=16\]"):
            model.resize_sequence_length(bad)


# ---------------------------------------------------------------------------------------------------
# conversion from g-mlp-pytorch
# ---------------------------------------------------------------------------------------------------
def _lucid_lm(seed: int = 0, **kwargs):
    g_mlp_pytorch = pytest.importorskip("g_mlp_pytorch")
    torch.manual_seed(seed)
    params = dict(num_tokens=50, dim=32, depth=2, seq_len=16, causal=True, attn_dim=8)
    params.update(kwargs)
    source = g_mlp_pytorch.gMLP(**params).eval()
    with torch.no_grad():  # leave the near-identity init: random weights everywhere
        for name, p in source.named_parameters():
            scale = 0.3 if "sgu.weight" in name else 0.5
            p.copy_(torch.randn_like(p) * scale + (1.0 if name.endswith("sgu.bias") else 0.0))
    return source


@pytest.mark.parametrize("heads", [1, 2])
def test_from_g_mlp_pytorch_lm_reproduces_logits(heads: int) -> None:
    from gmlp.convert import from_g_mlp_pytorch

    source = _lucid_lm(heads=heads)
    ids = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        expected = source(ids)
    config = tiny_config(
        intermediate_size=32 * 4, tie_word_embeddings=False, layer_norm_eps=1e-5, toeplitz=False,
        type_vocab_size=0, causal=True, tiny_attn_size=8, sgu_heads=heads,
    )
    model = GMLPForCausalLM(config).eval()
    state = from_g_mlp_pytorch_lm(from_g_mlp_pytorch(source.state_dict()))
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        got = model(ids).logits
        assert (got - expected).abs().max() <= 1e-5
        # the raw g-mlp-pytorch state dict is accepted too, and the classmethod infers the config
        assert from_g_mlp_pytorch_lm(source.state_dict()).keys() == state.keys()
        auto = GMLPForCausalLM.from_g_mlp_pytorch(source).eval()
        assert (auto(ids).logits - expected).abs().max() <= 1e-5
        # causal g-mlp-pytorch accepts shorter inputs too: same logits
        assert (auto(ids[:, :9]).logits - source(ids[:, :9])).abs().max() <= 1e-5


def test_from_g_mlp_pytorch_refuses_what_it_cannot_express() -> None:
    with pytest.raises(ValueError, match="not causal"):
        GMLPForCausalLM.from_g_mlp_pytorch(_lucid_lm(causal=False))
    g_mlp_pytorch = pytest.importorskip("g_mlp_pytorch")
    vision = g_mlp_pytorch.gMLPVision(image_size=8, patch_size=4, num_classes=3, dim=16, depth=1)
    with pytest.raises(CheckpointError, match="not a g-mlp-pytorch language model"):
        from_g_mlp_pytorch_lm(vision.state_dict())


@settings(max_examples=8, deadline=None)
@given(lengths=st.lists(st.integers(1, SEQ), min_size=1, max_size=3), seed=st.integers(0, 999))
def test_fft_token_mixing_model_equals_dense(lengths: list[int], seed: int) -> None:
    """spatial_fft_threshold=1 (every layer mixes by FFT) gives the dense model's outputs and gradients,
    padded batches included; causal models keep the exact dense path."""
    dense = build("mlm", seed)
    fft = GMLPForMaskedLM(tiny_config(spatial_fft_threshold=1)).eval()
    fft.load_state_dict(dense.state_dict())
    assert all(m.fft_threshold == 1 for m in fft.modules() if isinstance(m, TokenProjection))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (len(lengths), SEQ), generator=gen)
    mask = torch.arange(SEQ)[None, :] < torch.tensor(lengths)[:, None]
    a = fft(ids, attention_mask=mask).logits
    b = dense(ids, attention_mask=mask).logits
    torch.testing.assert_close(a[mask], b[mask], rtol=1e-4, atol=1e-4)
    ga = torch.autograd.grad(a[mask].square().sum(), list(fft.parameters()), allow_unused=True)
    gb = torch.autograd.grad(b[mask].square().sum(), list(dense.parameters()), allow_unused=True)
    for x, y in zip(ga, gb, strict=True):
        if x is None or y is None:
            assert x is None and y is None
            continue
        scale = y.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(x / scale, y / scale, rtol=1e-4, atol=1e-4)
    causal = build("causal", seed, spatial_fft_threshold=1)
    emb = causal.get_input_embeddings()(ids[:1]).detach().requires_grad_()
    (g,) = torch.autograd.grad(causal(inputs_embeds=emb).logits[0, 3].sum(), emb)
    assert g[0, 4:].abs().max() == 0  # exactly: causal layers never take the FFT path
