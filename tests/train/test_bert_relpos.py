"""``--arch bert-relpos``: Table 3's "BERT-base + relative position bias" baseline (transformers' MPNet).

MPNet is BERT's post-LN encoder and MLM head with a learned T5-style bucketed relative attention bias shared
by all layers, RoBERTa-style absolute positions (offset by MPNet's padding position) and no token types.
These tests check its config, its parameter count against BERT's, its positions under padding (MPNet fixes
its padding id at 1, which is this package's ``[UNK]``), pretraining with ``--resume``, finetuning
(classification of single sentences and pairs, QA) and loading ``final/`` with the Auto classes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from text_corpus import SENTENCES, write_corpus
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    MPNetForMaskedLM,
    MPNetForSequenceClassification,
)
from transformers.models.mpnet.modeling_mpnet import create_position_ids_from_input_ids

from gmlp.cli import main
from gmlp.train import text as pipelines
from gmlp.train.recipe import ConfigError
from gmlp.train.text import FinetuneConfig, PretrainConfig, build_model_config

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SPECIAL = {"pad": 0, "cls": 2, "sep": 3, "mask": 4}  # the ids of gmlp.train.tokenizer's special tokens
UNK = 1
SIZES = ["--layers", "2", "--hidden", "32", "--ffn", "64", "--heads", "2"]
QUIET = ["--batch-size", "4", "--no-progress", "--log-every", "1"]


def _tiny_model(seq_len: int = 16, vocab: int = 40, dropout: float = 0.0) -> torch.nn.Module:
    opts = PretrainConfig(arch="bert-relpos", layers=2, hidden=32, ffn=64, heads=2, seq_len=seq_len,
                          dropout=dropout)
    config = build_model_config(opts, vocab_size=vocab, special_ids=SPECIAL)
    torch.manual_seed(0)
    return pipelines._prepare_mpnet(MPNetForMaskedLM(config), SPECIAL["pad"]).eval()


def _logits(model: torch.nn.Module, ids: torch.Tensor, *, own_positions: bool = False) -> torch.Tensor:
    """The model's MLM logits for ``ids`` (``[PAD]`` = 0 is padding) as the pipelines call it, or with
    MPNet's own position rule (``own_positions``: as a user of ``final/`` who passes no position ids)."""
    batch = {"input_ids": ids, "attention_mask": (ids != SPECIAL["pad"]).long()}
    if not own_positions:
        batch = pipelines._with_model_inputs(batch, model.config)
    with torch.no_grad():
        return model(**batch).logits


# --- the model -----------------------------------------------------------------------------------------


def test_config_is_a_bert_sized_mpnet_with_a_relative_attention_bias() -> None:
    opts = PretrainConfig(arch="bert-relpos", layers=3, hidden=64, ffn=96, heads=4, seq_len=40, dropout=0.1)
    config = build_model_config(opts, vocab_size=77, special_ids=SPECIAL, num_labels=3)
    assert config.model_type == "mpnet" and pipelines._arch_name(config) == "bert-relpos"
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (3, 64, 96)
    assert config.num_attention_heads == 4 and config.vocab_size == 77 and config.num_labels == 3
    assert config.hidden_dropout_prob == config.attention_probs_dropout_prob == 0.1
    assert config.hidden_act == "gelu" and config.layer_norm_eps == 1e-12  # as BERT's
    assert config.pad_token_id == SPECIAL["pad"]
    # MPNet's compute_position_bias always uses 32 buckets: the table must have exactly 32 rows
    assert config.relative_attention_num_buckets == 32
    assert config.max_position_embeddings == 40 + 2  # positions 2 .. 41 (1 = padding)
    assert pipelines._max_len(config, None) == 40
    bias = MPNetForMaskedLM(config).mpnet.encoder.relative_attention_bias
    assert tuple(bias.weight.shape) == (32, 4)  # one learned bias per bucket and head, shared by the layers


def test_the_relative_bias_is_used() -> None:
    model = _tiny_model()
    ids = torch.tensor([[2, 10, 11, 12, 13, 3]])
    before = _logits(model, ids)
    with torch.no_grad():
        model.mpnet.encoder.relative_attention_bias.weight.normal_(0.0, 1.0)
    assert not torch.allclose(_logits(model, ids), before, atol=1e-4)


