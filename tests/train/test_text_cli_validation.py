"""``gmlp tokenizer / pretrain / finetune`` refuse bad options up front, with a message naming the flag.

A refused option is a :class:`gmlp.train.recipe.ConfigError`, which the command line reports as argparse
does: ``gmlp COMMAND: error: ...`` on stderr, exit status 2, no traceback. Every check must run before the
run folder, the accelerator, the data or the model exist: the data loaders and the accelerator are
replaced by a stub that raises :class:`_Reached`, so a test whose value is not refused early fails at once
instead of training.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import gmlp.data.sentiment as sentiment
import gmlp.data.text as text_data
from gmlp.cli import build_parser, main
from gmlp.train import text as pipelines
from gmlp.train.recipe import ConfigError


class _Reached(Exception):
    """The command got past option validation (to the data, the accelerator or the run folder)."""


@pytest.fixture(autouse=True)
def _no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    def reached(*args: object, **kwargs: object) -> None:
        raise _Reached

    monkeypatch.setattr(pipelines, "load_text_splits", reached)
    monkeypatch.setattr(pipelines, "_make_accelerator", reached)
    monkeypatch.setattr(pipelines, "_prepare_output", reached)
    monkeypatch.setattr(text_data, "load_text_splits", reached)
    monkeypatch.setattr(sentiment, "load_classification", reached)
    monkeypatch.setattr(sentiment, "load_qa", reached)


def _usage_error(argv: list[str], pattern: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``gmlp ARGV --output RUN`` in-process: exit status 2, a one-line ``gmlp COMMAND: error: ...``
    matching ``pattern``, no traceback, and no run folder."""
    out = tmp_path / "run"
    capsys.readouterr()
    assert main([*argv, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"^gmlp {argv[0]}: error: {pattern}$", err, re.MULTILINE), err
    assert "Traceback" not in err
    assert not out.exists()
    return err


def _refused(
    argv: list[str], flag: str, expected: str, got: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _usage_error(argv, rf"{re.escape(flag)}\b.*{expected}.*got {re.escape(got)}", tmp_path, capsys)


PRETRAIN_BAD = [
    (["--clip-grad", "-1"], "--clip-grad", ">= 0", "-1.0"),
    (["--weight-decay", "-1"], "--weight-decay", ">= 0", "-1.0"),
    (["--lr", "0"], "--lr", "> 0", "0.0"),
    (["--lr", "-1"], "--lr", "> 0", "-1.0"),
    (["--lr", "nan"], "--lr", "> 0", "nan"),
    (["--lr", "inf"], "--lr", "finite", "inf"),  # (infinite values passed, then failed mid-run)
    (["--adam-eps", "inf"], "--adam-eps", "finite", "inf"),
    (["--weight-decay", "inf"], "--weight-decay", "finite", "inf"),
    (["--warmup", "inf"], "--warmup", "finite", "inf"),
    (["--clip-grad", "inf"], "--clip-grad", "finite", "inf"),
    (["--log-every", "0"], "--log-every", ">= 1", "0"),
    (["--save-every", "-1"], "--save-every", ">= 0", "-1"),
    (["--stop-after-steps", "0"], "--stop-after-steps", ">= 1", "0"),
    (["--stop-after-steps", "-1"], "--stop-after-steps", ">= 1", "-1"),
    (["--keep-last", "0"], "--keep-last", ">= 1", "0"),
    (["--batch-size", "0"], "--batch-size", ">= 1", "0"),
    (["--grad-accum", "0"], "--grad-accum", ">= 1", "0"),
    (["--warmup", "-1"], "--warmup", ">= 0", "-1.0"),
    (["--adam-beta1", "2"], "--adam-beta1", r"in \[0, 1\)", "2.0"),
    (["--adam-beta1", "-0.1"], "--adam-beta1", r"in \[0, 1\)", "-0.1"),
    (["--adam-beta2", "1"], "--adam-beta2", r"in \[0, 1\)", "1.0"),
    (["--adam-eps", "0"], "--adam-eps", "> 0", "0.0"),
    (["--adam-eps", "-1"], "--adam-eps", "> 0", "-1.0"),
    (["--vocab-size", "5"], "--vocab-size", "> 5", "5"),
    (["--arch", "amlp", "--tiny-attn", "0"], "--tiny-attn", ">= 1", "0"),
    (["--arch", "gmlp", "--tiny-attn", "0"], "--tiny-attn", ">= 1", "0"),
    (["--arch", "amlp", "--tiny-attn", "-8"], "--tiny-attn", ">= 1", "-8"),
    (["--arch", "bert", "--heads", "0"], "--heads", ">= 1", "0"),
    (["--arch", "bert", "--sgu-variant", "linear"], "--sgu-variant", "left out with --arch bert", "linear"),
    (["--arch", "bert", "--no-toeplitz"], "--no-toeplitz", "out with --arch bert", "--no-toeplitz"),
    (["--arch", "bert-relpos", "--no-toeplitz"], "--no-toeplitz", "--arch bert-relpos", "--no-toeplitz"),
    (["--arch", "bert", "--heads", "-2"], "--heads", ">= 1", "-2"),
    (["--arch", "bert", "--heads", "3"], "--heads", "divide --hidden 128", "3"),
    (["--layers", "0"], "--layers", ">= 1", "0"),
    (["--hidden", "0"], "--hidden", ">= 1", "0"),
    (["--ffn", "-1"], "--ffn", ">= 1", "-1"),
    (["--seq-len", "2"], "--seq-len", ">= 3", "2"),
    (["--dropout", "1"], "--dropout", r"in \[0, 1\)", "1.0"),
    (["--dropout", "-0.1"], "--dropout", r"in \[0, 1\)", "-0.1"),
    (["--model-vocab-size", "0"], "--model-vocab-size", ">= 1", "0"),
    (["--max-chars", "-1"], "--max-chars", ">= 1", "-1"),
    (["--max-chars", "0"], "--max-chars", ">= 1", "0"),
    (["--max-documents", "0"], "--max-documents", ">= 1", "0"),
    (["--valid-fraction", "1"], "--valid-fraction", r"in \[0, 1\)", "1.0"),
    (["--steps", "0"], "--steps", ">= 1", "0"),
    (["--steps", "-5"], "--steps", ">= 1", "-5"),
    (["--mlm-probability", "0"], "--mlm-probability", r"in \(0, 1\)", "0.0"),
    (["--mlm-probability", "1.5"], "--mlm-probability", r"in \(0, 1\)", "1.5"),
    (["--eval-every", "-1"], "--eval-every", ">= 0", "-1"),
    (["--eval-batches", "-1"], "--eval-batches", ">= 0", "-1"),
    (["--tokenizer-sample-chars", "0"], "--tokenizer-sample-chars", ">= 1", "0"),
]


FINETUNE_BAD = [
    (["--steps", "-1"], "--steps", ">= 0", "-1"),
    (["--epochs", "0"], "--epochs", "> 0", "0.0"),
    (["--epochs", "-1"], "--epochs", "> 0", "-1.0"),
    (["--max-train-examples", "0"], "--max-train-examples", ">= 1", "0"),
    (["--max-train-examples", "-3"], "--max-train-examples", ">= 1", "-3"),
    (["--max-eval-examples", "0"], "--max-eval-examples", ">= 1", "0"),
    (["--max-eval-examples", "-3"], "--max-eval-examples", ">= 1", "-3"),
    (["--eval-batch-size", "0"], "--eval-batch-size", ">= 1", "0"),
    (["--num-labels", "0"], "--num-labels", ">= 1", "0"),
    (["--doc-stride", "-1"], "--doc-stride", ">= 0", "-1"),
    (["--max-query-length", "0"], "--max-query-length", ">= 1", "0"),
    (["--max-answer-length", "0"], "--max-answer-length", ">= 1", "0"),
    (["--n-best", "0"], "--n-best", ">= 1", "0"),
    (["--clip-grad", "-1"], "--clip-grad", ">= 0", "-1.0"),
    (["--weight-decay", "-0.5"], "--weight-decay", ">= 0", "-0.5"),
    (["--lr", "0"], "--lr", "> 0", "0.0"),
    (["--adam-beta2", "1.5"], "--adam-beta2", r"in \[0, 1\)", "1.5"),
    (["--adam-eps", "0"], "--adam-eps", "> 0", "0.0"),
    (["--log-every", "0"], "--log-every", ">= 1", "0"),
    (["--save-every", "-1"], "--save-every", ">= 0", "-1"),
    (["--stop-after-steps", "0"], "--stop-after-steps", ">= 1", "0"),
    (["--dropout", "1.5"], "--dropout", r"in \[0, 1\)", "1.5"),
    (["--arch", "bert", "--heads", "0"], "--heads", ">= 1", "0"),
    (["--arch", "bert", "--sgu-variant", "linear"], "--sgu-variant", "left out with --arch bert", "linear"),
    (["--arch", "bert", "--no-toeplitz"], "--no-toeplitz", "out with --arch bert", "--no-toeplitz"),
    (["--arch", "amlp", "--tiny-attn", "0"], "--tiny-attn", ">= 1", "0"),
]


TOKENIZER_BAD = [
    (["--min-frequency", "-1"], "--min-frequency", ">= 0", "-1"),
    (["--kind", "unigram", "--min-frequency", "5"], "--min-frequency", "out with --kind unigram", "5"),
    (["--model-max-length", "0"], "--model-max-length", ">= 1", "0"),
    (["--vocab-size", "3"], "--vocab-size", "> 5", "3"),
    (["--max-chars", "0"], "--max-chars", ">= 1", "0"),
    (["--max-documents", "-1"], "--max-documents", ">= 1", "-1"),
    (["--valid-fraction", "-0.1"], "--valid-fraction", r"in \[0, 1\)", "-0.1"),
]


COMMANDS_BAD = (("pretrain", PRETRAIN_BAD), ("finetune", FINETUNE_BAD), ("tokenizer", TOKENIZER_BAD))
BAD = [(command, *case) for command, cases in COMMANDS_BAD for case in cases]


@pytest.mark.parametrize(
    ("command", "argv", "flag", "expected", "got"), BAD, ids=[f"{c[0]} {' '.join(c[1])}" for c in BAD]
)
def test_bad_options_are_refused(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    argv: list[str],
    flag: str,
    expected: str,
    got: str,
) -> None:
    _refused([command, *argv], flag, expected, got, tmp_path, capsys)


@pytest.mark.parametrize(
    "argv",
    [
        ["pretrain", "--arch", "gmlp", "--heads", "4"],
        ["pretrain", "--arch", "bert", "--tiny-attn", "16"],
        ["finetune", "--arch", "amlp", "--heads", "2"],
    ],
    ids=lambda v: " ".join(v),
)
def test_architecture_options_of_another_arch_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """--heads is BERT's, --tiny-attn aMLP's: given with another --arch they were silently ignored."""
    flag = "--heads" if "--heads" in argv else "--tiny-attn"
    _usage_error(argv, rf"{flag} .*--arch.*", tmp_path, capsys)


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["--arch", "amlp", "--sgu-variant", "mixer"], r"--arch amlp .* --sgu-variant mixer has no gate.*"),
        (["--arch", "amlp", "--sgu-variant", "none"], r"--arch amlp .* --sgu-variant none has no gate.*"),
        (["--token-mlp-dim", "8"], r"--token-mlp-dim .* needs --arch gmlp and --sgu-variant mixer.*"),
    ],
)
def test_cli_refuses_mixer_misuse_before_the_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], pattern: str
) -> None:
    _usage_error(["pretrain", *argv], pattern, tmp_path, capsys)


