"""No flag of ``gmlp pretrain`` / ``gmlp finetune`` is silently ignored.

Each flag, in each context it can be given in, either changes what is built (the model's parameters or its
config: the ``*_HAS_EFFECT`` tables), or is refused up front with a one-line error naming it (the
``*_REFUSED`` tables), or is one of the few whose being ignored is harmless and said in its ``--help``
(:func:`test_harmless_ignored_flags_are_documented_in_the_help`). The refusals were all silently ignored
before the twenty-third session: the other task's options, ``--data`` beside ``--train-file``,
``--validation-file`` / ``--test-file`` without ``--train-file``, column options with the built-in tweets,
and, on ``--resume``, the model and tokenizer options that the resumed run takes from its folder.

As in ``test_text_cli_validation.py``, the data loaders and the accelerator are replaced by a stub that
raises :class:`_Reached`: an accepted command stops there, before any work.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import tempfile
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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

    for module, name in (
        (pipelines, "load_text_splits"), (pipelines, "_make_accelerator"), (pipelines, "_prepare_output"),
        (text_data, "load_text_splits"), (sentiment, "load_classification"), (sentiment, "load_qa"),
    ):  # fmt: skip
        monkeypatch.setattr(module, name, reached)


def _refused(argv: list[str], pattern: str, out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``gmlp ARGV --output OUT`` in-process: exit status 2 and one line ``gmlp COMMAND: error: PATTERN``."""
    capsys.readouterr()
    assert main([*argv, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"^gmlp {argv[0]}: error: {pattern}$", err, re.MULTILINE), err
    assert "Traceback" not in err


def _accepted(argv: list[str], out: Path) -> None:
    with pytest.raises(_Reached):
        main([*argv, "--output", str(out)])


# --- finetune: the task and the data --------------------------------------------------------------------

F = "data.csv"  # (never read: the checks come first)

QA_ONLY = "left out with --task classification"
FINETUNE_REFUSED = [
    # the QA options with --task classification (the default)
    (["--doc-stride", "8"], rf"--doc-stride sets .* {QA_ONLY}, got 8"),
    (["--max-query-length", "32"], rf"--max-query-length sets .* {QA_ONLY}, got 32"),
    (["--max-answer-length", "9"], rf"--max-answer-length sets .* {QA_ONLY}, got 9"),
    (["--n-best", "5"], rf"--n-best sets .* {QA_ONLY}, got 5"),
    (["--null-threshold", "1"], rf"--null-threshold sets .* {QA_ONLY}, got 1.0"),
    # the classification options with --task qa
    (["--task", "qa", "--train-file", F, "--text-column", "q"], r"--text-column sets .* --task qa, got q"),
    (["--task", "qa", "--train-file", F, "--text-pair-column", "h"], r"--text-pair-column sets .*, got h"),
    (["--task", "qa", "--train-file", F, "--label-column", "y"], r"--label-column sets .* --task qa, got y"),
    (["--task", "qa", "--train-file", F, "--num-labels", "2"], r"--num-labels sets .* --task qa, got 2"),
    # --train-file replaces --data; --validation-file / --test-file only go with --train-file
    (["--data", "tweets-binary", "--train-file", F], r"--data and --train-file .*, got --data tweets-bin.*"),
    (["--task", "qa", "--data", "sq", "--train-file", F], r"--data and --train-file .* give one of them.*"),
    (["--validation-file", F], r"--validation-file needs --train-file: .* --data tweets .*, got .* data.csv"),
    (["--data", "d", "--test-file", F], r"--test-file needs --train-file: .* --data d .*, got --test-file.*"),
    (["--task", "qa", "--data", "d", "--validation-file", F], r"--validation-file needs --train-file: .*"),
    # the built-in tweets have their own columns
    (["--text-column", "text"], r"--text-column names a column .* built-in --data tweets .*, got text"),
    (["--data", "tweets-binary", "--label-column", "y"], r"--label-column .* --data tweets-binary .*, got y"),
    (["--data", "tweets", "--text-pair-column", "h"], r"--text-pair-column names a column .*, got h"),
]


@pytest.mark.parametrize(
    ("argv", "pattern"), FINETUNE_REFUSED, ids=[" ".join(c[0]) for c in FINETUNE_REFUSED]
)
def test_finetune_options_the_task_or_data_would_ignore_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], pattern: str
) -> None:
    _refused(["finetune", *argv], pattern, tmp_path / "run", capsys)
    assert not (tmp_path / "run").exists()


