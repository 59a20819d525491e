"""Property tests of the text models over random small configurations (hypothesis).

Each test draws a :class:`GMLPConfig` (1-3 layers, tiny and odd widths, every ``sgu_variant``, Toeplitz or
full W, causal or not, tiny attention of any size, SGU heads, the FFT token mixing, token types, sparse
prediction) and random inputs (batch 1-4, lengths 1..max, left/right/inner padding, masks of any dtype),
and checks the invariants the models document: padding invariance, batch independence, exact causality,
fast path == plain ops, the save/load round trip, fullgraph capture. The weights are redrawn large, so that
the token mixing really mixes (its init is a near-identity gate that would hide most dependence).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gmlp.kernels import cpu_linear
from gmlp.models.text import (
    GMLPConfig,
    GMLPForCausalLM,
    GMLPForMaskedLM,
    GMLPForQuestionAnswering,
    GMLPForSequenceClassification,
    GMLPForTokenClassification,
    GMLPModel,
)
from gmlp.nn import VARIANTS

HEADS: dict[str, type[torch.nn.Module]] = {
    "base": GMLPModel,
    "mlm": GMLPForMaskedLM,
    "seqcls": GMLPForSequenceClassification,
    "tokcls": GMLPForTokenClassification,
    "qa": GMLPForQuestionAnswering,
    "causal": GMLPForCausalLM,
}
MAX_SEQ = 8
ATOL, RTOL = 2e-5, 1e-4


def fuzz(examples: int) -> settings:
    """``examples`` hypothesis examples in the suite's profile; another profile's count otherwise
    (``HYPOTHESIS_PROFILE=gmlp-thorough`` for a long hunt)."""
    if os.environ.get("HYPOTHESIS_PROFILE", "gmlp") == "gmlp":
        return settings(max_examples=examples)
    return settings()


def _divisors(k: int) -> list[int]:
    return [h for h in range(1, k + 1) if k % h == 0]


@st.composite
def configs(
    draw: st.DrawFn, causal: bool | None = None, variants: tuple[str, ...] | None = None, min_width: int = 1
) -> dict:
    """Keyword arguments of a valid small :class:`GMLPConfig` (``causal`` None = drawn); ``min_width`` is
    the fewest channels of every LayerNorm (``hidden_size`` and the gate)."""
    pool = variants or tuple(sorted(VARIANTS))
    if causal:
        pool = tuple(v for v in pool if v != "mixer")
    variant = draw(st.sampled_from(pool))
    ffn = 2 * draw(st.integers(min_width, 6)) if variant == "sgu" else draw(st.integers(min_width, 9))
    gate = ffn // 2 if variant == "sgu" else ffn
    n = draw(st.integers(1, MAX_SEQ))
    toeplitz = draw(st.booleans())
    kw: dict[str, Any] = {
        "vocab_size": draw(st.integers(6, 24)),
        "hidden_size": draw(st.integers(min_width, 9)),
        "intermediate_size": ffn,
        "num_hidden_layers": draw(st.integers(1, 3)),
        "max_position_embeddings": n,
        "toeplitz": toeplitz,
        "sgu_variant": variant,
        "causal": False if variant == "mixer" else (draw(st.booleans()) if causal is None else causal),
        "sgu_heads": 1 if variant in ("mixer", "none") else draw(st.sampled_from(_divisors(gate))),
        "type_vocab_size": draw(st.integers(0, 3)),
        "num_labels": draw(st.integers(2, 4)),
        "tie_word_embeddings": draw(st.booleans()),
    }
    if variant not in ("none", "mixer"):
        kw["tiny_attn_size"] = draw(st.one_of(st.none(), st.integers(1, 6)))
    if variant == "mixer":
        kw["sgu_token_mlp_dim"] = draw(st.one_of(st.none(), st.integers(1, 6)))
    elif toeplitz and variant != "none":
        kw["spatial_fft_threshold"] = draw(st.one_of(st.none(), st.integers(1, n)))
    return kw


def build(head: str, kw: dict, seed: int = 0) -> torch.nn.Module:
    """The ``head`` model for config ``kw`` in eval mode, every weight redrawn at a large scale (the causal
    LM: ``causal=True``, and ``"linear"`` instead of ``"mixer"``, which cannot be causal)."""
    if head == "causal":
        kw = {**kw, "causal": True}
        if kw["sgu_variant"] == "mixer":
            kw.update(sgu_variant="linear", sgu_token_mlp_dim=None)
    torch.manual_seed(seed)
    model = HEADS[head](GMLPConfig(**kw)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if ("proj" in name or "mix" in name) else 0.4
            offset = 1.0 if (name.endswith("norm.weight") or name.endswith("proj.bias")) else 0.0
            p.copy_(offset + scale * torch.randn(p.shape, generator=gen))
    return model


def tensors(out: Any) -> dict[str, torch.Tensor]:
    """The tensors of a model output, by name (hidden states as ``hidden_states.i``)."""
    found = {}
    for key, value in out.items():
        if isinstance(value, torch.Tensor):
            found[key] = value
        elif isinstance(value, tuple):
            found.update({f"{key}.{i}": t for i, t in enumerate(value)})
    return found


def per_token(head: str) -> bool:
    return head != "seqcls"


@st.composite
def padded_batches(draw: st.DrawFn, kw: dict) -> dict:
    """A batch of 1-4 rows of random lengths 0..max with padding on a random side (left, right, inner,
    scattered or none) per row, random pad ids and token types (int64, or bool where there are at most two),
    and a mask of a random dtype (bool, integer or float 0/1). A row of
    length 0 (all padding) comes only beside a real one: its outputs are unspecified, but finite, and
    reach no other row."""
    n, vocab = kw["max_position_embeddings"], kw["vocab_size"]
    batch = draw(st.integers(1, 4))
    width = draw(st.integers(1, n))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, width), generator=gen)
    mask = torch.ones(batch, width, dtype=torch.bool)
    for b in range(batch):
        length = draw(st.integers(0 if b else 1, width))
        side = draw(st.sampled_from(["right", "left", "inner", "scattered"]))
        pads = width - length
        if side == "right":
            mask[b, length:] = False
        elif side == "left":
            mask[b, :pads] = False
        elif side == "inner" and pads:
            start = draw(st.integers(0, length))
            mask[b, start : start + pads] = False
        elif pads:
            keep = torch.randperm(width, generator=gen)[:length]
            mask[b] = False
            mask[b, keep] = True
    dtype = draw(st.sampled_from([
        torch.bool, torch.int64, torch.int32, torch.uint8, torch.float32, torch.float16, torch.bfloat16,
    ]))  # fmt: skip
    types = None
    if kw["type_vocab_size"] > 0 and draw(st.booleans()):
        types = torch.randint(0, kw["type_vocab_size"], (batch, width), generator=gen)
        if kw["type_vocab_size"] <= 2 and draw(st.booleans()):
            types = types.bool()  # (bool token types are taken, as 0/1)
    return {"input_ids": ids, "attention_mask": mask.to(dtype), "token_type_ids": types}


def _alone(inputs: dict, b: int) -> dict:
    """Row ``b`` of a padded batch with its padding deleted, as a batch of one without a mask."""
    real = inputs["attention_mask"][b] != 0
    one = {"input_ids": inputs["input_ids"][b, real][None]}
    if inputs["token_type_ids"] is not None:
        one["token_type_ids"] = inputs["token_type_ids"][b, real][None]
    return one


# ---------------------------------------------------------------------------------------------------
# padding invariance and batch independence
# ---------------------------------------------------------------------------------------------------
@fuzz(30)
@given(kw=configs(), head=st.sampled_from(sorted(HEADS)), data=st.data())
def test_each_row_gives_its_unpadded_outputs(kw: dict, head: str, data: st.DataObject) -> None:
    """Every row of a padded batch (any padding side, pad ids, mask dtype, token types, batch size, rows of
    padding only) gives at its real tokens exactly the outputs of the row alone with its padding deleted,
    hidden states and tiny-attention maps included: padding invariance and batch independence in one.
    Outputs are finite everywhere; ``return_dict=False`` gives the same tensors as a tuple."""
    model = build(head, kw)
    inputs = data.draw(padded_batches(kw))
    flags = {"output_hidden_states": True, "output_attentions": kw.get("tiny_attn_size") is not None}
    with torch.no_grad():
        full = model(**inputs, **flags)
        as_tuple = model(**inputs, **flags, return_dict=False)
    out = tensors(full)
    assert len(as_tuple) == len(full)
    for got, want in zip(as_tuple, full.values(), strict=True):
        pairs = zip(got, want, strict=True) if isinstance(want, tuple) else [(got, want)]
        for a, b in pairs:
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    for name, value in out.items():
        assert torch.isfinite(value).all(), f"{name} is not finite"
    mask = inputs["attention_mask"] != 0
    for b in range(mask.shape[0]):
        real = mask[b]
        if not real.any():
            continue
        with torch.no_grad():
            ref = tensors(model(**_alone(inputs, b), **flags))
        assert ref.keys() == out.keys()
        for name, value in ref.items():
            if name.startswith("attentions"):  # (batch, 1, query, key): real queries over real keys
                got = out[name][b, 0][real][:, real]
                value = value[:, 0]
            elif name.startswith("hidden_states") or per_token(head):
                got = out[name][b, real]
            else:
                got = out[name][b]
            torch.testing.assert_close(got, value[0], atol=ATOL, rtol=RTOL, msg=f"{head}: {name}, row {b}")


# ---------------------------------------------------------------------------------------------------
# a config that is accepted builds a model that runs
# ---------------------------------------------------------------------------------------------------
@fuzz(40)
@given(
    variant=st.sampled_from(sorted(VARIANTS)),
    ffn=st.integers(1, 9),
    heads=st.integers(1, 4),
    attn=st.one_of(st.none(), st.integers(1, 3)),
    toeplitz=st.booleans(),
    causal=st.booleans(),
    fft=st.one_of(st.none(), st.integers(1, 4)),
    token_mlp=st.one_of(st.none(), st.integers(1, 3)),
    sparse=st.booleans(),
    per_seq=st.one_of(st.none(), st.integers(1, 3)),
    head=st.sampled_from(sorted(HEADS)),
)
# found by this test: "none" took any sgu_heads, then gmlp.nn refused it at the model's build (now: refused
# by the config, as sgu_heads has no effect without token mixing)
@example(variant="none", ffn=1, heads=2, attn=None, toeplitz=False, causal=False, fft=None, token_mlp=None,
         sparse=False, per_seq=None, head="base")
# found by this test: the causal LM forced causal=True on a mixer config, and gmlp.nn's error said "use
# causal=False" to a caller who had passed it
@example(variant="mixer", ffn=1, heads=1, attn=None, toeplitz=False, causal=False, fft=None, token_mlp=None,
         sparse=False, per_seq=None, head="causal")
def test_an_accepted_config_builds_a_model_that_runs(
    variant: str, ffn: int, heads: int, attn: int | None, toeplitz: bool, causal: bool, fft: int | None,
    token_mlp: int | None, sparse: bool, per_seq: int | None, head: str,
) -> None:
    """Any combination of the structural options is either refused by ``GMLPConfig`` with a ValueError
    that names an argument, or builds every head and runs a forward (and backward) pass: no invalid
    combination gets past the config to fail inside ``gmlp.nn``. (The one head-specific refusal: the
    causal LM of a ``"mixer"`` config, which cannot be causal.)"""
    kw = dict(
        vocab_size=8, hidden_size=3, intermediate_size=ffn, num_hidden_layers=1, max_position_embeddings=4,
        sgu_variant=variant, sgu_heads=heads, tiny_attn_size=attn, toeplitz=toeplitz, causal=causal,
        spatial_fft_threshold=fft, sgu_token_mlp_dim=token_mlp, sparse_prediction=sparse,
        max_predictions_per_seq=per_seq, num_labels=2,
    )
    try:
        config = GMLPConfig(**kw)
    except ValueError as err:
        # the message leads with the argument it refuses ("sgu_heads must ...", "sgu_variant='mixer' ...")
        assert any(str(err).startswith(name) for name in kw), f"no argument leads the error: {err}"
        return
    if head == "causal" and variant == "mixer":
        refusal = r"GMLPForCausalLM needs causal.*sgu_variant 'mixer' cannot be causal"
        with pytest.raises(ValueError, match=refusal):
            HEADS[head](config)
        return
    model = HEADS[head](config)
    out = model(input_ids=torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]]))
    next(iter(tensors(out).values())).sum().backward()


# ---------------------------------------------------------------------------------------------------
# exact dependence structure: causality, padding, other samples (through gradients)
# ---------------------------------------------------------------------------------------------------
def _token_outputs(head: str, out: Any) -> torch.Tensor:
    """The per-token output ``(batch, seq, channels)`` of a per-token head."""
    if head == "base":
        return out.last_hidden_state
    if head == "qa":
        return torch.stack([out.start_logits, out.end_logits], dim=-1)
    return out.logits


@fuzz(20)
@given(
    kw=configs(),
    head=st.sampled_from(["base", "mlm", "tokcls", "qa", "causal"]),
    data=st.data(),
)
def test_real_outputs_depend_on_no_pad_no_other_row_and_no_later_token_when_causal(
    kw: dict, head: str, data: st.DataObject
) -> None:
    """``d out[b, t] / d embeds[b', s]`` (random projections of each output token, one backward each) is
    exactly 0 for every other row ``b' != b``, for every padded ``s``, and in a causal model for every
    ``s > t``; it is non-zero for every real ``s <= t`` (every real ``s`` if not causal) where the blocks
    can mix tokens at all (a gating variant, more than two channels in the LayerNorms)."""
    model = build(head, kw)
    causal = model.config.causal
    inputs = data.draw(padded_batches(kw))
    mask = inputs["attention_mask"] != 0
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(True)
    out = _token_outputs(head, model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                                     token_type_ids=inputs["token_type_ids"]))
    batch, n = mask.shape
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    gate = kw["intermediate_size"] // 2 if kw["sgu_variant"] == "sgu" else kw["intermediate_size"]
    # (a LayerNorm over 1 or 2 channels is locally constant, +-1 per channel: no gradient flows through it)
    mixes = kw["sgu_variant"] != "none" and kw["hidden_size"] > 2 and gate > 2
    for b in range(batch):
        for t in range(n):
            if not mask[b, t]:
                continue
            (grad,) = torch.autograd.grad((out[b, t] * r[b, t]).sum(), embeds, retain_graph=True)
            dep = grad.abs().sum(-1)  # (batch, seq)
            others = torch.ones(batch, dtype=torch.bool)
            others[b] = False
            assert torch.all(dep[others] == 0), f"row {b} token {t} depends on another row"
            assert torch.all(dep[b, ~mask[b]] == 0), f"row {b} token {t} depends on a padded token"
            if causal:
                assert torch.all(dep[b, t + 1 :] == 0), f"row {b} token {t} depends on a later token"
            if mixes:
                seen = mask[b].clone()
                if causal:
                    seen[t + 1 :] = False
                assert torch.all(dep[b, seen] > 0), f"row {b} token {t} ignores a real token it should see"


# ---------------------------------------------------------------------------------------------------
# the fast paths give the plain ops' results
# ---------------------------------------------------------------------------------------------------
def _run(model: torch.nn.Module, head: str, inputs: dict, fast: bool) -> tuple[dict, dict, tuple]:
    """(no_grad outputs, train-mode outputs, gradients of the parameters and the embeddings) with every fast
    path on (oneDNN products, fused split-GELU-LayerNorm, in-place finishes, FFT mixing where configured) or
    every module called plainly (a global forward hook turns the fused paths off) and no FFT."""
    hook = None
    saved = {m: m.fft_threshold for m in model.modules() if hasattr(m, "fft_threshold")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GMLP_DISABLE_CPU_FUSION", "0" if fast else "1")
        if not fast:
            hook = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
            for m in saved:
                m.fft_threshold = None
        try:
            model.eval()
            with torch.no_grad():
                inference = tensors(model(**inputs, output_hidden_states=True))
            model.train()  # (dropout and drop path are 0)
            embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(True)
            rest = {k: v for k, v in inputs.items() if k != "input_ids"}
            train = tensors(model(inputs_embeds=embeds, **rest, output_hidden_states=True))
            seed = torch.Generator().manual_seed(2)
            total = sum((v * torch.randn(v.shape, generator=seed)).sum() for v in train.values())
            params = [p for p in model.parameters() if p.requires_grad]
            grads = torch.autograd.grad(total, [embeds, *params], allow_unused=True)
        finally:
            if hook is not None:
                hook.remove()
            for m, value in saved.items():
                m.fft_threshold = value
            model.eval()
    return inference, {k: v.detach() for k, v in train.items()}, grads


@pytest.mark.skipif(not cpu_linear._HAS_ONEDNN_LINEAR, reason="no oneDNN linear in this torch build")
@fuzz(20)
@given(kw=configs(min_width=3), head=st.sampled_from(sorted(HEADS)), data=st.data())
def test_fast_paths_equal_the_plain_ops(kw: dict, head: str, data: st.DataObject) -> None:
    """Forward (inference and training) and every gradient: fast paths == plain module calls, fp32.

    (LayerNorms of at least 3 channels: over 1 or 2 channels the normalised values are constant, +-1, and
    torch's LayerNorm backward turns the rounding of its input into a gradient of ~1e-4 to 1e-3 where the
    exact one is 0, which differs between any two paths.)"""
    model = build(head, kw)
    inputs = data.draw(padded_batches(kw))
    mask = inputs["attention_mask"] != 0
    fast = _run(model, head, inputs, fast=True)
    ref = _run(model, head, inputs, fast=False)
    for got, want in zip(fast[:2], ref[:2], strict=True):
        assert got.keys() == want.keys()
        for name, value in want.items():
            tokenwise = name.startswith("hidden_states") or per_token(head)
            rows = mask.any(dim=1)  # (an all-padding row's pooled token is a pad: unspecified)
            a, b = (got[name][mask], value[mask]) if tokenwise else (got[name][rows], value[rows])
            torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=f"{head}: {name}")
    # Gradients relative to the largest one: random large weights make some of them ill-conditioned (a
    # LayerNorm over 3 channels that are nearly equal), and a small one may be the sum of large ones that
    # cancel (both paths then equally far from float64's: 1e-2 on a bias gradient of 5 next to ones of 400).
    scale = max([1.0] + [float(b.abs().max()) for b in ref[2] if b is not None])
    for a, b in zip(fast[2], ref[2], strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5 * scale, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------------
@fuzz(12)
@given(kw=configs(), head=st.sampled_from(sorted(HEADS)), data=st.data())
def test_save_and_load_round_trip_gives_identical_outputs(kw: dict, head: str, data: st.DataObject) -> None:
    """``save_pretrained`` (safetensors) then ``from_pretrained``: the same config, every parameter and
    buffer bit for bit, the same outputs on a padded batch (to the last bit or so), and tied weights still
    tied."""
    model = build(head, kw)
    inputs = data.draw(padded_batches(kw))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        assert os.path.exists(os.path.join(tmp, "model.safetensors"))
        loaded = type(model).from_pretrained(tmp).eval()
    for key in kw:
        assert getattr(loaded.config, key) == getattr(model.config, key), key
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    head_layer = loaded.get_output_embeddings()
    if head_layer is not None and loaded.config.tie_word_embeddings:
        assert head_layer.weight is loaded.get_input_embeddings().weight
    with torch.no_grad():
        a, b = tensors(model(**inputs)), tensors(loaded(**inputs))
    for name, value in a.items():  # (1 ulp apart at most: the loaded tensors are not 64-byte aligned, and
        # MKL's products round by alignment)
        torch.testing.assert_close(b[name], value, atol=1e-6, rtol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------------
# the heads' own invariants: sparse prediction, padded losses, input embeddings, resizing
# ---------------------------------------------------------------------------------------------------
def _labels(inputs: dict, vocab: int, seed: int) -> torch.Tensor:
    """Random token labels with about half of the positions -100."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, inputs["input_ids"].shape, generator=gen)
    return labels.masked_fill(torch.rand(labels.shape, generator=gen) < 0.5, -100)


@fuzz(15)
@given(kw=configs(), per_seq=st.one_of(st.none(), st.integers(1, MAX_SEQ)), data=st.data())
def test_sparse_prediction_gives_the_dense_loss_and_the_labelled_logits(
    kw: dict, per_seq: int | None, data: st.DataObject
) -> None:
    """``sparse_prediction`` (with or without ``max_predictions_per_seq``) gives the dense head's loss and
    its logits at the labelled real tokens, and the same gradients."""
    inputs = data.draw(padded_batches(kw))
    labels = _labels(inputs, kw["vocab_size"], data.draw(st.integers(0, 99)))
    real = inputs["attention_mask"] != 0
    kept = (labels != -100) & real
    if per_seq is not None:  # a sequence with more labelled tokens is an error (tested elsewhere)
        per_seq = max(per_seq, int(kept.sum(dim=1).max()))
    dense = build("mlm", kw)
    sparse = build("mlm", {**kw, "sparse_prediction": True, "max_predictions_per_seq": per_seq})
    sparse.load_state_dict(dense.state_dict())
    d = dense(**inputs, labels=labels)
    s = sparse(**inputs, labels=labels)
    if kept.any():
        torch.testing.assert_close(s.loss, d.loss, atol=ATOL, rtol=RTOL)
        (gd,) = torch.autograd.grad(d.loss, dense.gmlp.embed.weight)
        (gs,) = torch.autograd.grad(s.loss, sparse.gmlp.embed.weight)
        torch.testing.assert_close(gs, gd, atol=ATOL, rtol=RTOL)
    else:  # no target at all: the mean over none, as transformers' heads
        assert torch.isnan(s.loss) and torch.isnan(d.loss)
    if per_seq is None:
        torch.testing.assert_close(s.logits, d.logits[kept], atol=ATOL, rtol=RTOL)
    else:
        k = min(per_seq, labels.shape[1])
        rows = s.logits.view(labels.shape[0], k, -1)
        for b in range(labels.shape[0]):
            count = int(kept[b].sum())
            torch.testing.assert_close(rows[b, :count], d.logits[b, kept[b]], atol=ATOL, rtol=RTOL)


@fuzz(15)
@given(kw=configs(), head=st.sampled_from(["mlm", "causal", "tokcls"]), data=st.data())
def test_padded_token_loss_is_the_target_weighted_mean_of_the_rows_alone(
    kw: dict, head: str, data: st.DataObject
) -> None:
    """The loss of a padded batch is the mean over all its targets: each row alone (padding deleted, no
    mask) gives its own mean, and the batch's loss is their average weighted by the rows' target counts.
    Labels at padded positions never count (for the causal LM: a real token predicts the next real one)."""
    model = build(head, kw)
    inputs = data.draw(padded_batches(kw))
    classes = model.config.num_labels if head == "tokcls" else kw["vocab_size"]
    labels = _labels(inputs, classes, data.draw(st.integers(0, 99)))
    real = inputs["attention_mask"] != 0
    with torch.no_grad():
        batch_loss = model(**inputs, labels=labels).loss
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        row_labels = labels[b, real[b]]
        targets = row_labels[1:] if head == "causal" else row_labels
        n = int((targets != -100).sum())
        if n:
            with torch.no_grad():
                total += float(model(**_alone(inputs, b), labels=row_labels[None]).loss) * n
            count += n
    if count == 0:
        assert torch.isnan(batch_loss)
    else:
        torch.testing.assert_close(float(batch_loss), total / count, atol=1e-5, rtol=1e-5)


@fuzz(10)
@given(kw=configs(), head=st.sampled_from(sorted(HEADS)), data=st.data())
def test_inputs_embeds_give_the_outputs_of_the_ids(kw: dict, head: str, data: st.DataObject) -> None:
    """``inputs_embeds=embed(input_ids)`` gives exactly the outputs of ``input_ids``."""
    model = build(head, kw)
    inputs = data.draw(padded_batches(kw))
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    with torch.no_grad():
        a, b = tensors(model(**inputs)), tensors(model(inputs_embeds=embeds, **rest))
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, atol=0, rtol=0, msg=name)


