"""The text user journey as docs/text_training.md tells it (twenty-first session's audit; each test failed
before its fix): a resumed run reuses its own tokenizer and model when the flags that named them are left
out, ``--seq-len`` beyond a loaded model's length is refused before anything is read or written, and a
table corpus without the text column names the file."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from text_corpus import SENTENCES, corpus_and_tokenizer

from gmlp.data.text import TextDataError, load_text_splits
from gmlp.train import text as pipelines
from gmlp.train.checkpoint import latest_checkpoint
from gmlp.train.recipe import ConfigError
from gmlp.train.text import FinetuneConfig, PretrainConfig, finetune, pretrain

TINY = dict(layers=2, hidden=32, ffn=64, seq_len=32, batch_size=4, progress=False)
ARCH = "gmlp" if pipelines.gmlp_available() else "bert"
needs_gmlp = pytest.mark.skipif(not pipelines.gmlp_available(), reason="gmlp.models.text does not import")


@pytest.fixture
def corpus_and_tok(tmp_path: Path) -> tuple[Path, Path]:
    return corpus_and_tokenizer(tmp_path)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def _pretrained_folder(tmp_path: Path, tok: Path) -> Path:
    """A tiny gMLP MLM saved with its tokenizer, as ``gmlp pretrain`` leaves ``final/``."""
    from transformers import AutoTokenizer

    from gmlp.models.text import GMLPConfig, GMLPForMaskedLM

    folder = tmp_path / "pretrained"
    torch.manual_seed(0)
    config = GMLPConfig(
        vocab_size=160, hidden_size=16, intermediate_size=32, num_hidden_layers=1, max_position_embeddings=32
    )
    GMLPForMaskedLM(config).save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(tok)).save_pretrained(str(folder))
    return folder


def _pairs_csv(path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", "label"])
        for k in range(24):
            writer.writerow([SENTENCES[k % len(SENTENCES)], ("no", "yes")[k % 2]])
    return path


def test_pretrain_resume_without_tokenizer_flag_reuses_the_runs_tokenizer(
    tmp_path: Path, corpus_and_tok: tuple[Path, Path]
) -> None:
    """A run started with --tokenizer DIR and resumed as the docs show (``gmlp pretrain --output OUT
    --resume``, no --tokenizer) continues with DIR ("a resumed run always reuses its own"): it trained a
    new tokenizer instead, whose other ids the restored model was then trained on (or a vocab error)."""
    corpus, tok = corpus_and_tok
    opts = dict(TINY, arch=ARCH, steps=2, log_every=1, save_every=0, eval_every=0, valid_fraction=0.2)
    full, run = tmp_path / "full", tmp_path / "run"
    pretrain(PretrainConfig(output=str(full), corpus=[str(corpus)], tokenizer=str(tok), **opts))
    pretrain(
        PretrainConfig(output=str(run), corpus=[str(corpus)], tokenizer=str(tok), stop_after_steps=1, **opts)
    )
    result = pretrain(PretrainConfig(output=str(run), corpus=[str(corpus)], resume=True, **opts))
    assert result["completed"] and not (run / "tokenizer").exists()
    saved = json.loads((tok / "tokenizer.json").read_text())["model"]["vocab"]
    assert json.loads((run / "final" / "tokenizer.json").read_text())["model"]["vocab"] == saved
    a, b = _weights(full), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    options = json.loads((latest_checkpoint(run) / "state.json").read_text())["options"]
    assert options["tokenizer"] == str(tok)


@needs_gmlp
def test_finetune_resume_without_model_flag_continues_the_runs_model(
    tmp_path: Path, corpus_and_tok: tuple[Path, Path]
) -> None:
    """``gmlp finetune --model DIR`` stopped and resumed without --model continues DIR's model with DIR's
    tokenizer, as an uninterrupted run: it trained a tokenizer on the task's texts and built a default
    model from scratch instead (a size-mismatch traceback, or with matching sizes other token ids)."""
    _, tok = corpus_and_tok
    model = _pretrained_folder(tmp_path, tok)
    data = _pairs_csv(tmp_path / "train.csv")
    opts = dict(train_file=str(data), batch_size=4, steps=3, progress=False, log_every=1)
    full, run = tmp_path / "full", tmp_path / "run"
    finetune(FinetuneConfig(output=str(full), model=str(model), **opts))
    finetune(FinetuneConfig(output=str(run), model=str(model), stop_after_steps=1, **opts))
    result = finetune(FinetuneConfig(output=str(run), resume=True, **opts))
    assert result["completed"] and not (run / "tokenizer").exists()
    a, b = _weights(full), _weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((run / "final" / "config.json").read_text())["hidden_size"] == 16


def test_finetune_resume_from_scratch_reads_the_runs_config(
    tmp_path: Path, corpus_and_tok: tuple[Path, Path]
) -> None:
    """A finetuning run of a model built from scratch (--layers/--hidden/...) resumes from its own
    config.json, as pretraining does, when the size flags are left out: it built the default 4 x 128 model
    and failed to load the checkpoint into it."""
    _, tok = corpus_and_tok
    data = _pairs_csv(tmp_path / "train.csv")
    opts = dict(train_file=str(data), steps=3, log_every=1, tokenizer=str(tok))
    run = tmp_path / "run"
    finetune(FinetuneConfig(output=str(run), arch=ARCH, stop_after_steps=1, **TINY, **opts))
    resumed = FinetuneConfig(output=str(run), arch=ARCH, resume=True, batch_size=4, progress=False, **opts)
    result = finetune(resumed)
    assert result["completed"]
    assert json.loads((run / "final" / "config.json").read_text())["hidden_size"] == 32


def test_resume_refuses_a_tokenizer_folder_that_is_gone(
    tmp_path: Path, corpus_and_tok: tuple[Path, Path]
) -> None:
    """The run's --tokenizer folder was removed: the resume names the flag instead of training anew."""
    import shutil

    corpus, tok = corpus_and_tok
    opts = dict(TINY, arch=ARCH, steps=2, save_every=0, eval_every=0, valid_fraction=0.2)
    run = tmp_path / "run"
    pretrain(
        PretrainConfig(output=str(run), corpus=[str(corpus)], tokenizer=str(tok), stop_after_steps=1, **opts)
    )
    shutil.rmtree(tok)
    with pytest.raises(ConfigError, match="--tokenizer"):
        pretrain(PretrainConfig(output=str(run), corpus=[str(corpus)], resume=True, **opts))
    assert not (run / "tokenizer").exists()