def test_cli_accepts_the_mixer_variant(tmp_path: Path) -> None:
    with pytest.raises(_Reached):  # past the option checks, to the data
        main(["pretrain", "--sgu-variant", "mixer", "--token-mlp-dim", "8", "--output", str(tmp_path / "r")])


def test_unknown_preset_is_refused_before_the_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not pipelines.gmlp_available():
        pytest.skip("gmlp.models.text not importable")
    pattern = r"--preset: unknown preset 'gmlp-huge'; known: .*gmlp-base.*"
    _usage_error(["pretrain", "--preset", "gmlp-huge"], pattern, tmp_path, capsys)


def test_missing_init_from_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "nonexistent")
    pattern = rf"--init-from {re.escape(repr(missing))}: no such directory .*"
    _usage_error(["pretrain", "--init-from", missing], pattern, tmp_path, capsys)
    _usage_error(
        ["pretrain", "--init-from", "/nonexistent"],
        "--init-from '/nonexistent': no such directory .*",
        tmp_path,
        capsys,
    )
    (tmp_path / "empty").mkdir()
    pattern = r"--init-from .*empty' holds no config.json .*"
    _usage_error(["pretrain", "--init-from", str(tmp_path / "empty")], pattern, tmp_path, capsys)


def test_missing_model_and_tokenizer_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "nonexistent")
    _usage_error(
        ["finetune", "--model", missing], r"--model .*nonexistent': no such directory .*", tmp_path, capsys
    )
    (tmp_path / "empty").mkdir()
    pattern = r"--model .*empty' holds no config.json .*"
    _usage_error(["finetune", "--model", str(tmp_path / "empty")], pattern, tmp_path, capsys)
    for command in ("pretrain", "finetune"):
        pattern = r"--tokenizer .*nonexistent': no such directory .*"
        _usage_error([command, "--tokenizer", missing], pattern, tmp_path, capsys)
        pattern = r"--tokenizer .*empty' holds no tokenizer .*"
        _usage_error([command, "--tokenizer", str(tmp_path / "empty")], pattern, tmp_path, capsys)