@fuzz(10)
@given(kw=configs(), head=st.sampled_from(sorted(HEADS)), m=st.integers(1, MAX_SEQ), data=st.data())
def test_resized_model_gives_the_original_outputs_on_short_inputs(
    kw: dict, head: str, m: int, data: st.DataObject
) -> None:
    """``resize_sequence_length(m)`` keeps the outputs of every input of at most ``m`` tokens."""
    m = min(m, kw["max_position_embeddings"])
    model = build(head, kw)
    short = {**kw, "max_position_embeddings": m}
    inputs = data.draw(padded_batches(short))
    with torch.no_grad():
        before = tensors(model(**inputs))
    model.resize_sequence_length(m)
    assert model.config.max_position_embeddings == m
    with torch.no_grad():
        after = tensors(model(**inputs))
    real = inputs["attention_mask"] != 0
    for name, value in before.items():
        a, b = (after[name][real], value[real]) if per_token(head) else (after[name], value)
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=name)


@fuzz(8)
@given(kw=configs(min_width=3), head=st.sampled_from(sorted(HEADS)), every=st.integers(1, 2), data=st.data())
def test_gradient_checkpointing_gives_the_same_gradients(
    kw: dict, head: str, every: int, data: st.DataObject
) -> None:
    """Gradient checkpointing (every block, or every other one where transformers 5 offers it) changes no
    output or gradient."""
    model = build(head, kw)
    inputs = data.draw(padded_batches(kw))
    seed = data.draw(st.integers(0, 99))

    def grads() -> list[torch.Tensor]:
        model.train()
        out = tensors(model(**inputs))
        gen = torch.Generator().manual_seed(seed)
        total = sum((v * torch.randn(v.shape, generator=gen)).sum() for v in out.values())
        return list(torch.autograd.grad(total, list(model.parameters()), allow_unused=True))

    plain = grads()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 (the old names are deprecated)
        model.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=every)
        checkpointed = grads()
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        checkpointed = grads()
        model.gradient_checkpointing_disable()
    scale = max([1.0] + [float(g.abs().max()) for g in plain if g is not None])
    for a, b in zip(checkpointed, plain, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5 * scale, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# torch.compile: no graph break, the eager results
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
@fuzz(2)
@given(kw=configs(variants=("sgu", "mixer")), head=st.sampled_from(sorted(HEADS)), data=st.data())
def test_compiles_fullgraph_and_gives_the_eager_outputs(kw: dict, head: str, data: st.DataObject) -> None:
    """``torch.compile(fullgraph=True)`` (aot_eager: graphs, no code generation) captures a drawn config
    with every output flag on, and gives the eager outputs at the real tokens (the compiled model always
    takes the general padding path, which eager mode takes only for left or inner padding)."""
    torch._dynamo.reset()
    model = build(head, kw)
    inputs = data.draw(padded_batches(kw))
    flags = {"output_hidden_states": True, "output_attentions": kw.get("tiny_attn_size") is not None}
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        want, got = tensors(model(**inputs, **flags)), tensors(compiled(**inputs, **flags))
    mask = inputs["attention_mask"] != 0
    assert got.keys() == want.keys()
    for name, value in want.items():
        if name.startswith("attentions"):  # (batch, 1, query, key): real queries, every key
            a, b = got[name][:, 0][mask], value[:, 0][mask]
        elif name.startswith("hidden_states") or per_token(head):
            a, b = got[name][mask], value[mask]
        else:
            rows = mask.any(dim=1)
            a, b = got[name][rows], value[rows]
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=name)
    torch._dynamo.reset()