FINETUNE_ACCEPTED = [
    ["--task", "qa", "--train-file", F, "--doc-stride", "8", "--max-query-length", "16",
     "--max-answer-length", "9", "--n-best", "5", "--null-threshold", "1"],
    ["--train-file", F, "--validation-file", F, "--test-file", F, "--text-column", "a",
     "--text-pair-column", "b", "--label-column", "c", "--num-labels", "2"],
    ["--data", "folder", "--text-column", "premise", "--label-column", "gold"],
    ["--data", "hf:glue:mnli", "--text-column", "premise", "--text-pair-column", "hypothesis"],
    ["--data", "tweets", "--num-labels", "3"],  # (checked against the data by the loader)
    ["--task", "qa", "--data", "hf:squad_v2", "--null-threshold", "-1"],
]


@pytest.mark.parametrize("argv", FINETUNE_ACCEPTED, ids=lambda v: " ".join(v))
def test_finetune_options_that_apply_are_accepted(tmp_path: Path, argv: list[str]) -> None:
    _accepted(["finetune", *argv], tmp_path / "run")


def test_the_library_config_refuses_them_too() -> None:
    """The checks live in FinetuneConfig.validate (library users get them as ConfigError)."""
    with pytest.raises(ConfigError, match=r"--n-best sets .* --task classification, got 3"):
        pipelines.FinetuneConfig(n_best=3).validate()
    with pytest.raises(ConfigError, match=r"--validation-file needs --train-file"):
        pipelines.FinetuneConfig(data="d.csv", validation_file="v.csv").validate()
    pipelines.FinetuneConfig(task="qa", train_file="t.json", n_best=3).validate()


# --- --resume: the run keeps its model and tokenizer ----------------------------------------------------

SMALL = {"layers": 1, "hidden": 16, "ffn": 32, "seq_len": 16, "vocab_size": 60}


def _fake_run(out: Path, kind: str, *, tokenizer: bool = True, **options: Any) -> Path:
    """A run folder as ``gmlp KIND`` leaves it after a checkpoint (without weights: validation reads only
    the checkpoint's state.json, the run's config.json and tokenizer)."""
    cls = pipelines.PretrainConfig if kind == "pretrain" else pipelines.FinetuneConfig
    opts = pipelines._jsonable(asdict(cls(output=str(out), **options)))
    step = out / "checkpoints" / "step-00000001"
    step.mkdir(parents=True)
    (step / "state.json").write_text(json.dumps({"kind": kind, "step": 1, "options": opts}))
    (out / "checkpoints" / "latest.json").write_text(json.dumps({"tag": step.name, "step": 1}))
    (out / "config.json").write_text("{}")
    if tokenizer:
        (out / "tokenizer").mkdir()
        (out / "tokenizer" / "tokenizer.json").write_text("{}")
    return out


def _args(options: dict[str, Any]) -> list[str]:
    return [a for k, v in options.items() for a in (pipelines._flag(k), str(v))]


#: (command, argv, what the message says after "FLAG has no effect with --resume: ")
RESUME_REFUSED = [
    ("pretrain", ["--layers", "3"],
     r"the run in .* \(started with --layers 1\) keeps its model \(.*config.json and its checkpoint\); "
     r"leave --layers out, got 3"),
    ("pretrain", ["--hidden", "32"], r".*started with --hidden 16.*, got 32"),
    ("pretrain", ["--arch", "bert"], r".*started with --arch gmlp.*, got bert"),
    ("pretrain", ["--sgu-variant", "linear"], r".*keeps its model .*, got linear"),
    ("pretrain", ["--no-toeplitz"], r".*started with --toeplitz.*, got --no-toeplitz"),
    ("pretrain", ["--dropout", "0.2"], r".*started with --dropout 0.0\) keeps its model .*, got 0.2"),
    ("pretrain", ["--model-vocab-size", "99"], r".*started without --model-vocab-size\) keeps its model.*"),
    ("pretrain", ["--vocab-size", "80"],
     r".*started with --vocab-size 60\) keeps its tokenizer \(.*tokenizer\); leave --vocab-size out, got 80"),
    ("pretrain", ["--tokenizer-kind", "unigram"], r".*keeps its tokenizer .*, got unigram"),
    ("pretrain", ["--tokenizer-sample-chars", "9"], r".*keeps its tokenizer .*, got 9"),
    ("pretrain", ["--init-from", "."], r".*started without --init-from\) keeps its model .*, got \."),
    ("finetune", ["--layers", "2"], r".*keeps its model .*, got 2"),
    ("finetune", ["--dropout", "0.3"], r".*started with --dropout 0.1\) keeps its model .*, got 0.3"),
    ("finetune", ["--vocab-size", "70"], r".*keeps its tokenizer .*, got 70"),
]


