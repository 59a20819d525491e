"""Long runs with their output in files (Slurm ``--output``, ``nohup``, Kubernetes logs): what ``gmlp train``
and ``gmlp pretrain`` write there and on disk.

Before, both loops drew a tqdm bar into the log file as well: every redraw (``\\r`` and ~100 bytes, up to
ten a second and at every log step) one after another, a single line per epoch (``gmlp train``) or per
evaluation (``gmlp pretrain``) of tens to hundreds of MB over a multi-day run; ``TQDM_DISABLE=1`` was ignored
(the loops passed ``disable=`` themselves); and ``gmlp pretrain``'s evaluation lines sat in the block-buffered
stdout, out of ``tail -f`` for hours and lost when the job was killed. Now a log file gets one line per log
interval (as timm's ``train.py``), a terminal keeps the bar, and evaluation lines are flushed when printed.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from text_corpus import corpus_and_tokenizer

from gmlp.cli import main
from gmlp.utils.progress import LineProgress, progress_bar

# 5 steps per epoch (320 / 64)
VISION = ["train", "--model", "gmlp_micro4_28", "--dataset", "digits", "--batch-size", "64",
          "--warmup-steps", "3", "--train-subset", "320", "--test-subset", "64", "--threads", "1",
          "--no-tensorboard", "--no-plot"]
PROGRESS_LINE = re.compile(r"^epoch (\d+)/(\d+): (\d+)/(\d+) \(\d+%\) \[.*, loss=[\d.]+, lr=[\d.e+-]+\]$")


@pytest.fixture(autouse=True)
def _bars_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TQDM_DISABLE", raising=False)


def test_a_vision_run_logged_to_a_file_writes_a_line_per_log_interval_and_keeps_k_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """stderr captured (not a terminal): one whole progress line per ``--log-every`` steps, no ``\\r`` redraws
    (before: a tqdm bar written into the file); the epoch lines on stdout as before; five checkpoints (steps
    3, 5, 6, 9, 10) leave ``--keep-last`` of them, the newest."""
    run = tmp_path / "run"
    argv = [*VISION, "--epochs", "2", "--log-every", "2", "--checkpoint-every", "3", "--keep-last", "2",
            "--output", str(run)]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "\r" not in err and "\r" not in out
    progress = [PROGRESS_LINE.match(line) for line in err.splitlines() if line.startswith("epoch ")]
    assert all(progress), err
    # global steps 2, 4 (epoch 1) and 6, 8, 10 (epoch 2): in-epoch 2/5, 4/5, 1/5, 3/5, 5/5
    assert [(m[1], m[3], m[4]) for m in progress] == [("1", "2", "5"), ("1", "4", "5"), ("2", "1", "5"),
                                                       ("2", "3", "5"), ("2", "5", "5")]
    assert re.findall(r"^epoch (\d)/2  train_loss", out, re.M) == ["1", "2"]
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000009", "step-00000010"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10]


@pytest.mark.parametrize("off", ["TQDM_DISABLE=1", "--no-progress"])
def test_tqdm_disable_and_no_progress_turn_the_progress_off_but_keep_the_epoch_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, off: str
) -> None:
    """``TQDM_DISABLE=1`` (tqdm's own switch) was ignored: the loop's explicit ``disable=False`` wins over it
    in tqdm. Both it and ``--no-progress`` leave no progress output; the results are still printed."""
    flags = ["--no-progress"] if off.startswith("--") else []
    if not flags:
        monkeypatch.setenv("TQDM_DISABLE", "1")
    argv = [*VISION, "--epochs", "1", "--log-every", "1", "--output", str(tmp_path / "run"), *flags]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "epoch 1/1:" not in err and "\r" not in err, err
    assert re.search(r"^epoch 1/1  train_loss [\d.]+  test_acc ", out, re.M), out


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("value", ["", "0", "false", "1", "true", "yes"])
def test_progress_bar_is_a_tqdm_bar_on_a_terminal_and_lines_elsewhere(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """A terminal keeps tqdm's bar (redrawn in place); a file gets :class:`LineProgress`; ``enabled=False`` or
    ``TQDM_DISABLE`` set to a true value: nothing but ``write``."""
    from tqdm import tqdm

    monkeypatch.setenv("TQDM_DISABLE", value)
    disabled = value in ("1", "true", "yes")
    monkeypatch.setattr(sys, "stderr", _Terminal())
    bar = progress_bar(10, desc="d")
    assert isinstance(bar, LineProgress if disabled else tqdm)
    bar.close()
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    bar = progress_bar(10, desc="d")
    assert isinstance(bar, LineProgress) and bar.disable == disabled
    off = progress_bar(10, desc="d", enabled=False)
    assert isinstance(off, LineProgress) and off.disable


@settings(max_examples=20, deadline=None, derandomize=True)
@given(total=st.integers(1, 10_000), initial=st.integers(0, 50),
       calls=st.lists(st.tuples(st.integers(0, 40), st.booleans()), max_size=12))
def test_line_progress_prints_one_whole_line_per_postfix_and_nothing_else(
    total: int, initial: int, calls: list[tuple[int, bool]]
) -> None:
    """Whatever the updates, :class:`LineProgress` prints exactly one ``\\n``-ended line per ``set_postfix``
    (none for ``update``/``close``), each with the steps done so far, and never a ``\\r``."""
    stream = io.StringIO()
    bar = LineProgress(total, desc="pretrain", initial=initial, file=stream)
    want, n = [], initial
    for steps, log in calls:
        bar.update(steps)
        n += steps
        if log:
            bar.set_postfix(loss=f"{n / 7:.3f}")
            want.append(n)
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text and text.count("\n") == len(want) and (not want or text.endswith("\n"))
    # ("2/?" past the total, as tqdm writes it)
    got = [int(re.match(r"pretrain: (\d+)/(\d+|\?) ", line)[1]) for line in text.splitlines()]
    assert got == want
    assert all(f"loss={n / 7:.3f}]" in line for n, line in zip(want, text.splitlines(), strict=True))


def test_line_progress_write_is_flushed_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """``write`` (the evaluation lines of ``gmlp pretrain``) flushes: a log file must have the line before the
    next one is computed, whether the progress is lines, off, or a bar (stderr a terminal, stdout a file)."""
    flushed = []

    class Stream(io.StringIO):
        def flush(self) -> None:
            flushed.append(self.getvalue())

    for enabled, stderr in ((True, io.StringIO()), (False, io.StringIO()), (True, _Terminal())):
        stream = Stream()
        monkeypatch.setattr(sys, "stdout", stream)
        monkeypatch.setattr(sys, "stderr", stderr)
        bar = progress_bar(3, desc="d", enabled=enabled)
        bar.write("[pretrain] step 3: loss 1.0")
        bar.close()
        assert flushed and flushed[-1].endswith("[pretrain] step 3: loss 1.0\n"), (enabled, flushed)


def _val_steps(metrics: Path) -> list[int]:
    if not metrics.exists():
        return []
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.endswith("}")]
    return [r["step"] for r in records if r.get("split") != "train"]


def test_pretrain_logged_to_files_and_killed_keeps_its_evaluation_lines_and_no_bar_redraws(
    tmp_path: Path,
) -> None:
    """``gmlp pretrain > out 2> err`` (stdout block-buffered, as under Slurm) SIGKILLed mid-run: every
    evaluation it printed before the last one is in ``out`` (before: none, held in the buffer), and ``err``
    holds one progress line per ``--log-every`` steps, no ``\\r``.

    (Needs the text-side change: ``gmlp.train.text``'s loop making its bar with :func:`progress_bar`.)"""
    corpus, tok = corpus_and_tokenizer(tmp_path)
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONUNBUFFERED", "TQDM_DISABLE")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    argv = [sys.executable, "-m", "gmlp", "pretrain", "--corpus", str(corpus), "--tokenizer", str(tok),
            "--arch", "gmlp", "--layers", "1", "--hidden", "16", "--ffn", "32", "--seq-len", "32",
            "--batch-size", "2", "--steps", "1000000", "--save-every", "0", "--eval-every", "10",
            "--eval-batches", "1", "--log-every", "10", "--valid-fraction", "0.2", "--output", str(run)]
    with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while len(_val_steps(run / "metrics.jsonl")) < 4 and proc.poll() is None:
                assert time.monotonic() < deadline, "no evaluation within 60 s"
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    evaluated = _val_steps(run / "metrics.jsonl")
    assert len(evaluated) >= 4, (tmp_path / "err").read_text()[-2000:]
    printed = [int(s) for s in re.findall(r"^\[pretrain\] step (\d+): ", (tmp_path / "out").read_text(),
                                          re.M)]
    assert printed[: len(evaluated) - 1] == evaluated[:-1]
    text = (tmp_path / "err").read_text()
    assert "\r" not in text
    progress = [int(s) for s in re.findall(r"^pretrain: (\d+)/1000000 \(0%\) \[.*, loss=", text, re.M)]
    assert progress and progress == list(range(10, 10 * len(progress) + 1, 10))