@pytest.mark.parametrize(
    ("layers", "hidden", "ffn", "heads", "seq", "vocab"),
    [(2, 32, 64, 2, 32, 150), (4, 128, 768, 2, 128, 8192), (12, 768, 3072, 12, 512, 30522)],
    ids=["tiny", "reproduce", "bert-base"],
)
def test_parameter_count_within_half_a_percent_of_bert(
    layers: int, hidden: int, ffn: int, heads: int, seq: int, vocab: int
) -> None:
    """MPNet's extra parameters (32 x heads relative biases, 2 more position rows) against BERT's two
    token-type rows: the counts agree to well within 0.5%."""
    opts = PretrainConfig(arch="bert-relpos", layers=layers, hidden=hidden, ffn=ffn, heads=heads, seq_len=seq)
    bert = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=ffn,
                      num_attention_heads=heads, max_position_embeddings=seq)
    with torch.device("meta"):
        n_bert = sum(p.numel() for p in BertForMaskedLM(bert).parameters())
        relpos = MPNetForMaskedLM(build_model_config(opts, vocab_size=vocab, special_ids=SPECIAL))
        n_relpos = sum(p.numel() for p in relpos.parameters())
    assert n_relpos - n_bert == 32 * heads  # (+2 x hidden position rows, -2 x hidden token-type rows)
    assert abs(n_relpos - n_bert) / n_bert < 0.005


def test_positions_from_the_mask_match_mpnets_own_where_its_padding_id_is_the_pad() -> None:
    """Parity with MPNet's rule (positions from the ids, padding = id 1): for ids without a 1, with the
    padding written as 1, the positions from the attention mask are MPNet's, left or right padded."""
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = torch.randint(2, 40, (4, 12), generator=g)
        lengths = torch.randint(1, 13, (4,), generator=g)
        keep = torch.arange(12)[None, :] < lengths[:, None]
        for mask in (keep, keep.flip(1)):  # right, left padding
            reference = create_position_ids_from_input_ids(ids.masked_fill(~mask, 1), padding_idx=1)
            assert torch.equal(pipelines._mpnet_position_ids(mask.long()), reference)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_leaves_the_real_tokens_outputs_alone(side: str) -> None:
    """Sequences of 16 (the model's full length) and fewer tokens, some with ``[UNK]`` (id 1, which MPNet's
    own rule takes as padding), padded into one batch: each real token's logits are those of the sequence
    run alone. (MPNet's own rule, given ``[PAD]`` = 0, counts left padding as tokens and shifts the
    positions after an ``[UNK]``: the pipelines pass positions from the attention mask instead.)"""
    model = _tiny_model(seq_len=16)
    g = torch.Generator().manual_seed(1)
    seqs = []
    for length in (16, 9, 4, 12):
        ids = torch.randint(5, 40, (length,), generator=g)
        ids[0], ids[-1] = SPECIAL["cls"], SPECIAL["sep"]
        if length > 5:
            ids[2] = UNK
        seqs.append(ids)
    pad = lambda s: torch.cat([s, s.new_zeros(16 - len(s))]) if side == "right" else torch.cat(  # noqa: E731
        [s.new_zeros(16 - len(s)), s]
    )
    batch = _logits(model, torch.stack([pad(s) for s in seqs]))
    for i, s in enumerate(seqs):
        alone = _logits(model, s[None])[0]
        real = slice(0, len(s)) if side == "right" else slice(16 - len(s), 16)
        torch.testing.assert_close(batch[i, real], alone, rtol=1e-5, atol=1e-5)
    # [UNK] is a token like the others: positions 2 .. n + 1 (MPNet's own rule gives it the padding
    # position 1 and shifts the tokens after it)
    with torch.no_grad():
        explicit = model(input_ids=seqs[1][None], position_ids=torch.arange(2, 11)[None]).logits
    torch.testing.assert_close(_logits(model, seqs[1][None]), explicit)
    # a full-length sequence with MPNet's own positions (no [UNK]) stays within the position table
    full = seqs[0].clone()
    full[2] = 7
    torch.testing.assert_close(_logits(model, full[None], own_positions=True), _logits(model, full[None]))


