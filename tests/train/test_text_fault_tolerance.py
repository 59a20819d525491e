"""Text training under faults: a real SIGKILL mid-run resumes to the uninterrupted result; a save cut short
at any file-system step never leaves a partial ``final/``, ``config.json`` or tokenizer, nor a run that
``--overwrite`` cannot discard; a full disk or a read-only folder is a one-line error; SIGTERM stops with a
checkpoint and says how to continue (twenty-second session: each test but the SIGKILL one failed before its
fix)."""

from __future__ import annotations

import errno
import io
import itertools
import json
import os
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from text_corpus import documents, write_corpus
from torchrun_helpers import sigkill_after_checkpoint

import gmlp.train.checkpoint as checkpoint
from gmlp.cli import main
from gmlp.train import text as pipelines
from gmlp.train.checkpoint import latest_checkpoint, load_checkpoint
from gmlp.train.tokenizer import load_tokenizer, train_tokenizer

ARCH = "gmlp" if pipelines.gmlp_available() else "bert"
TINY = ["--arch", ARCH, "--layers", "2", "--hidden", "32", "--ffn", "64", "--seq-len", "32",
        "--batch-size", "4", "--no-progress"]
VOLATILE = {"steps_per_s", "tokens_per_s"}  # timings: the only fields a resumed run may log otherwise


class Crash(BaseException):
    """The process dying here (a BaseException: no ``except OSError`` or ``ignore_errors`` stops it)."""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("inputs")
    tok = root / "tok"  # one tokenizer for every run (WordPiece ties: huggingface/tokenizers#1794)
    train_tokenizer(documents(), vocab_size=150, model_max_length=32).save_pretrained(str(tok))
    return write_corpus(root / "corpus.txt"), tok


def _args(inputs: tuple[Path, Path], out: Path, steps: int = 6, save_every: int = 2) -> list[str]:
    corpus, tok = inputs
    return ["pretrain", "--corpus", str(corpus), "--tokenizer", str(tok), *TINY, "--steps", str(steps),
            "--save-every", str(save_every), "--eval-every", "3", "--eval-batches", "1", "--log-every", "2",
            "--valid-fraction", "0.2", "--dropout", "0.1", "--output", str(out)]


@pytest.fixture(scope="module")
def reference(inputs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run of :func:`_args`."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(_args(inputs, run)) == 0
    return run


def _records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in VOLATILE} for x in lines]


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _assert_same_run(run: Path, reference: Path) -> None:
    a, b = (load_file(str(r / "final" / "model.safetensors")) for r in (run, reference))
    assert _same_weights(a, b)
    assert _records(run) == _records(reference)
    assert not [str(p) for p in run.rglob(".*")]  # no temporaries left behind


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _cut_short(m: pytest.MonkeyPatch, k: int) -> None:
    """Raise :class:`Crash` instead of the ``k``-th (from 0) file-system change: rename, replace, unlink,
    rmdir (what ``shutil.rmtree`` and the atomic writers are made of)."""
    calls = itertools.count()

    def crash_at_k(*a: Any) -> None:
        if next(calls) == k:
            raise Crash

    for name in ("replace", "rename", "unlink", "remove", "rmdir"):
        m.setattr(os, name, _before(getattr(os, name), crash_at_k))


def _before(real: Any, check: Any) -> Any:
    """``real`` that calls ``check(*args)`` first."""

    def call(*a: Any, **kw: Any) -> Any:
        check(*a)
        return real(*a, **kw)

    return call


class _Accelerator:
    """What ``_save_final`` and ``_prepare_output`` use of an ``accelerate.Accelerator`` (one process)."""

    is_main_process = True

    def get_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return model.state_dict()

    def unwrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def wait_for_everyone(self) -> None:
        pass


