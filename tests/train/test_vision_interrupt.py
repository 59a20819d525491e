"""``gmlp train`` stopped by SIGTERM / SIGINT (preemption, Ctrl-C, torchrun forwarding its SIGTERM) loses
nothing: it finishes the step in progress, writes a checkpoint (also mid-epoch, with ``--checkpoint-every``
0), says where it stopped and exits with status 130; ``--resume`` then ends with the uninterrupted run's
weights and metrics. A second signal aborts at once, except during a checkpoint save, which it lets finish.
Before, a SIGTERM killed the run and lost everything since the last epoch end.

The in-process tests install a handler of their own first, which the run must replace while it trains and
put back afterwards; a signal the run does not handle raises ``Unhandled`` (instead of killing pytest)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torchrun_helpers import descendants, kill_tree, latest_step, torchrun_cmd

import gmlp.train.vision as vision
from gmlp.cli import main
from gmlp.train.checkpoint import load_checkpoint
from gmlp.train.interrupt import StopRequest
from gmlp.utils.io import load_state_dict_file

pytestmark = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                                reason="signal handlers: main thread only")

# 5 steps per epoch (320 / 64); no --checkpoint-every: a stop mid-epoch must still write a checkpoint
ARGS = ["--model", "gmlp_micro4_28", "--dataset", "digits", "--batch-size", "64", "--warmup-steps", "3",
        "--train-subset", "320", "--test-subset", "64", "--no-progress", "--threads", "1",
        "--drop-path-rate", "0.1", "--no-tensorboard", "--no-plot"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1"}
STOPPED = "[gmlp] stopped at step {}/{} ({}) with a checkpoint; --resume continues the run"


class Unhandled(Exception):
    """A stop signal that reached the test's own handler (the run had none installed)."""


def _unhandled(signum: int, frame: Any) -> None:
    raise Unhandled(signum)