@pytest.mark.parametrize(
    ("command", "argv", "pattern"), RESUME_REFUSED, ids=[f"{c[0]} {' '.join(c[1])}" for c in RESUME_REFUSED]
)
def test_resume_refuses_the_options_its_run_does_not_apply(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, argv: list[str], pattern: str
) -> None:
    """The resumed run rebuilt its model from OUTPUT/config.json and reused OUTPUT/tokenizer: another
    --layers, --dropout, --vocab-size ... was ignored, while the changed-options warning said the result
    would differ. The run's own values (its command line given again) and left-out flags pass."""
    extra = ["--train-file", F] if command == "finetune" else []
    out = _fake_run(tmp_path / "run", command, **SMALL)
    flag = argv[0]
    pattern = f"{flag} has no effect with --resume: {pattern}"
    _refused([command, *extra, "--resume", *argv], pattern, out, capsys)
    _accepted([command, *extra, "--resume", *_args(SMALL)], out)
    _accepted([command, *extra, "--resume"], out)


def test_resume_applies_what_the_run_does_apply(tmp_path: Path) -> None:
    """finetune --model rebuilds the model from that folder with --dropout; a run without a tokenizer to
    reuse trains one with --vocab-size; no checkpoint: a new run with every flag; --seq-len cuts the data."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text("{}")
    out = _fake_run(tmp_path / "a", "finetune", model=str(model))
    _accepted(["finetune", "--train-file", F, "--resume", "--model", str(model), "--dropout", "0.3"], out)
    _accepted(["finetune", "--train-file", F, "--resume", "--dropout", "0.3"], out)  # its --model, taken back
    out = _fake_run(tmp_path / "b", "pretrain", tokenizer=False, **SMALL)
    _accepted(["pretrain", "--resume", "--vocab-size", "80"], out)
    _accepted(["pretrain", "--resume", "--seq-len", "8"], out)
    _accepted(["pretrain", "--resume", "--layers", "3", "--vocab-size", "80"], tmp_path / "new")
    out = _fake_run(tmp_path / "c", "finetune", **SMALL)  # another kind of run: _prepare_output says so
    _accepted(["pretrain", "--resume", "--layers", "3"], out)


def test_resume_left_out_flags_are_not_changed_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A resumed run given none of the model and tokenizer flags warned that sizes, dropout and tokenizer
    options had changed (layers: 1 -> 4, ...) and the result would differ: it is the run's own model."""
    for kind, cls in (("pretrain", pipelines.PretrainConfig), ("finetune", pipelines.FinetuneConfig)):
        saved = {**SMALL, "dropout": 0.05, "arch": "amlp", "tiny_attn": 4, "tokenizer_kind": "unigram"}
        out = _fake_run(tmp_path / kind, kind, **saved)
        ckpt = out / "checkpoints" / "step-00000001"
        capsys.readouterr()
        pipelines._warn_changed_options(ckpt, cls(output=str(out), resume=True))
        assert "changed options" not in capsys.readouterr().err
        pipelines._warn_changed_options(ckpt, cls(output=str(out), resume=True, lr=0.5, seq_len=8))
        err = capsys.readouterr().err
        assert "lr: " in err and "seq_len: 16 -> 8" in err and "layers" not in err
        # a kept option at its default (left out, or given so: argparse cannot tell) is not silently the
        # run's: a note names what the resumed run keeps (the sizes left out are None: no note for them)
        note = next(line for line in err.splitlines() if "resumed run keeps its own" in line)
        assert all(kept in note for kept in ("--arch amlp", "--dropout 0.05", "--tokenizer-kind unigram"))
        assert "--layers" not in note and "--hidden" not in note


RUN_OPTIONS = st.fixed_dictionaries({
    "arch": st.sampled_from(["gmlp", "amlp", "bert"]),
    "layers": st.integers(1, 6),
    "hidden": st.sampled_from([16, 32, 64]),
    "ffn": st.sampled_from([32, 64, 96]),
    "dropout": st.sampled_from([0.0, 0.05, 0.1, 0.3]),
    "vocab_size": st.integers(40, 200),
    "tokenizer_kind": st.sampled_from(["wordpiece", "unigram"]),
})


