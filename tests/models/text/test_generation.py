"""``GMLPForCausalLM.generate()``: what each step computes (the last position's logits only, equal to a full
forward's), the length limit of a cache-free gMLP (a prompt longer than ``max_position_embeddings`` refused
before any step, a ``max_length`` past the window warned about before the first step), padded batches (left,
right or inner padding) of every causal variant equal to each prompt alone, and the text-generation pipeline
with a tokenizer trained and saved by gmlp (right padding on transformers 4.x)."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from text_hf_helpers import SEQ, randomize, tiny_config
from transformers import pipeline

from gmlp.models.text import GMLPForCausalLM


def _lm(**overrides) -> GMLPForCausalLM:
    """A tiny causal LM whose greedy continuations vary (random untied head and blocks: with the tied,
    near-initial weights every prompt repeats its last token, which would make equalities vacuous)."""
    options = {"causal": True, "pad_token_id": 0, "eos_token_id": None, "tie_word_embeddings": False}
    torch.manual_seed(0)
    model = randomize(GMLPForCausalLM(tiny_config(**{**options, **overrides})))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 2 / p.shape[-1] ** 0.5)
    return model


_MODEL = _lm()


def _greedy_loop(
    model: GMLPForCausalLM, prompt: list[int], steps: int
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding by hand: the argmax of a full forward on the whole (unpadded) prefix, each step."""
    ids, logits = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(steps):
            last = model(ids).logits[0, -1]
            logits.append(last)
            ids = torch.cat([ids, last.argmax().view(1, 1)], dim=1)
    return ids[0, len(prompt) :].tolist(), logits


# ---------------------------------------------------------------------------------------------------
# cost of a step: lm_head on the last position only
# ---------------------------------------------------------------------------------------------------
def test_generate_runs_lm_head_on_the_last_position_only() -> None:
    """generate() gives logits_to_keep=1 to a model that names it in forward's signature; it was hidden in
    **kwargs, so every step ran lm_head (a vocabulary-wide GEMM) on the whole prefix and kept one row: a
    6 x 256 model with a 32k vocabulary generated ~2x slower on the CPU. Tokens and scores are unchanged."""
    rows: list[int] = []
    handle = _MODEL.lm_head.register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[-2]))
    try:
        prompts = torch.tensor([[2, 7, 9, 11], [0, 0, 2, 8]])
        mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
        out = _MODEL.generate(prompts, attention_mask=mask, max_new_tokens=5, do_sample=False,
                              return_dict_in_generate=True, output_scores=True)  # fmt: skip
    finally:
        handle.remove()
    assert rows == [1] * 5
    for row, prompt in enumerate([[2, 7, 9, 11], [2, 8]]):
        tokens, logits = _greedy_loop(_MODEL, prompt, 5)
        assert out.sequences[row, 4:].tolist() == tokens
        for step in range(5):
            torch.testing.assert_close(out.scores[step][row], logits[step], atol=1e-5, rtol=0)


