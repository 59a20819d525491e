"""The training API called from a program that is not the ``gmlp`` CLI (a notebook, a service, a thread pool):
the caller's signal handlers, threads, file descriptors, logging, warnings, ``sys.argv``, environment and
current directory after one run and after another; a Ctrl-C (SIGINT to the process, as a notebook's
"interrupt" sends it) that must reach the caller; and :class:`gmlp.train.interrupt.StopRequest` putting the
caller's handlers back when signals keep coming as a run ends.

The in-process tests install a handler of their own (:func:`_caller`, which raises :class:`CallerSignal` as
Python's default SIGINT handler raises ``KeyboardInterrupt``) so that a signal no run handles fails the test
instead of killing pytest.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from gmlp.train.interrupt import STOP_SIGNALS, StopRequest

pytestmark = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                                reason="signal handlers: main thread only")


class CallerSignal(Exception):
    """A stop signal that reached the caller's own handler."""


def _caller(signum: int, frame: Any) -> None:
    raise CallerSignal(signum)


@pytest.fixture
def caller_handlers() -> Iterator[None]:
    """The caller's handler for SIGINT and SIGTERM during the test; the test process's own again after."""
    old = {sig: signal.signal(sig, _caller) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _handlers() -> list[Any]:
    return [signal.getsignal(sig) for sig in STOP_SIGNALS]


# --- StopRequest: putting the caller's handlers back -------------------------------------------------------


@pytest.mark.parametrize("requested", [False, True], ids=["no-stop-yet", "stop-requested"])
@pytest.mark.parametrize("put_back", [0, 1, 2], ids=["before-any", "after-one", "after-both"])
@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_the_handlers_are_put_back_reaches_the_caller_and_leaves_none_of_ours(
    caller_handlers: None, monkeypatch: pytest.MonkeyPatch, sig: int, put_back: int, requested: bool
) -> None:
    """Ctrl-C pressed again (or a SIGTERM) just as a run ends, before, between or after the handlers are put
    back (every interleaving): afterwards both are the caller's, and the signal reached the caller's handler
    once. Before, one that came between the two went to the caller's SIGINT handler, whose exception left
    the run's SIGTERM handler installed for the rest of the process; one that came before either went to the
    run's, which swallowed it (no stop requested yet) or raised past the put-back (both left installed)."""
    real = signal.signal
    puts: list[int] = []

    def put_back_then_signal(signum: int, handler: Any) -> Any:
        if handler is _caller and len(puts) == put_back == 0:
            os.kill(os.getpid(), sig)  # (handled inside os.kill, by the handler installed for it now)
        out = real(signum, handler)
        if handler is _caller:
            puts.append(signum)
            if len(puts) == put_back:
                os.kill(os.getpid(), sig)
        return out

    stop = StopRequest()
    with pytest.raises(CallerSignal) as caught, stop:
        if requested:
            os.kill(os.getpid(), signal.SIGINT)  # the first signal: a stop requested
            assert stop.requested
        monkeypatch.setattr(signal, "signal", put_back_then_signal)
    monkeypatch.undo()
    assert caught.value.args == (sig,)
    assert _handlers() == [_caller, _caller]


def test_a_handler_that_raises_as_they_are_installed_leaves_none_of_ours(
    caller_handlers: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``signal.signal`` first runs the handlers of signals already pending; one of the caller's that raises
    there (its SIGTERM handler, while SIGTERM is installed second) left the run's SIGINT handler installed,
    with no ``__exit__`` to put it back."""
    real = signal.signal

    def raising_for_sigterm(signum: int, handler: Any) -> Any:
        if signum == signal.SIGTERM and handler != _caller:
            raise CallerSignal(signal.SIGTERM)  # (what a pending SIGTERM's handler raised in there)
        return real(signum, handler)

    monkeypatch.setattr(signal, "signal", raising_for_sigterm)
    with pytest.raises(CallerSignal):
        StopRequest().__enter__()
    monkeypatch.undo()
    assert _handlers() == [_caller, _caller]


# --- a whole run: Ctrl-C in its last step, what it leaves behind -------------------------------------------


def _vision_config(output: Path, **overrides: Any) -> Any:
    from gmlp.train.vision import VisionTrainConfig

    kwargs: dict[str, Any] = dict(model="gmlp_micro4_28", dataset="digits", batch_size=32, epochs=1,
                                  warmup_steps=0, augment=False, progress=False, train_subset=64,
                                  test_subset=32, threads=1, plot=False, output=str(output))
    return VisionTrainConfig(**{**kwargs, **overrides})


def _signal_in_vision_step(monkeypatch: pytest.MonkeyPatch, at: int, sig: int = signal.SIGINT) -> None:
    """``sig`` to this process from another thread (as a notebook's interrupt comes from outside the cell)
    while step ``at`` (0-based) runs: the step waits until the main thread has handled it."""
    import gmlp.train.vision as vision

    real = vision.step_seed

    def step_seed(seed: int, step: int) -> int:
        if step == at:
            sender = threading.Thread(target=os.kill, args=(os.getpid(), sig))
            sender.start()
            sender.join()
        return real(seed, step)

    monkeypatch.setattr(vision, "step_seed", step_seed)


def test_ctrl_c_mid_run_reaches_the_caller_with_a_checkpoint_and_the_callers_handlers_back(
    caller_handlers: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A notebook's interrupt during ``train_vision`` (step 1 of 2... of 3): the run saves the step and
    raises ``KeyboardInterrupt`` into the cell; the caller's handlers are back."""
    from gmlp.train.checkpoint import load_checkpoint
    from gmlp.train.vision import train_vision

    _signal_in_vision_step(monkeypatch, at=1)
    with pytest.raises(KeyboardInterrupt):
        train_vision(_vision_config(tmp_path / "run", train_subset=96))
    assert load_checkpoint(tmp_path / "run").state["step"] == 2
    assert _handlers() == [_caller, _caller]


def test_ctrl_c_in_the_last_step_of_train_vision_still_reaches_the_caller(
    caller_handlers: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C that lands in the last step (or the final evaluation or save) was noted ("stopping after
    this step"), then dropped: ``train_vision`` returned normally and a notebook cell that trains several
    models went on to the next one. The run is complete (its model written), and the caller stops too."""
    from gmlp.train.vision import train_vision

    _signal_in_vision_step(monkeypatch, at=1)  # 2 steps: the last
    with pytest.raises(KeyboardInterrupt):
        train_vision(_vision_config(tmp_path / "run"))
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert _handlers() == [_caller, _caller]


def test_ctrl_c_in_the_last_step_of_finetune_still_reaches_the_caller(
    caller_handlers: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for ``finetune`` (and ``pretrain``: one loop): a stop requested in the last step was dropped
    ("the end: finish") and the call returned normally."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from gmlp.train import text as pipelines
    from tiny_text import tiny_classification_files

    tok, data = tiny_classification_files(tmp_path)
    real = pipelines.step_seed

    def step_seed(seed: int, *keys: Any) -> int:
        if keys[:2] == ("dropout", 0):
            os.kill(os.getpid(), signal.SIGINT)
        return real(seed, *keys)

    monkeypatch.setattr(pipelines, "step_seed", step_seed)
    with pytest.raises(KeyboardInterrupt):
        pipelines.finetune(pipelines.FinetuneConfig(
            output=str(tmp_path / "run"), train_file=str(data), validation_file=str(data), steps=1,
            tokenizer=str(tok), layers=1, hidden=16, ffn=32, seq_len=16, batch_size=4, device="cpu",
            progress=False, save_every=0))
    assert _handlers() == [_caller, _caller]


def test_ctrl_c_during_the_last_checkpoint_of_finetune_stops_it_and_resume_finishes(
    caller_handlers: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C while the last step's checkpoint is written (shielded: the save finishes) was noted ("stopping
    after this step"), then dropped: the loop had decided before the save, and the call wrote ``final/`` and
    returned. Now it stops there like any other stop (no ``final/``), and ``--resume`` finishes the run."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from gmlp.train import text as pipelines
    from tiny_text import tiny_classification_files

    tok, data = tiny_classification_files(tmp_path)
    real = pipelines.save_checkpoint

    def save_checkpoint(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipelines, "save_checkpoint", save_checkpoint)
    cfg = pipelines.FinetuneConfig(
        output=str(tmp_path / "run"), train_file=str(data), validation_file=str(data), steps=2,
        tokenizer=str(tok), layers=1, hidden=16, ffn=32, seq_len=16, batch_size=4, device="cpu",
        progress=False, save_every=0)
    with pytest.raises(KeyboardInterrupt):
        pipelines.finetune(cfg)
    assert not (tmp_path / "run" / "final").exists()
    assert _handlers() == [_caller, _caller]
    monkeypatch.setattr(pipelines, "save_checkpoint", real)
    pipelines.finetune(dataclasses.replace(cfg, resume=True))
    assert (tmp_path / "run" / "final").is_dir()


def _tensorboard_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if type(t).__name__ == "_AsyncWriterThread"]


def test_a_train_vision_that_fails_leaves_no_tensorboard_writer_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that raised (an error, a second Ctrl-C, a non-finite loss) left its ``SummaryWriter`` open: one
    more writer thread for each failed run in a notebook or service, and its last scalars unwritten until
    the writer's next timed flush."""
    pytest.importorskip("tensorboard")
    import gmlp.train.vision as vision

    real = vision.step_seed

    def failing(seed: int, step: int) -> int:
        if step == 1:
            raise RuntimeError("the run failed")
        return real(seed, step)

    monkeypatch.setattr(vision, "step_seed", failing)
    before = _tensorboard_threads()
    with pytest.raises(RuntimeError, match="the run failed"):
        vision.train_vision(_vision_config(tmp_path / "run", tensorboard=True))
    assert _tensorboard_threads() == before


def _process_state() -> dict[str, Any]:
    fds = {}
    for fd in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else []:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # (the listing's own descriptor, closed by now)
            continue
        if "/mpl-data/fonts/" not in target:  # (matplotlib's font cache: one per thread, bounded; its own)
            fds[fd] = target
    loggers = {name: (list(lg.handlers), lg.level, lg.propagate)
               for name, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    return {"fds": fds, "argv": list(sys.argv), "env": dict(os.environ), "cwd": os.getcwd(),
            "filters": list(warnings.filters), "root_log": (list(logging.root.handlers), logging.root.level),
            "loggers": loggers, "signals": _handlers(), "threads": torch.get_num_threads(),
            "excepthook": (sys.excepthook, threading.excepthook), "showwarning": warnings.showwarning,
            "live_threads": sorted(t.name for t in threading.enumerate())}


def test_a_second_train_vision_changes_nothing_the_first_left(caller_handlers: None, tmp_path: Path) -> None:
    """After a first run (which may import and set up what a process keeps: matplotlib's font files, tqdm's
    monitor thread, third-party loggers), a second one, in the main thread and then in a worker thread,
    leaves the process exactly as it found it: no file descriptor, thread, logging handler (its output would
    be printed twice) or warning filter more, the same ``sys.argv``, environment, directory, signal
    handlers, excepthooks and thread count."""
    from gmlp.train.vision import train_vision

    train_vision(_vision_config(tmp_path / "first", plot=True))
    before = _process_state()
    second = train_vision(_vision_config(tmp_path / "second", plot=True))
    after_main = _process_state()
    results: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: results.setdefault("third", train_vision(
        _vision_config(tmp_path / "third", plot=True))))
    worker.start()
    worker.join()
    after_thread = _process_state()
    for after in (after_main, after_thread):
        for key, value in before.items():
            assert after[key] == value, key
    assert {k: v for k, v in results["third"].items() if k != "epoch_seconds"} == {
        k: v for k, v in second.items() if k != "epoch_seconds"}