@settings(max_examples=10, deadline=None, derandomize=True)
@given(saved=RUN_OPTIONS, changed=st.sampled_from(["layers", "hidden", "ffn", "dropout", "vocab_size"]),
       kind=st.sampled_from(["pretrain", "finetune"]))
def test_resume_accepts_the_runs_own_options_and_refuses_any_other(
    saved: dict[str, Any], changed: str, kind: str
) -> None:
    """For any run: its own options given again (or left out) pass --resume and are no changed options;
    any of them changed is refused by name (it would be ignored)."""
    cls = pipelines.PretrainConfig if kind == "pretrain" else pipelines.FinetuneConfig
    extra = {"train_file": F} if kind == "finetune" else {}
    with tempfile.TemporaryDirectory() as tmp:
        out = _fake_run(Path(tmp) / "run", kind, **saved, **extra)
        cls(output=str(out), resume=True, **saved, **extra).validate()
        cls(output=str(out), resume=True, **extra).validate()
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            ckpt = out / "checkpoints" / "step-00000001"
            pipelines._warn_changed_options(ckpt, cls(output=str(out), resume=True, **extra))
            pipelines._warn_changed_options(ckpt, cls(output=str(out), resume=True, **saved, **extra))
        assert "changed options" not in err.getvalue()
        other = {**saved, changed: saved[changed] + (0.5 if changed == "dropout" else 1)}
        with pytest.raises(ConfigError, match=rf"^--{changed.replace('_', '-')} has no effect with --resume"):
            cls(output=str(out), resume=True, **other, **extra).validate()


def test_tokenizer_sample_chars_with_a_given_tokenizer_warns(capsys: pytest.CaptureFixture[str]) -> None:
    """Like --vocab-size and --tokenizer-kind, --tokenizer-sample-chars only applies to a tokenizer the
    command trains (it was silently ignored with --tokenizer / --init-from)."""
    accelerator = SimpleNamespace(is_main_process=True)
    pipelines._warn_unused_tokenizer_options(
        pipelines.PretrainConfig(tokenizer_sample_chars=9), "--tokenizer", accelerator
    )
    assert "--tokenizer-sample-chars only applies to a tokenizer" in capsys.readouterr().err
    opts = pipelines.PretrainConfig(tokenizer_sample_chars=9, vocab_size=99, tokenizer_kind="unigram")
    pipelines._warn_unused_tokenizer_options(opts, "--init-from", accelerator)
    err = capsys.readouterr().err
    assert "--vocab-size, --tokenizer-kind and --tokenizer-sample-chars only apply" in err
    pipelines._warn_unused_tokenizer_options(pipelines.PretrainConfig(), "--tokenizer", accelerator)
    assert capsys.readouterr().err == ""


# --- the model options that must change the model -------------------------------------------------------

SPECIAL = {"pad": 0, "cls": 1, "sep": 2, "mask": 3}
TINY_MODEL = {"layers": 1, "hidden": 16, "ffn": 32, "seq_len": 8}


def _model_signature(**options: Any) -> tuple[Any, ...]:
    """What a model built from the options is: its parameter shapes, dropout, attention heads and tiny
    attention (after the checks the command makes)."""
    from transformers import AutoModelForMaskedLM

    opts = pipelines.ModelOptions(**options)
    pipelines._validate_model_options(opts, loaded_from=None)
    config = pipelines.build_model_config(opts, vocab_size=40, special_ids=SPECIAL)
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(config)
    shapes = tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())
    named = ("hidden_dropout_prob", "num_attention_heads", "tiny_attn_size")
    return shapes, *(getattr(config, name, None) for name in named)


GATED = ("sgu", "multiplicative", "additive", "linear")
MODEL_HAS_EFFECT = [
    *[({"arch": arch}, change) for arch in pipelines.ARCHS
      for change in ({"layers": 2}, {"hidden": 32}, {"ffn": 64}, {"seq_len": 12}, {"dropout": 0.1})],
    *[({"arch": "bert", "hidden": 32}, {"heads": 2}), ({"arch": "bert-relpos", "hidden": 32}, {"heads": 2})],
    *[({"arch": arch, "sgu_variant": v}, {"toeplitz": False}) for arch in ("gmlp", "amlp") for v in GATED],
    *[({"arch": "gmlp"}, {"sgu_variant": v}) for v in (*GATED[1:], "none", "mixer")],
    ({"arch": "amlp"}, {"tiny_attn": 12}),  # (the default for d_model 16: 8)
    ({"sgu_variant": "mixer"}, {"token_mlp_dim": 4}),
    ({"sgu_variant": "mixer"}, {"seq_len": 12}),
]