def test_attention_maps_compile_fullgraph() -> None:
    """Found by the test above: ``output_attentions=True`` registered forward hooks inside ``forward``, which
    torch.compile cannot trace (``fullgraph=True`` raised ``Unsupported: setattr() on unsupported type``).
    Compiled, the maps are those of eager mode, with left, right and inner padding, and carry gradients."""
    torch._dynamo.reset()
    kw = dict(
        vocab_size=10, hidden_size=4, intermediate_size=6, num_hidden_layers=2, max_position_embeddings=6,
        tiny_attn_size=3, causal=True,
    )
    model = build("base", kw)
    ids = torch.randint(0, 10, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, :2] = 0
    mask[1, 4:] = 0
    mask[2, 1:3] = 0
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        want = model(ids, attention_mask=mask, output_attentions=True).attentions
        got = compiled(ids, attention_mask=mask, output_attentions=True).attentions
    real = mask.bool()
    assert len(got) == len(want) == 2
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a[:, 0][real], b[:, 0][real], atol=1e-6, rtol=1e-5)
    model.train()
    compiled(ids, attention_mask=mask, output_attentions=True).attentions[1].sum().backward()
    assert model.blocks[1].tiny_attn.qkv.weight.grad.abs().sum() > 0
    torch._dynamo.reset()


@fuzz(10)
@given(
    kw=configs(),
    head=st.sampled_from(sorted(HEADS)),
    rates=st.tuples(*[st.sampled_from([0.0, 0.1, 0.5]) for _ in range(3)]),
    schedule=st.sampled_from(["uniform", "linear"]),
    data=st.data(),
)
def test_dropout_and_drop_path_change_nothing_in_eval_mode(
    kw: dict, head: str, rates: tuple[float, float, float], schedule: str, data: st.DataObject
) -> None:
    """Hidden, classifier and drop-path rates (any schedule) give in eval mode the outputs of a model
    without them, on every path (the padded batch of the other tests)."""
    hidden, classifier, drop_path = rates
    model = build(head, kw)
    dropped = build(head, {
        **kw, "hidden_dropout_prob": hidden, "classifier_dropout": classifier, "drop_path_rate": drop_path,
        "drop_path_schedule": schedule,
    })  # fmt: skip
    dropped.load_state_dict(model.state_dict())
    inputs = data.draw(padded_batches(kw))
    with torch.no_grad():
        want, got = tensors(model(**inputs)), tensors(dropped(**inputs))
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, atol=0, rtol=0, msg=name)