@pytest.mark.parametrize(
    "argv",
    [
        ["pretrain", "--clip-grad", "0", "--save-every", "0", "--eval-every", "0", "--eval-batches", "0"],
        ["pretrain", "--weight-decay", "0", "--warmup", "0", "--adam-beta1", "0", "--valid-fraction", "0"],
        ["pretrain", "--arch", "amlp", "--tiny-attn", "16", "--max-chars", "1", "--max-documents", "1"],
        ["pretrain", "--arch", "bert", "--heads", "4", "--hidden", "64"],
        ["finetune", "--steps", "0", "--epochs", "0.5", "--clip-grad", "0"],
        ["finetune", "--task", "qa", "--train-file", "t.json", "--doc-stride", "0"],  # (a QA option)
        ["finetune", "--max-train-examples", "1", "--max-eval-examples", "1", "--eval-batch-size", "1"],
        ["tokenizer", "--min-frequency", "0", "--model-max-length", "1", "--vocab-size", "6"],
    ],
    ids=lambda v: " ".join(v),
)
def test_boundary_values_are_accepted(tmp_path: Path, argv: list[str]) -> None:
    """The smallest meaningful values pass validation (and reach the data / accelerator stub)."""
    with pytest.raises(_Reached):
        main([*argv, "--output", str(tmp_path / "run")])