@pytest.mark.skipif(not pipelines.gmlp_available(), reason="gmlp.models.text not importable")
@pytest.mark.parametrize(("base", "change"), MODEL_HAS_EFFECT, ids=lambda d: ",".join(f"{k}={v}" for k, v in
                                                                                   d.items()))
def test_model_options_change_the_model(base: dict[str, Any], change: dict[str, Any]) -> None:
    options = {**TINY_MODEL, **base}
    assert _model_signature(**options) != _model_signature(**{**options, **change})


@pytest.mark.skipif(not pipelines.gmlp_available(), reason="gmlp.models.text not importable")
@pytest.mark.parametrize(
    "change",
    [{"sgu_variant": "additive"}, {"toeplitz": False}, {"dropout": 0.2}, {"seq_len": 64},
     {"sgu_variant": "mixer", "token_mlp_dim": 16}],
    ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()),
)
def test_ablation_options_change_a_preset_model(change: dict[str, Any]) -> None:
    """Given with --preset (config only: a preset model is ~100 M parameters)."""
    def config(**kw: Any) -> dict[str, Any]:
        opts = pipelines.ModelOptions(preset="gmlp-ablation", **kw)
        pipelines._validate_model_options(opts, loaded_from=None)
        return pipelines.build_model_config(opts, vocab_size=40, special_ids=SPECIAL).to_dict()

    base, changed = config(), config(**change)
    for name, attr in (("sgu_variant", "sgu_variant"), ("toeplitz", "toeplitz"), ("dropout",
                       "hidden_dropout_prob"), ("seq_len", "max_position_embeddings"),
                       ("token_mlp_dim", "sgu_token_mlp_dim")):
        if name in change:
            assert changed[attr] == change[name] != base[attr]


@pytest.mark.skipif(not pipelines.gmlp_available(), reason="gmlp.models.text not importable")
@pytest.mark.parametrize("variant", ["none", "mixer"])
def test_no_toeplitz_with_a_variant_without_w_is_harmless(variant: str) -> None:
    """--sgu-variant none has no token projection and mixer's token MLP is always full: --no-toeplitz
    builds the very same model (and the --toeplitz help says they ignore it)."""
    options = {**TINY_MODEL, "sgu_variant": variant}
    assert _model_signature(**options) == _model_signature(**options, toeplitz=False)


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_odd_ffn_with_the_sgu_is_refused_before_the_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """The SGU splits d_ffn in halves: an odd --ffn was a GMLPConfig traceback once the tokenizer was
    trained. The other variants take any width, and so does BERT."""
    pattern = r"--ffn must be even with --sgu-variant sgu .*, got 33"
    _refused([command, "--ffn", "33"], pattern, tmp_path / "r", capsys)
    for argv in (["--sgu-variant", "additive"], ["--arch", "bert"]):
        _accepted([command, "--ffn", "33", *argv], tmp_path / "ok")


def test_harmless_ignored_flags_are_documented_in_the_help() -> None:
    """The flags left ignored in some context, each with the help text that says so."""
    sub = next(a for a in build_parser()._actions if a.dest == "command")

    def help_of(command: str, flag: str) -> str:
        action = next(a for a in sub.choices[command]._actions if flag in a.option_strings)
        return " ".join(str(action.help).split())

    for command in ("pretrain", "finetune"):
        assert "--sgu-variant none has no W and mixer's token MLP is always full: both ignore it" in help_of(
            command, "--toeplitz"
        )
        assert "must be left out or repeat the run's values" in help_of(command, "--resume")
    assert help_of("pretrain", "--sparse-prediction").startswith("gMLP/aMLP:")  # BERT's head is dense
    assert "table / HF sources" in help_of("pretrain", "--text-column")  # (plain text has no columns)
    assert "none with --eval-batches 0" in help_of("pretrain", "--eval-every")
    assert "--steps N > 0 replaces it" in help_of("finetune", "--epochs")
    assert help_of("finetune", "--null-threshold").startswith("qa, SQuAD v2:")  # (v1 has no empty answer)