@pytest.fixture
def own_handlers() -> Iterator[None]:
    """The test's handler for SIGINT and SIGTERM, before and (the run must put it back) after the run."""
    old = {sig: signal.signal(sig, _unhandled) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
        assert [signal.getsignal(sig) for sig in old] == [_unhandled, _unhandled]
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _records(run: Path) -> list[dict]:
    """metrics.jsonl without the timings."""
    return [{k: v for k, v in json.loads(x).items() if k != "epoch_seconds"}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(run: Path, reference: Path) -> None:
    a, b = (load_state_dict_file(r / "model.safetensors")[0] for r in (run, reference))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert _records(run) == _records(reference)


def _signal_at_step(monkeypatch: pytest.MonkeyPatch, at: int, times: int = 1,
                    sig: signal.Signals = signal.SIGTERM) -> None:
    """Send ``sig`` to this process ``times`` times as step ``at`` (0-based) begins."""
    real = vision.step_seed

    def step_seed(seed: int, step: int) -> int:
        if step == at:
            for _ in range(times):
                os.kill(os.getpid(), sig)
        return real(seed, step)

    monkeypatch.setattr(vision, "step_seed", step_seed)


# --- a real process -----------------------------------------------------------------------------------------


def test_sigterm_mid_epoch_checkpoints_the_step_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    """A ``gmlp train`` process SIGTERMed mid-epoch (as Slurm or Kubernetes preempt it) exits 130 with a
    checkpoint of the step it was in and one line saying so; resumed, it ends as the uninterrupted run."""
    run = tmp_path / "run"
    # checkpoints every 3 steps only to see from outside how far it got: the signal comes at step >= 3
    cmd = [sys.executable, "-m", "gmlp", "train", *ARGS, "--epochs", "1000", "--checkpoint-every", "3",
           "--output", str(run)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while latest_step(run) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        seen = latest_step(run)
        assert proc.poll() is None and seen >= 3, proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        kill_tree(proc.pid)
        proc.wait()
    assert proc.returncode == 130, err[-3000:]
    step = load_checkpoint(run).state["step"]
    assert step >= seen  # no step of the run was lost
    assert step < 5000 and not (run / "model.safetensors").exists()
    epoch, i = divmod(step, 5)
    where = f"{i}/5 steps into epoch {epoch + 1}" if i else f"after epoch {epoch}"
    assert STOPPED.format(step, 5000, where) in err, err[-3000:]
    assert "[gmlp] signal 15: stopping after this step" in err and "Traceback" not in err, err[-3000:]

    stop = step + 6 if i else step + 3  # on past the next epoch end, and stopping mid-epoch
    resumed = [*ARGS, "--epochs", "1000", "--checkpoint-every", "3", "--max-steps", str(stop)]
    assert main(["train", *resumed, "--output", str(run), "--resume"]) == 0
    assert main(["train", *resumed, "--output", str(tmp_path / "straight")]) == 0
    _assert_same_run(run, tmp_path / "straight")
    assert [r["epoch"] for r in _records(run)] == list(range(1, stop // 5 + 1))


# --- in process: where it stops -----------------------------------------------------------------------------


def test_a_signal_during_a_step_stops_right_after_it_with_a_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], own_handlers: None
) -> None:
    """SIGINT (Ctrl-C) as step 3 (0-based) begins: the checkpoint holds step 4, that step and no other (no
    --checkpoint-every), and the run goes on from it to the uninterrupted result."""
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _signal_at_step(m, 3, sig=signal.SIGINT)
        assert main(["train", *ARGS, "--epochs", "2", "--output", str(run)]) == 130
    err = capsys.readouterr().err
    assert STOPPED.format(4, 10, "4/5 steps into epoch 1") in err, err
    assert err.count("[gmlp] stopped") == 1 and "interrupted" in err
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-00000004"]
    assert load_checkpoint(run).state["step"] == 4
    assert not (run / "model.safetensors").exists()
    assert main(["train", *ARGS, "--epochs", "2", "--output", str(run), "--resume"]) == 0
    assert main(["train", *ARGS, "--epochs", "2", "--output", str(tmp_path / "straight")]) == 0
    _assert_same_run(run, tmp_path / "straight")


def test_a_second_signal_aborts_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], own_handlers: None
) -> None:
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _signal_at_step(m, 2, times=2)
        assert main(["train", *ARGS, "--epochs", "1", "--output", str(run)]) == 130
    err = capsys.readouterr().err
    assert "[gmlp] stopped" not in err and "interrupted" in err
    assert latest_step(run) == -1  # step 3 was not finished, nothing saved


def test_a_second_signal_during_a_checkpoint_save_lets_it_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], own_handlers: None
) -> None:
    """Two signals while the epoch-end checkpoint is being written (torchrun's SIGTERM after the user's):
    the checkpoint is completed, then the run aborts."""
    run = tmp_path / "run"
    real = vision.save_checkpoint

    def save_checkpoint(*args: Any, **kwargs: Any) -> Path:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(vision, "save_checkpoint", save_checkpoint)
        assert main(["train", *ARGS, "--epochs", "2", "--output", str(run)]) == 130
    # (capfd: the signal handler writes to file descriptor 2 itself, not through sys.stderr)
    err = capfd.readouterr().err
    assert "aborting once the checkpoint being written is complete" in err, err
    ckpt = load_checkpoint(run)
    assert ckpt.state["step"] == 5 and ckpt.model.keys() == load_state_dict_file(
        run / "checkpoints" / "step-00000005" / "model.safetensors")[0].keys()


def test_a_signal_during_evaluation_stops_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], own_handlers: None
) -> None:
    """The epoch's evaluation, metrics record and checkpoint are completed; nothing more."""
    run = tmp_path / "run"
    real = vision._evaluate_tensors

    def evaluate(*args: Any, **kwargs: Any) -> dict[str, float]:
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(vision, "_evaluate_tensors", evaluate)
        assert main(["train", *ARGS, "--epochs", "2", "--output", str(run)]) == 130
    assert STOPPED.format(5, 10, "after epoch 1") in capsys.readouterr().err
    assert [r["epoch"] for r in _records(run)] == [1]
    assert load_checkpoint(run).state["step"] == 5


# --- the handlers -------------------------------------------------------------------------------------------


def test_the_handlers_are_installed_while_training_and_put_back_after_a_return_or_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, own_handlers: None
) -> None:
    seen: list[Any] = []
    real = vision.step_seed

    def step_seed(seed: int, step: int) -> int:
        seen.append(signal.getsignal(signal.SIGTERM))
        if step == 2 and len(seen) > 5:  # the second run fails in its step 2
            raise RuntimeError("boom")
        return real(seed, step)

    monkeypatch.setattr(vision, "step_seed", step_seed)
    assert main(["train", *ARGS, "--epochs", "1", "--output", str(tmp_path / "a")]) == 0
    assert signal.getsignal(signal.SIGTERM) is _unhandled
    with pytest.raises(RuntimeError, match="boom"):
        main(["train", *ARGS, "--epochs", "1", "--output", str(tmp_path / "b")])
    assert signal.getsignal(signal.SIGINT) is _unhandled  # (and SIGTERM: the fixture checks both)
    assert len(seen) == 8 and all(getattr(h, "__self__", None).__class__ is StopRequest for h in seen)