def test_help_says_what_zero_means() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    finetune_help = sub.choices["finetune"].format_help()
    assert re.search(r"--steps STEPS\s+optimizer steps.*0 .*--epochs", " ".join(finetune_help.split()))
    pretrain_help = " ".join(sub.choices["pretrain"].format_help().split())
    assert "--clip-grad CLIP_GRAD gradient-norm clip, 0 = off" in pretrain_help
    assert re.search(r"--eval-every EVAL_EVERY .*0 = only at the end", pretrain_help)


def test_config_validate_is_public(tmp_path: Path) -> None:
    """Library users get the same checks (flags named as on the command line) as ConfigError, a ValueError;
    a missing folder is a FileNotFoundError too."""
    with pytest.raises(ConfigError, match="--lr must be > 0 and finite, got 0"):
        pipelines.PretrainConfig(lr=0).validate()
    with pytest.raises(ValueError, match=r"--epochs must be > 0.*, got -1"):
        pipelines.FinetuneConfig(epochs=-1).validate()
    with pytest.raises(FileNotFoundError, match="--model .*: no such directory"):
        pipelines.FinetuneConfig(model=str(tmp_path / "nonexistent")).validate()
    with pytest.raises(ConfigError, match="--max-chars must be >= 1"):
        pipelines.pretrain(pipelines.PretrainConfig(max_chars=0, output=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()
    pipelines.PretrainConfig().validate()
    pipelines.FinetuneConfig().validate()


LOADED_ARCH_FLAGS = [
    ["--arch", "amlp"],
    ["--layers", "5"],
    ["--hidden", "64"],
    ["--ffn", "256"],
    ["--tiny-attn", "16"],
    ["--preset", "gmlp-base"],
    ["--sgu-variant", "additive"],
    ["--no-toeplitz"],
    ["--heads", "2"],
    ["--model-vocab-size", "300"],
]


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    """A folder that passes the --model / --init-from checks (config.json and a tokenizer file)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    return folder


@pytest.mark.parametrize("command", ["finetune --model", "pretrain --init-from"])
@pytest.mark.parametrize("flags", LOADED_ARCH_FLAGS, ids=lambda v: " ".join(v))
def test_architecture_flags_are_refused_with_a_loaded_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model_folder: Path, command: str, flags: list[str]
) -> None:
    """The model loaded from --model / --init-from keeps its config.json: the flags were silently ignored."""
    name, flag = command.split()
    argv = [name, flag, str(model_folder), *flags]
    _usage_error(argv, rf"{flags[0]} has no effect when the model is loaded from {flag} .*", tmp_path, capsys)


def test_options_that_apply_to_a_loaded_model_are_accepted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model_folder: Path
) -> None:
    for argv in (
        ["finetune", "--model", str(model_folder), "--dropout", "0.3", "--seq-len", "64"],
        ["pretrain", "--init-from", str(model_folder), "--seq-len", "64", "--vocab-size", "99"],
    ):
        with pytest.raises(_Reached):
            main([*argv, "--output", str(tmp_path / "run")])
    # pretraining keeps the loaded model's dropout: --dropout would be ignored there
    argv = ["pretrain", "--init-from", str(model_folder), "--dropout", "0.1"]
    pattern = r"--dropout has no effect when the model is loaded from --init-from .*"
    _usage_error(argv, pattern, tmp_path, capsys)


def test_init_from_without_a_tokenizer_needs_tokenizer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model_folder: Path
) -> None:
    """--init-from continues with the model's own tokenizer; a folder without one needs --tokenizer."""
    (model_folder / "tokenizer.json").unlink()
    pattern = r"--init-from .*model' holds no tokenizer: pass --tokenizer .*"
    _usage_error(["pretrain", "--init-from", str(model_folder)], pattern, tmp_path, capsys)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    argv = ["pretrain", "--init-from", str(model_folder), "--tokenizer", str(tok)]
    with pytest.raises(_Reached):
        main([*argv, "--output", str(tmp_path / "r")])


def test_qa_doc_stride_that_leaves_no_context_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checked with the other options (it was a traceback after the tokenizer had been trained and saved)."""
    argv = ["finetune", "--task", "qa", "--train-file", str(tmp_path / "train.json"), "--doc-stride", "70"]
    pattern = r"--doc-stride 70 is too large for --seq-len 128 \(question up to 64 tokens.*below 61"
    _usage_error(argv, pattern, tmp_path, capsys)
    with pytest.raises(_Reached):  # one below the limit
        main([*argv[:-1], "60", "--output", str(tmp_path / "ok")])


def test_seq_len_beyond_a_loaded_model_is_refused() -> None:
    """A gMLP's W covers max_position_embeddings tokens: a longer --seq-len was silently cut to it."""
    from types import SimpleNamespace

    config = SimpleNamespace(max_position_embeddings=128)
    assert pipelines._max_len(config, 128) == 128 and pipelines._max_len(config, 64) == 64
    with pytest.raises(ConfigError, match=r"--seq-len 384 is longer than the model's max_position_emb"):
        pipelines._max_len(config, 384)
    assert pipelines._max_len(config, None) == 128  # --seq-len left out: the model's own length
    assert pipelines.seq_len_of_new_model(pipelines.PretrainConfig()) == pipelines.NEW_MODEL_SEQ_LEN == 128


def test_an_unusable_corpus_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """TextDataError (an empty or undecodable corpus, ...): one line and exit status 2, no traceback."""

    def unusable(*args: object, **kwargs: object) -> None:
        raise text_data.TextDataError("corpus 'empty.txt' holds no text")

    monkeypatch.setattr(pipelines, "pretrain", unusable)  # where reading the corpus fails
    capsys.readouterr()
    assert main(["pretrain", "--corpus", str(tmp_path / "empty.txt"), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "gmlp pretrain: error: corpus 'empty.txt' holds no text" in err and "Traceback" not in err


def test_resume_without_seq_len_is_not_a_changed_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--seq-len left out means the resumed model's own length: no "changed options" warning against a run
    saved with an explicit length (or the old default, 128); a different explicit length still warns."""
    import json

    state = {"options": {**pipelines._jsonable(vars(pipelines.PretrainConfig())), "seq_len": 128}}
    (tmp_path / "state.json").write_text(json.dumps(state))
    pipelines._warn_changed_options(tmp_path, pipelines.PretrainConfig())
    assert "changed options" not in capsys.readouterr().err
    pipelines._warn_changed_options(tmp_path, pipelines.PretrainConfig(seq_len=64))
    assert "seq_len: 128 -> 64" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["--preset", "gmlp-base", "--layers", "5"], r"--preset gmlp-base sets the .* leave --layers out .*"),
        (["--preset", "amlp-base", "--hidden", "64", "--ffn", "256"], r".* leave --hidden, --ffn out .*"),
        (["--preset", "gmlp-ablation", "--arch", "amlp"], r"--arch amlp: --preset gmlp-ablation has no .*"),
        (["--preset", "gmlp-ablation", "--tiny-attn", "64"], r"--tiny-attn makes an aMLP: use --arch amlp"),
        # a size equal to the built-in default is still a size given (it was taken for "left out")
        (["--preset", "gmlp-ablation", "--layers", "4"], r".* leave --layers out .*"),
        (["--preset", "amlp-base", "--hidden", "128", "--ffn", "768"], r".* leave --hidden, --ffn out .*"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_options_that_contradict_a_preset_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], pattern: str
) -> None:
    """A preset fixes the model's size; the options above were silently ignored with one."""
    if not pipelines.gmlp_available():
        pytest.skip("gmlp.models.text not importable")
    _usage_error(["pretrain", *argv], pattern, tmp_path, capsys)


def test_preset_keeps_the_ablation_options() -> None:
    """--sgu-variant / --no-toeplitz / --tiny-attn apply to a preset model (Table 3's ablations use the
    gmlp-ablation size); before, the preset's defaults silently replaced them."""
    if not pipelines.gmlp_available():
        pytest.skip("gmlp.models.text not importable")
    special = {"pad": 0, "cls": 1, "sep": 2, "mask": 3}

    def build(**kw: object) -> object:
        opts = pipelines.ModelOptions(**kw)
        pipelines._validate_model_options(opts, loaded_from=None)
        return pipelines.build_model_config(opts, vocab_size=100, special_ids=special)

    config = build(preset="gmlp-ablation", sgu_variant="additive", toeplitz=False)
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (36, 512, 3072)
    assert config.sgu_variant == "additive" and config.toeplitz is False and config.tiny_attn_size is None
    aMLP = build(preset="gmlp-ablation", arch="amlp", tiny_attn=64)
    assert aMLP.tiny_attn_size == 64 and aMLP.num_hidden_layers == 36
    assert build(preset="amlp-base").tiny_attn_size == 64
    assert build(preset="amlp-large", arch="amlp", tiny_attn=32).tiny_attn_size == 32


def test_sizes_left_out_are_the_defaults_and_not_changed_options_on_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--layers/--hidden/--ffn left out are 4/128/768 for a model without a preset; a run saved before they
    defaulted to None (with 4/128/768 written out) resumes without a "changed options" warning."""
    import json

    if not pipelines.gmlp_available():
        pytest.skip("gmlp.models.text not importable")
    special = {"pad": 0, "cls": 1, "sep": 2, "mask": 3}
    config = pipelines.build_model_config(pipelines.ModelOptions(), vocab_size=50, special_ids=special)
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (4, 128, 768)
    state = {"options": {**pipelines._jsonable(vars(pipelines.PretrainConfig())), "layers": 4, "hidden": 128,
                         "ffn": 768}}  # fmt: skip
    (tmp_path / "state.json").write_text(json.dumps(state))
    pipelines._warn_changed_options(tmp_path, pipelines.PretrainConfig())
    assert "changed options" not in capsys.readouterr().err
    pipelines._warn_changed_options(tmp_path, pipelines.PretrainConfig(layers=6))
    assert "layers: 4 -> 6" in capsys.readouterr().err
    # a --preset run saved them too (they were ignored): its resume is no change either
    preset = {**state["options"], "preset": "gmlp-ablation"}
    (tmp_path / "state.json").write_text(json.dumps({"options": preset}))
    pipelines._warn_changed_options(tmp_path, pipelines.PretrainConfig(preset="gmlp-ablation"))
    assert "changed options" not in capsys.readouterr().err