@pytest.mark.slow  # (a process of its own: ~10 s on a quiet 2-core machine, 30 s on a loaded one)
def test_sigkill_mid_run_then_resume_equals_uninterrupted(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    """A resumed ``gmlp pretrain`` process SIGKILLed mid-run (it rewrote config.json at its start, and may
    be killed inside a checkpoint save: --save-every 3) resumes again to the uninterrupted run's weights and
    metrics.jsonl rows, with no temporaries left."""
    run, straight = tmp_path / "killed", tmp_path / "straight"
    args = lambda out: _args(inputs, out, steps=1000, save_every=3)  # noqa: E731  (still running when killed)
    assert main([*args(run), "--stop-after-steps", "2"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    sigkill_after_checkpoint([*args(run), "--resume"], run, 5, env, poll=0.005)
    step = load_checkpoint(run).state["step"]
    stop = step + 5  # past the checkpoint, between two --log-every records
    assert main([*args(run), "--resume", "--stop-after-steps", str(stop - step)]) == 0
    assert main([*args(straight), "--stop-after-steps", str(stop)]) == 0
    assert load_checkpoint(run).state["step"] == stop
    assert _same_weights(load_checkpoint(run).model, load_checkpoint(straight).model)
    assert _records(run) == _records(straight)
    assert [r["step"] for r in _records(run) if r["split"] == "train"] == list(range(2, stop + 1, 2))
    assert not [str(p) for p in run.rglob(".*")]


def test_a_resume_cut_short_while_writing_config_json_leaves_the_run_resumable(
    inputs: tuple[Path, Path], reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every start rewrites OUTPUT/config.json; killed half-way, it was an empty or cut file, and every later
    --resume failed with a traceback (OSError: ... is not a valid JSON file)."""
    from transformers import PretrainedConfig

    run = tmp_path / "run"
    assert main([*_args(inputs, run), "--stop-after-steps", "2"]) == 0

    def cut(self: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        Path(path).write_text(self.to_json_string()[:40])
        raise Crash

    with monkeypatch.context() as m:
        m.setattr(PretrainedConfig, "to_json_file", cut)
        with pytest.raises(Crash):
            main([*_args(inputs, run), "--resume"])
    json.loads((run / "config.json").read_text())
    assert main([*_args(inputs, run), "--resume"]) == 0
    _assert_same_run(run, reference)


def test_final_is_complete_or_absent_whenever_its_save_is_cut_short(
    inputs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """final/ saved again (a finished run resumed, or one killed after final/ and before its test scores):
    cut short at any step it is the old final/, the new one or absent, never a part of one that loads (the
    old one was removed file by file before the new one was renamed in)."""
    from transformers import AutoModelForMaskedLM

    tok = load_tokenizer(inputs[1])
    opts = pipelines.PretrainConfig(arch=ARCH, layers=2, hidden=32, ffn=64, seq_len=32)
    config = pipelines.build_model_config(opts, vocab_size=len(tok), special_ids=pipelines._special_ids(tok))
    old_model, new_model = AutoModelForMaskedLM.from_config(config), AutoModelForMaskedLM.from_config(config)
    base, fresh = tmp_path / "base", tmp_path / "fresh"
    for out, model in ((base, old_model), (fresh, new_model)):
        out.mkdir()
        pipelines._save_final(_Accelerator(), model, tok, out)
    names = sorted(p.name for p in (base / "final").iterdir())
    versions = [load_file(str(r / "final" / "model.safetensors")) for r in (base, fresh)]
    assert not _same_weights(*versions)
    for k in itertools.count():
        run = tmp_path / f"cut{k}"
        shutil.copytree(base, run)
        with monkeypatch.context() as m:
            _cut_short(m, k)
            try:
                pipelines._save_final(_Accelerator(), new_model, tok, run)
                finished = True
            except Crash:
                finished = False
        final = run / "final"
        if final.exists() or finished:
            assert sorted(p.name for p in final.iterdir()) == names, k
            weights = load_file(str(final / "model.safetensors"))
            allowed = versions[1:] if finished else versions  # cut short: the old one or the new one
            assert any(_same_weights(weights, v) for v in allowed), k
            assert load_tokenizer(final).get_vocab() == tok.get_vocab()
        if finished:
            break
    assert k >= 3  # (it was cut at several steps)


def test_overwrite_cut_short_leaves_a_run_that_resumes_or_is_discarded(
    reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--overwrite cut short at any step while it removes the old run: the folder has a checkpoint that
    loads or none (latest.json goes first), and another --overwrite goes through (it refused a run whose
    latest.json named a checkpoint already removed)."""
    opts = pipelines.PretrainConfig(output="unused", overwrite=True)
    for k in itertools.count():
        run = tmp_path / f"cut{k}"
        shutil.copytree(reference, run)
        with monkeypatch.context() as m:
            _cut_short(m, k)
            try:
                pipelines._prepare_output(run, opts, _Accelerator(), "pretrain")
                finished = True
            except Crash:
                finished = False
        found = latest_checkpoint(run)
        if found is not None:
            load_checkpoint(found)
        assert pipelines._prepare_output(run, opts, _Accelerator(), "pretrain") is None, k
        assert not (run / "checkpoints").exists() and not (run / "final").exists()
        if finished:
            break


@pytest.mark.parametrize("broken", ["checkpoint gone", "state.json gone"])
def test_a_run_whose_latest_checkpoint_is_gone_says_to_overwrite_and_overwrite_works(
    inputs: tuple[Path, Path],
    reference: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    broken: str,
) -> None:
    run = tmp_path / "run"
    assert main([*_args(inputs, run), "--stop-after-steps", "2"]) == 0
    ckpt = latest_checkpoint(run)
    if broken == "checkpoint gone":
        shutil.rmtree(ckpt)
    else:
        (ckpt / "state.json").unlink()
    for flag in ("--resume", None):
        capsys.readouterr()
        assert main([*_args(inputs, run), *([flag] if flag else [])]) == 2
        err = capsys.readouterr().err
        assert re.search(r"^gmlp pretrain: error: .* missing or incomplete; pass --overwrite", err, re.M), err
    assert main([*_args(inputs, run), "--overwrite"]) == 0
    _assert_same_run(run, reference)


def test_a_full_disk_mid_run_is_a_one_line_error_and_keeps_the_last_checkpoint(
    inputs: tuple[Path, Path],
    reference: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run"
    real, calls = checkpoint.save_state_dict_file, []

    def full_disk(state: dict, path: Path, metadata: Any = None) -> None:
        calls.append(path)
        if len(calls) == 2:  # the checkpoint of step 4
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(state, path, metadata)

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save_state_dict_file", full_disk)
        assert main(_args(inputs, run)) == 2
    err = capsys.readouterr().err
    want = r"^gmlp pretrain: error: No space left on device: '.*model\.safetensors'; what was saved before"
    assert re.search(want + " is intact", err, re.M), err
    assert load_checkpoint(run).state["step"] == 2 and not list((run / "checkpoints").glob(".*"))
    assert main([*_args(inputs, run), "--resume"]) == 0
    _assert_same_run(run, reference)


def test_a_read_only_run_folder_on_resume_is_a_one_line_error_that_changes_nothing(
    inputs: tuple[Path, Path],
    reference: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """(As root, chmod does not stop a write: every write under the run folder fails with EROFS instead.)"""
    run = tmp_path / "run"
    assert main([*_args(inputs, run), "--stop-after-steps", "2"]) == 0
    before = _files(run)

    def refuse(path: Any, *rest: Any) -> None:
        if str(os.fspath(path)).startswith(str(run)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    real_open, real_os_open = io.open, os.open

    def open_(file: Any, mode: str = "r", *a: Any, **kw: Any) -> Any:
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            refuse(file)
        return real_open(file, mode, *a, **kw)

    def os_open(path: Any, flags: int, *a: Any, **kw: Any) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_os_open(path, flags, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr("builtins.open", open_)
        m.setattr(io, "open", open_)
        m.setattr(os, "open", os_open)
        for name in ("mkdir", "replace", "rename", "unlink", "rmdir"):
            m.setattr(os, name, _before(getattr(os, name), refuse))
        capsys.readouterr()
        assert main([*_args(inputs, run), "--resume"]) == 2
    err = capsys.readouterr().err
    want = r"^gmlp pretrain: error: Read-only file system: '.*'; what was saved before is intact"
    assert re.search(want, err, re.M), err
    assert _files(run) == before
    assert main([*_args(inputs, run), "--resume"]) == 0
    _assert_same_run(run, reference)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals: main thread")
def test_sigterm_stops_with_a_checkpoint_and_says_how_to_continue(
    inputs: tuple[Path, Path],
    reference: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """What docs/text_training.md promises: a checkpoint on SIGTERM, then --resume; exit status 130 and a
    line saying where it stopped and how to go on (it said only "interrupted")."""
    run = tmp_path / "run"
    real_log = pipelines._MetricsLog.log

    def log(self: Any, record: dict) -> None:
        real_log(self, record)
        if record == {**record, "step": 3, "split": "validation"}:  # (mid-evaluation step: 3 is no save step)
            os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as m:
        m.setattr(pipelines._MetricsLog, "log", log)
        assert main(_args(inputs, run)) == 130
    err = capsys.readouterr().err
    assert "[gmlp] stopped at step 3/6 with a checkpoint; --resume continues the run" in err
    assert load_checkpoint(run).state["step"] == 3
    assert main([*_args(inputs, run), "--resume"]) == 0
    _assert_same_run(run, reference)


def test_gmlp_tokenizer_cut_short_never_leaves_a_partial_tokenizer(
    inputs: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``gmlp tokenizer`` killed while saving left tokenizer_config.json beside a cut (or no) tokenizer.json
    in --output, and a pretrain given that folder failed with a traceback: now the folder is the old
    tokenizer or absent, and a broken tokenizer folder is a one-line error."""
    corpus, _ = inputs
    out = tmp_path / "tok"
    cls = type(load_tokenizer(inputs[1]))

    def cut(self: Any, save_directory: Any, *a: Any, **kw: Any) -> Any:
        (Path(save_directory) / "tokenizer.json").write_text('{"version": "1.0", "trunc')
        raise Crash

    command = lambda size: ["tokenizer", "--corpus", str(corpus), "--vocab-size", size, "--output", str(out)]  # noqa: E731
    for old in (None, "150"):
        if old:
            assert main(command(old)) == 0
        vocab = load_tokenizer(out).get_vocab() if old else None
        with monkeypatch.context() as m:
            m.setattr(cls, "_save_pretrained", cut)
            with pytest.raises(Crash):
                main(command("120"))
        assert (load_tokenizer(out).get_vocab() if out.exists() else None) == vocab
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "tokenizer.json").write_text((out / "tokenizer.json").read_text()[:500])
    capsys.readouterr()
    assert main([*_args((corpus, broken), tmp_path / "run")]) == 2
    # (transformers 5 parses tokenizer.json with json; 4.x: tokenizers raises a bare Exception)
    assert re.search(r"^gmlp pretrain: error: the tokenizer in '.*broken' does not load: it is incomplete or "
                     r"corrupt \((JSONDecodeError|Exception): ", capsys.readouterr().err, re.M)


def test_overwrite_leaves_a_folder_that_holds_no_run_alone(tmp_path: Path) -> None:
    """``--overwrite`` on a folder without a run's checkpoints or metrics removes nothing (a user's own
    config.json or tokenizer/ there survived before the leftovers rule, and must again)."""
    out = tmp_path / "mine"
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "tokenizer.json").write_text("{}")
    (out / "config.json").write_text("{}")
    opts = pipelines.PretrainConfig(output=str(out), overwrite=True)
    assert pipelines._prepare_output(out, opts, _Accelerator(), "pretrain") is None
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "tokenizer"]


def test_overwrite_refuses_to_delete_the_runs_own_input(inputs: tuple[Path, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A ``--tokenizer`` inside the run files ``--overwrite`` would remove is refused, and kept."""
    run = tmp_path / "run"
    assert main([*_args(inputs, run), "--stop-after-steps", "2"]) == 0
    tok = run / "tokenizer"
    shutil.copytree(inputs[1], tok)
    corpus = str(inputs[0])
    argv = ["pretrain", "--corpus", corpus, "--tokenizer", str(tok), *TINY, "--steps", "2",
            "--output", str(run), "--overwrite"]
    capsys.readouterr()
    assert main(argv) == 2
    assert "--overwrite would delete --tokenizer" in capsys.readouterr().err
    assert (tok / "tokenizer.json").is_file() and latest_checkpoint(run) is not None


def test_a_permission_error_outside_the_output_keeps_its_traceback(
    inputs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EACCES on an input (a corpus that cannot be read) is no write error: it is raised as it is, not
    reported as "what was saved before is intact"."""
    def unreadable(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/elsewhere/corpus.txt")

    monkeypatch.setattr(pipelines, "load_text_splits", unreadable)
    with pytest.raises(PermissionError):
        main(_args(inputs, tmp_path / "run"))


def test_a_tokenizer_that_fails_for_another_reason_keeps_its_traceback(
    inputs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a file that does not parse is "incomplete or corrupt"; a library error (AttributeError) is
    raised as it is, not sent to rebuild a tokenizer that is fine."""
    import transformers

    def broken(*args: Any, **kwargs: Any) -> None:
        raise AttributeError("'NoneType' object has no attribute 'get'")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", broken)
    with pytest.raises(AttributeError):
        load_tokenizer(inputs[1])


def test_a_resume_removes_the_temporaries_of_killed_folder_saves(inputs: tuple[Path, Path],
                                                                 tmp_path: Path) -> None:
    """``.final.old`` (a kill between the two renames of a ``final/`` swap), ``.final.tmp``, ``.config.tmp``
    and a swapped-out ``.step-*.old`` checkpoint are removed when the run resumes."""
    run = tmp_path / "run"
    assert main([*_args(inputs, run), "--stop-after-steps", "2"]) == 0
    stale = (".final.old", ".final.tmp", ".config.tmp", ".tokenizer.old", "checkpoints/.step-00000001.old")
    for name in stale:
        (run / name).mkdir()
        (run / name / "x").write_text("x")
    assert main([*_args(inputs, run), "--resume", "--stop-after-steps", "1"]) == 0
    assert not [str(p) for p in run.rglob(".*")]