def test_stop_request_outside_the_main_thread_installs_nothing() -> None:
    before = signal.getsignal(signal.SIGTERM)
    out: list[Any] = []

    def work() -> None:
        with StopRequest() as stop:
            out.append((signal.getsignal(signal.SIGTERM), stop.requested))

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert out == [(before, False)] and signal.getsignal(signal.SIGTERM) is before


# --- DataLoader workers -------------------------------------------------------------------------------------


def test_a_sigterm_that_reaches_the_dataloader_workers_too_still_stops_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], own_handlers: None
) -> None:
    """Slurm signals every process of a job, Ctrl-C every process of the terminal's group: the PIL
    pipeline's worker processes died of it, and the run with "DataLoader worker ... killed by signal"
    before it could finish its step and save. The workers now leave the signal to the main process."""
    run = tmp_path / "run"
    real = vision.step_seed
    # (children this process had before, e.g. compile workers of earlier tests: not the run's to signal)
    earlier = set(descendants(os.getpid()))

    def step_seed(seed: int, step: int) -> int:
        if step == 2:
            workers = [pid for pid in descendants(os.getpid()) if pid not in earlier]
            assert workers  # (the training DataLoader's worker)
            for pid in [*workers, os.getpid()]:
                os.kill(pid, signal.SIGTERM)
            time.sleep(0.2)  # (a dying worker would be noticed by now)
        return real(seed, step)

    monkeypatch.setattr(vision, "step_seed", step_seed)
    args = [*ARGS, "--epochs", "1", "--auto-augment", "rand-m9-mstd0.5", "--workers", "1"]
    assert main(["train", *args, "--output", str(run)]) == 130
    assert STOPPED.format(3, 5, "3/5 steps into epoch 1") in capsys.readouterr().err
    assert load_checkpoint(run).state["step"] == 3


# --- several processes --------------------------------------------------------------------------------------


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(v[5:]) for v in environ if v.startswith(b"RANK=")]
    return ranks[0] if ranks and b"LOCAL_WORLD_SIZE=2" in environ else None


@pytest.mark.slow  # two torchrun processes: ~15 s on a quiet 2-core machine
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path: Path) -> None:
    """torchrun, 2 gloo processes (DDP): a SIGTERM that reaches process 1 only (process 0 never sees a
    signal) stops both after the same step, with one checkpoint of it written by process 0."""
    run = tmp_path / "run"
    log = tmp_path / "torchrun.log"
    cmd = torchrun_cmd("train", *ARGS, "--epochs", "1000", "--checkpoint-every", "2", "--output", str(run))
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=ENV, cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while latest_step(run) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None and latest_step(run) >= 2, log.read_text()[-3000:]
        rank1 = [p for p in descendants(proc.pid) if _rank_of(p) == 1]
        assert len(rank1) == 1, rank1
        os.kill(rank1[0], signal.SIGTERM)
        proc.wait(timeout=240)
    finally:
        kill_tree(proc.pid)
        proc.wait()
    out = log.read_text()
    step = load_checkpoint(run).state["step"]
    assert f"[gmlp] stopped at step {step}/5000 (" in out, out[-4000:]  # (process 0's line)
    # one signal (process 1's), and both processes ended by it, with status 130
    assert out.count("[gmlp] signal 15") == 1 and out.count("interrupted\n") == 2, out[-4000:]
    assert step < 5000 and not (run / "model.safetensors").exists()


# --- gmlp eval ----------------------------------------------------------------------------------------------


def test_gmlp_eval_takes_test_subset_as_gmlp_train_names_it(tmp_path: Path) -> None:
    """``gmlp eval RUN --test-subset N`` (the flag a run was trained with) was refused as an unrecognized
    argument; it is ``--subset N``: the run's own test numbers."""
    run = tmp_path / "run"
    assert main(["train", *ARGS, "--epochs", "1", "--output", str(run)]) == 0
    results = []
    for flag in ("--test-subset", "--subset"):
        out = tmp_path / f"{flag}.json"
        assert main(["eval", str(run), flag, "64", "--workers", "0", "--json", str(out)]) == 0
        results.append(json.loads(out.read_text()))
    assert results[0] == results[1] and results[0]["count"] == 64
    assert results[0]["top1"] == pytest.approx(_records(run)[-1]["test_accuracy"], abs=0)