@needs_gmlp
@pytest.mark.parametrize("command", ["finetune", "pretrain"])
def test_seq_len_beyond_a_loaded_model_is_refused_by_validate(
    tmp_path: Path, corpus_and_tok: tuple[Path, Path], command: str
) -> None:
    """The docs: every option is checked before anything is read or written. --seq-len 64 with a model of
    32 positions was refused only after the data, the tokenizer and the weights were read (and the output
    folder created); so was a --doc-stride too large for the loaded model's window."""
    corpus, tok = corpus_and_tok
    model = _pretrained_folder(tmp_path, tok)
    out = tmp_path / "out"
    if command == "finetune":
        cfg = FinetuneConfig(output=str(out), model=str(model), seq_len=64, progress=False)
        stride = FinetuneConfig(output=str(out), model=str(model), task="qa", doc_stride=20)
        with pytest.raises(ConfigError, match="--doc-stride 20"):
            stride.validate()
        FinetuneConfig(output=str(out), model=str(model), seq_len=32).validate()  # the model's own: fine
    else:
        cfg = PretrainConfig(output=str(out), corpus=[str(corpus)], init_from=str(model), seq_len=64)
    with pytest.raises(
        ConfigError, match="--seq-len 64 is longer than the model's max_position_embeddings=32"
    ):
        cfg.validate()
    with pytest.raises(ConfigError, match="--seq-len 64"):
        (finetune if command == "finetune" else pretrain)(cfg)
    assert not out.exists()


def test_table_corpus_without_the_text_column_names_the_file(tmp_path: Path) -> None:
    """The docs: missing columns fail with the file named (the available ones listed); the error named
    the builder ('csv') only, so with several table sources the user could not tell which one."""
    table = tmp_path / "notes.csv"
    table.write_text("body,x\nsome text,1\nmore text,2\n")
    with pytest.raises(TextDataError, match=r"notes\.csv.*no column 'text'.*body, x"):
        load_text_splits([str(table)])


def test_eval_batches_zero_says_so(
    tmp_path: Path, corpus_and_tok: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """``--eval-batches 0`` (the documented switch) was reported as "no held-out blocks", which sends a
    user looking for a problem with the corpus's split."""
    corpus, tok = corpus_and_tok
    opts = dict(TINY, arch=ARCH, steps=1, save_every=0, eval_batches=0, valid_fraction=0.2)
    pretrain(PretrainConfig(output=str(tmp_path / "run"), corpus=[str(corpus)], tokenizer=str(tok), **opts))
    err = capsys.readouterr().err
    assert "--eval-batches 0: validation perplexity is skipped" in err and "no held-out blocks" not in err


def test_the_run_banner_names_amlp_for_a_gmlp_config_with_tiny_attention() -> None:
    """``[gmlp] pretrain amlp: ...``, not the HF model type "gmlp" that aMLP shares with gMLP."""
    from transformers import BertConfig

    from gmlp.models.text import GMLPConfig

    assert pipelines._arch_name(GMLPConfig(tiny_attn_size=8)) == "amlp"
    assert pipelines._arch_name(GMLPConfig()) == "gmlp"
    assert pipelines._arch_name(BertConfig()) == "bert"