def test_forward_logits_to_keep_none_means_every_position() -> None:
    ids = torch.tensor([[2, 7, 9, 11]])
    with torch.no_grad():
        full = _MODEL(ids).logits
        assert torch.equal(_MODEL(ids, logits_to_keep=None).logits, full)
        last = _MODEL(ids, logits_to_keep=None, num_logits_to_keep=1).logits
        torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=0)
        two = _MODEL(ids, logits_to_keep=2, num_logits_to_keep=1).logits  # (logits_to_keep wins)
        torch.testing.assert_close(two, full[:, -2:], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------
# the window of a cache-free gMLP: max_position_embeddings tokens
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lengths", [{"max_new_tokens": 1}, {}, {"max_length": SEQ + 5}])
def test_a_prompt_longer_than_the_window_is_refused_before_any_step(lengths: dict) -> None:
    """It got 'generate() reached 33 tokens (prompt and generated tokens)' and the advice max_new_tokens <=
    32 - prompt length (negative), or with the default max_length transformers' 'max_length is set to 32'."""
    calls: list[int] = []
    handle = _MODEL.register_forward_hook(lambda *_: calls.append(1))
    try:
        match = (rf"prompt of {SEQ + 1} tokens .*more than max_position_embeddings={SEQ}.*keep the prompt's "
                 rf"last {SEQ} \+ 1 - max_new_tokens tokens at most .*truncation_side='left'")
        with pytest.raises(ValueError, match=match):
            _MODEL.generate(torch.full((2, SEQ + 1), 7), do_sample=False, **lengths)
    finally:
        handle.remove()
    assert calls == []


def test_a_max_length_past_the_window_warns_before_the_first_step() -> None:
    """Asking for more tokens than fit warns at once (naming the numbers), not after the steps that fit;
    generation still runs, so a stop token inside the window ends it normally."""
    prompt = torch.tensor([[2, 7, 9, 11]])
    free = _MODEL.generate(prompt, max_new_tokens=3, do_sample=False)
    eos = int(free[0, 6])
    with pytest.warns(UserWarning, match=rf"up to {SEQ + 6} tokens \(the prompt's 4 and up to {SEQ + 2} new "
                      rf"ones\).*max_position_embeddings={SEQ}.*max_new_tokens <= {SEQ - 3}"):  # fmt: skip
        stopped = _MODEL.generate(prompt, max_new_tokens=SEQ + 2, do_sample=False, eos_token_id=eos)
    assert torch.equal(stopped, free)


@pytest.mark.parametrize(("prompt_len", "new"), [(4, SEQ - 4), (4, SEQ - 3), (SEQ, 1)])
def test_what_fits_in_the_window_runs_without_the_warning(prompt_len: int, new: int) -> None:
    """Up to max_position_embeddings + 1 tokens in all (the last predicted from n), a prompt of exactly n
    included; and transformers' default max_length (clamped to n) never warns."""
    prompt = torch.randint(5, 37, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*gMLP reads at most")
        out = _MODEL.generate(prompt, max_new_tokens=new, do_sample=False)
        assert out.shape == (1, prompt_len + new)
        assert _MODEL.generate(prompt[:, :4], do_sample=False).shape[1] <= SEQ


# ---------------------------------------------------------------------------------------------------
# left-padded batches, every causal variant
# ---------------------------------------------------------------------------------------------------
_VARIANTS = [
    {"sgu_variant": "sgu"},
    {"sgu_variant": "sgu", "toeplitz": False, "sgu_heads": 2},
    {"sgu_variant": "sgu", "tiny_attn_size": None, "spatial_fft_threshold": 4},
    {"sgu_variant": "linear", "tiny_attn_size": None},
    {"sgu_variant": "additive"},
    {"sgu_variant": "multiplicative", "toeplitz": False},
    {"sgu_variant": "none", "tiny_attn_size": None},
]
_VARIANT_MODELS: dict[int, GMLPForCausalLM] = {}


def _padded(prompts: list[list[int]], layout: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts as one batch of width max_len + 2: padding (id 0) on the left, on the right, or at random
    positions (inner padding, a few pads on either side included); the real tokens in order."""
    width, gen = max(map(len, prompts)) + 2, torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        if layout == "left":
            where = torch.arange(width - len(prompt), width)
        elif layout == "right":
            where = torch.arange(len(prompt))
        else:
            where = torch.randperm(width, generator=gen)[: len(prompt)].sort().values
        ids[row, where], mask[row, where] = torch.tensor(prompt), 1
    return ids, mask


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    variant=st.integers(0, len(_VARIANTS) - 1),
    prompts=st.lists(st.lists(st.integers(5, 36), min_size=1, max_size=6), min_size=2, max_size=3),
    layout=st.sampled_from(["left", "right", "inner"]),
    seed=st.integers(0, 2**16),
    num_beams=st.sampled_from([1, 2]),
)
def test_a_padded_batch_generates_what_each_prompt_generates_alone(variant, prompts, layout, seed, num_beams):
    """Greedy and beam search over a padded batch give each row the tokens (and, greedy, the scores) of that
    prompt generated alone, for every variant that can be causal; greedy alone equals the manual loop.
    Right- and inner-padded prompts included: generate() reads the last position's logits, which were a
    pad's (unspecified) output, so such a row's first token was garbage and the rest went on from it
    (transformers only warns, and only when the last token is the pad id; its 4.x text-generation pipeline
    pads on the side the tokenizer says, which for a gmlp tokenizer is the right)."""
    if variant not in _VARIANT_MODELS:
        _VARIANT_MODELS[variant] = _lm(**_VARIANTS[variant])
    model, steps = _VARIANT_MODELS[variant], 4
    ids, mask = _padded(prompts, layout, seed)
    width = ids.shape[1]
    options = {"max_new_tokens": steps, "do_sample": False, "num_beams": num_beams, "pad_token_id": 0,
               "return_dict_in_generate": True, "output_scores": True}  # fmt: skip
    out = model.generate(ids, attention_mask=mask, **options)
    for row, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), **options)
        assert out.sequences[row, width:].tolist() == alone.sequences[0, len(prompt) :].tolist()
        if num_beams == 1:
            tokens, logits = _greedy_loop(model, prompt, steps)
            assert alone.sequences[0, len(prompt) :].tolist() == tokens
            for step in range(steps):
                torch.testing.assert_close(out.scores[step][row], alone.scores[step][0], atol=1e-5, rtol=0)
                torch.testing.assert_close(alone.scores[step][0], logits[step], atol=1e-5, rtol=0)


def test_right_padded_prompts_keep_token_types_and_their_layout_in_the_output() -> None:
    """The row reordering of a right-padded prompt reaches the token types too, and the sequences generate()
    returns keep the prompt as given (pads where they were, new tokens appended)."""
    model = _lm()
    with torch.no_grad():
        model.gmlp.token_type_embed.weight.normal_(0, 1, generator=torch.Generator().manual_seed(2))
    ids, mask = torch.tensor([[2, 7, 9, 11], [2, 8, 0, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    types = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1]])  # (generate() extends the last column's types)
    out = model.generate(ids, attention_mask=mask, token_type_ids=types, max_new_tokens=3, do_sample=False)
    assert torch.equal(out[:, :4], ids)
    alone = model.generate(torch.tensor([[2, 8]]), token_type_ids=torch.tensor([[0, 1]]), max_new_tokens=3,
                           do_sample=False)  # fmt: skip
    assert out[1, 4:].tolist() == alone[0, 2:].tolist()
    other = model.generate(torch.tensor([[2, 8]]), max_new_tokens=3, do_sample=False)
    assert other[0, 2:].tolist() != alone[0, 2:].tolist()  # (the types matter for this model)


# ---------------------------------------------------------------------------------------------------
# text-generation pipeline with a tokenizer trained and saved by gmlp
# ---------------------------------------------------------------------------------------------------
def test_text_generation_pipeline_with_a_gmlp_tokenizer(tmp_path) -> None:
    """Saved model + gmlp tokenizer in one folder: the pipeline loads them, batches give each prompt its own
    continuation (transformers 5's pipeline pads on the left; 4.x keeps the tokenizer's right padding, which
    gave the shorter prompt a garbage continuation), return_full_text=False gives the new text only, and a
    prompt longer than the window is refused, or truncated on request."""
    from gmlp.train.tokenizer import load_tokenizer, train_tokenizer

    docs = ["the whale swam in the sea", "a gating unit mixes tokens", "the cat sat on the mat"] * 5
    train_tokenizer(docs, vocab_size=80, model_max_length=SEQ).save_pretrained(str(tmp_path))
    tok = load_tokenizer(tmp_path)
    model = _lm(vocab_size=len(tok))
    with torch.no_grad():  # no special tokens generated (they decode to nothing)
        model.lm_head.bias[:5] = -100
    model.save_pretrained(tmp_path)
    # (the tokenizer given: transformers 4.45's pipeline(model=folder) loads none for a model type that is
    # not in its tokenizer mapping)
    gen = pipeline("text-generation", model=str(tmp_path), tokenizer=load_tokenizer(tmp_path), device="cpu")
    prompts = ["the whale swam in the sea", "a cat"]
    options = {"max_new_tokens": 4, "do_sample": False}
    alone = [gen(p, return_tensors=True, **options)[0]["generated_token_ids"] for p in prompts]
    batched = gen(prompts, batch_size=2, return_tensors=True, **options)
    for got, want in zip(batched, alone, strict=True):
        assert [t for t in got[0]["generated_token_ids"] if t != 0] == want  # (padding: the pipeline's side)
    full = gen(prompts, batch_size=2, **options)
    new = gen(prompts, batch_size=2, return_full_text=False, **options)
    for f, n, p in zip(full, new, prompts, strict=True):
        text = f[0]["generated_text"]
        assert text.startswith(p) and text[len(p) :] == n[0]["generated_text"] != ""
    long = " ".join(docs[:6])
    with pytest.raises(ValueError, match=f"more than max_position_embeddings={SEQ}"):
        gen(long, **options)
    truncated = gen(long, truncation=True, return_tensors=True, max_new_tokens=1)
    assert len(truncated[0]["generated_token_ids"]) == SEQ + 1