def test_unk_embedding_learns_and_pad_embedding_does_not() -> None:
    """transformers' MPNet fixes its word embedding's padding_idx at 1 (RoBERTa's ``<pad>``), which is
    ``[UNK]`` here: ``_prepare_mpnet`` moves it to ``[PAD]`` (0), as BERT has it."""
    model = _tiny_model(dropout=0.0).train()
    ids = torch.tensor([[2, UNK, 10, 11, 3, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    hidden = model.mpnet(**pipelines._with_model_inputs(batch, model.config)).last_hidden_state
    # (no decoder: the input embedding's gradient; a random projection, as a LayerNorm output's plain sum
    # has no gradient)
    (hidden * torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    grad = model.mpnet.embeddings.word_embeddings.weight.grad
    assert grad[UNK].abs().sum() > 0 and grad[10].abs().sum() > 0
    assert grad[SPECIAL["pad"]].abs().sum() == 0


# --- options -------------------------------------------------------------------------------------------


BAD_FOR_BOTH = [
    ({"preset": "gmlp-base"}, "--preset"),
    ({"tiny_attn": 16}, "--tiny-attn"),
    ({"sgu_variant": "linear"}, "--sgu-variant"),
    ({"token_mlp_dim": 8}, "--token-mlp-dim"),
    ({"heads": 3}, "--heads"),
    ({"heads": 0}, "--heads"),
]


@pytest.mark.parametrize("config_cls", [PretrainConfig, FinetuneConfig])
@pytest.mark.parametrize(("option", "flag"), BAD_FOR_BOTH, ids=[b[1] + str(b[0]) for b in BAD_FOR_BOTH])
def test_bad_options_are_refused_as_for_bert(config_cls: type, option: dict, flag: str) -> None:
    messages = {}
    for arch in ("bert", "bert-relpos"):
        with pytest.raises(ConfigError) as err:
            config_cls(arch=arch, **option).validate()
        messages[arch] = str(err.value)
        assert messages[arch].startswith(flag), messages[arch]
    assert messages["bert-relpos"] == messages["bert"].replace("--arch bert ", "--arch bert-relpos ").replace(
        "--arch bert,", "--arch bert-relpos,"
    ) or messages["bert-relpos"] == messages["bert"]


def test_command_line_takes_the_arch_and_refuses_its_bad_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    argv = ["pretrain", "--arch", "bert-relpos", "--tiny-attn", "16", "--output", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(r"gmlp pretrain: error: --tiny-attn .*not --arch bert-relpos", err), err
    assert "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_the_command_lines_arch_choices_are_the_pipelines() -> None:
    from gmlp.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for command in ("pretrain", "finetune"):
        arch = next(a for a in sub.choices[command]._actions if a.dest == "arch")
        assert tuple(arch.choices) == pipelines.ARCHS


def test_grad_checkpointing_is_refused_by_name(tmp_path: Path) -> None:
    """transformers' MPNet has no activation checkpointing: its ValueError came as a traceback after the
    data was read; a new model is refused up front, a loaded one before training."""
    with pytest.raises(ConfigError, match=r"^--grad-checkpointing: .*MPNet \(--arch bert-relpos\)"):
        PretrainConfig(arch="bert-relpos", grad_checkpointing=True).validate()
    PretrainConfig(arch="bert", grad_checkpointing=True).validate()


# --- the pipelines end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer and two 4-step bert-relpos pretraining runs with dropout: ``a`` uninterrupted, ``b``
    stopped after 2 steps and resumed."""
    root = tmp_path_factory.mktemp("relpos")
    corpus = write_corpus(root / "corpus.txt")
    # one tokenizer for all runs: HF's WordPiece training breaks frequency ties in hash-map order
    # (see test_text_pipelines.test_resume_equals_uninterrupted)
    assert main(["tokenizer", "--corpus", str(corpus), "--output", str(root / "tok"), "--vocab-size",
                 "150"]) == 0
    args = ["pretrain", "--arch", "bert-relpos", *SIZES, *QUIET, "--seq-len", "32", "--corpus", str(corpus),
            "--steps", "4", "--save-every", "2", "--dropout", "0.1", "--tokenizer", str(root / "tok")]
    assert main([*args, "--output", str(root / "a")]) == 0
    assert main([*args, "--output", str(root / "b"), "--stop-after-steps", "2"]) == 0
    assert main([*args, "--output", str(root / "b"), "--resume"]) == 0
    return root


def test_pretrain_writes_an_mpnet_and_resumes_exactly(pretrained: Path) -> None:
    config = json.loads((pretrained / "a" / "final" / "config.json").read_text())
    assert config["model_type"] == "mpnet" and config["max_position_embeddings"] == 34
    assert config["relative_attention_num_buckets"] == 32 and config["pad_token_id"] == 0
    records = [json.loads(x) for x in (pretrained / "a" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "validation" and r["perplexity"] > 0 for r in records)
    a, b = (load_file(str(pretrained / run / "final" / "model.safetensors")) for run in ("a", "b"))
    assert a.keys() == b.keys() and any("relative_attention_bias" in k for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)


def test_final_loads_with_the_auto_classes(pretrained: Path) -> None:
    """``final/`` is a plain MPNet masked LM: loaded with AutoModelForMaskedLM it gives, on full-length and
    right-padded input without ``[UNK]`` (MPNet's own positions), the pipelines' logits."""
    from gmlp.train.tokenizer import load_tokenizer

    final = pretrained / "a" / "final"
    model = AutoModelForMaskedLM.from_pretrained(str(final), local_files_only=True).eval()
    assert isinstance(model, MPNetForMaskedLM)
    tok = load_tokenizer(final)
    enc = tok([SENTENCES[0], " ".join(SENTENCES)], padding=True, truncation=True, max_length=32,
              return_tensors="pt")
    assert enc["input_ids"].shape[1] == 32 and not (enc["input_ids"] == UNK).any()
    with torch.no_grad():
        own = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        ours = model(**pipelines._with_model_inputs(dict(enc), model.config)).logits
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(own[real], ours[real])


def test_finetune_pairs_without_token_types_and_load_final(
    pretrained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pair classification from the pretrained model: no ``token_type_ids`` reach the model (MPNet has no
    token-type embedding; its forward would take them and ignore them), positions do; the finetuned
    ``final/`` loads as an MPNetForSequenceClassification."""
    seen: list[set[str]] = []
    forward = MPNetForSequenceClassification.forward

    def spy(self: torch.nn.Module, *args: object, **kwargs: object) -> object:
        seen.append(set(kwargs))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(MPNetForSequenceClassification, "forward", spy)
    rows = [{"a": x, "b": y, "label": int(x[0] != y[0])} for x in SENTENCES for y in SENTENCES]
    train = tmp_path / "pairs.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in rows))
    run = tmp_path / "ft"
    argv = ["finetune", "--model", str(pretrained / "a" / "final"), "--train-file", str(train),
            "--text-column", "a", "--text-pair-column", "b", "--output", str(run), "--steps", "3", *QUIET]
    assert main(argv) == 0
    assert seen and all("token_type_ids" not in k and {"position_ids", "attention_mask"} <= k for k in seen)
    assert "accuracy" in json.loads((run / "test_metrics.json").read_text())
    model = AutoModelForSequenceClassification.from_pretrained(str(run / "final"), local_files_only=True)
    assert isinstance(model, MPNetForSequenceClassification) and model.config.num_labels == 2


def test_finetune_single_sentences_from_scratch_and_resume(pretrained: Path, tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("sentence,label\n" + "".join(f"{s},{i % 2}\n" for i, s in enumerate(SENTENCES * 3)))
    args = ["finetune", "--arch", "bert-relpos", *SIZES, *QUIET, "--seq-len", "24", "--train-file", str(data),
            "--validation-file", str(data), "--steps", "4", "--save-every", "1", "--tokenizer",
            str(pretrained / "tok")]
    assert main([*args, "--output", str(tmp_path / "a")]) == 0
    assert main([*args, "--output", str(tmp_path / "b"), "--stop-after-steps", "2"]) == 0
    assert main([*args, "--output", str(tmp_path / "b"), "--resume"]) == 0
    a, b = (load_file(str(tmp_path / r / "final" / "model.safetensors")) for r in ("a", "b"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    config = json.loads((tmp_path / "a" / "final" / "config.json").read_text())
    assert config["model_type"] == "mpnet" and config["max_position_embeddings"] == 26


def test_finetune_qa_at_the_pretrained_models_own_length(
    pretrained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """QA windows filled to the loaded model's length: 32 tokens (max_position_embeddings 34 less MPNet's
    offset), not 34, which indexed past the position table; a longer --seq-len is refused by name, and so
    is --grad-checkpointing (which MPNet lacks) before training."""
    run = tmp_path / "qa"
    final = str(pretrained / "a" / "final")
    argv = ["finetune", "--task", "qa", "--model", final, "--train-file", str(FIXTURES / "squad_tiny.json"),
            "--output", str(run), "--steps", "2", "--doc-stride", "8", *QUIET]
    with pytest.warns(UserWarning, match="no validation file"):
        assert main(argv) == 0
    test = json.loads((run / "test_metrics.json").read_text())
    assert test["count"] == 9 and 0.0 <= test["exact_match"] <= test["f1"] <= 100.0
    with pytest.raises(ConfigError, match=r"max_position_embeddings=34 .*pass --seq-len 32 or less"):
        FinetuneConfig(task="qa", model=final, seq_len=33).validate()
    assert pipelines._folder_max_len(final, None) == 32
    capsys.readouterr()
    argv = ["finetune", "--task", "qa", "--model", final, "--train-file", str(FIXTURES / "squad_tiny.json"),
            "--output", str(tmp_path / "gc"), "--steps", "1", "--grad-checkpointing", *QUIET]
    with pytest.warns(UserWarning, match="no validation file"):
        assert main(argv) == 2
    pattern = r"error: --grad-checkpointing: .*MPNetForQuestionAnswering \(bert-relpos\)"
    assert re.search(pattern, capsys.readouterr().err)
