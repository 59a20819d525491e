"""Stopping a training run cleanly on SIGINT / SIGTERM (Ctrl-C, Slurm or Kubernetes preemption, ``torchrun``
forwarding its SIGTERM to every worker).

:class:`StopRequest` turns the first signal into a flag that the training loop reads between optimizer steps
(it then saves a checkpoint and raises ``KeyboardInterrupt``, which the ``gmlp`` CLI reports with exit status
130); a second signal aborts at once, except inside :meth:`StopRequest.shielded` (a checkpoint being written),
which it lets finish first. Used by ``gmlp train`` (:mod:`gmlp.train.vision`) and the text commands
(:mod:`gmlp.train.text`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["STOP_SIGNALS", "StopRequest", "ignore_stop_signals"]

#: The signals that ask a run to stop (Ctrl-C; a scheduler's or torchrun's termination request).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _say(message: str) -> None:
    """``message`` to standard error from a signal handler: straight to file descriptor 2, not through
    ``sys.stderr``, whose buffered writer a progress bar may be inside when the signal arrives (Python
    then raised "reentrant call inside BufferedWriter" in the training loop, which stopped without a
    checkpoint)."""
    with contextlib.suppress(OSError):
        os.write(2, message.encode("utf-8", "replace"))


class StopRequest:
    """While entered (in the main thread only: ``signal.signal`` works nowhere else), SIGINT and SIGTERM set
    :attr:`requested`, and the caller stops at its next safe point; a second signal raises
    ``KeyboardInterrupt`` at once, or, inside :meth:`shielded`, when that block ends. The handlers that were
    installed before are put back on exit, also when the block raises.

    A process forked while the handlers are installed (a DataLoader worker) inherits them; there they do
    nothing, so that a signal sent to the whole process group (Ctrl-C in a terminal) is the main process's
    to act on.

    Putting the handlers back is not cut short by a signal: every one is put back even when a signal arrives
    meanwhile (Ctrl-C pressed again as an aborted run unwinds), and a signal that arrives while they are put
    back is passed on to the handler put back for it (the caller's ``KeyboardInterrupt``), not dropped.
    Before, such a signal raised in the middle, and the handler of the other signal stayed installed for the
    rest of the process (a later SIGTERM then raised ``KeyboardInterrupt`` instead of reaching the caller's
    handler).
    """

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None  # the first signal's number
        self._old: dict[int, Any] = {}
        self._pid = os.getpid()
        self._shield = 0  # depth of shielded() blocks
        self._abort_pending = False
        self._closing = False  # in __exit__: a signal is noted (in _late), not acted on
        self._late: list[int] = []  # signals that arrived while the handlers were put back

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._closing, self._late = False, []
            try:
                for sig in STOP_SIGNALS:
                    self._old[sig] = signal.signal(sig, self._handle)
            except BaseException:  # (a signal's handler raised midway: none of ours stays installed)
                self._put_back()
                raise
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked child (DataLoader worker): the parent decides
            return
        if self._closing:  # the handlers are being put back: passed on to the caller's when they are
            self._late.append(signum)
            return
        if self.requested:  # a second signal: stop right away (once a save in progress is written)
            if self._shield:
                self._abort_pending = True
                _say(f"\n[gmlp] signal {signum}: aborting once the checkpoint being written is complete\n")
                return
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        _say(f"\n[gmlp] signal {signum}: stopping after this step (checkpoint); again to abort\n")

    @contextlib.contextmanager
    def shielded(self) -> Iterator[None]:
        """A block that a second signal does not cut short (a checkpoint save): the abort it asks for is
        raised when the block has finished (not when the block raised an error of its own)."""
        self._shield += 1
        try:
            yield
        finally:
            self._shield -= 1
        if self._abort_pending and not self._shield:
            self._abort_pending = False
            raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        if not self._old:
            return
        self._put_back()
        late, self._late = self._late, []
        for sig in dict.fromkeys(late):  # (once each: the caller's handler sees what it would have seen)
            signal.raise_signal(sig)

    def _put_back(self) -> None:
        """Put the handlers that were installed before back, in the reverse order (SIGINT, the one pressed
        again and again, last). Meanwhile ours note a signal (for :meth:`__exit__` to pass on) instead of
        raising; a handler of the caller's already put back that raises (``signal.signal`` runs the handlers
        of pending signals first, and then installs nothing) does not keep the rest from being put back: its
        exception is raised when they are."""
        self._closing = True
        pending = list(self._old.items())[::-1]
        self._old.clear()
        error: BaseException | None = None
        try:
            for sig, old in pending:
                # (None: a handler not installed from Python, which cannot be put back; the default instead)
                handler = signal.SIG_DFL if old is None else old
                for _ in range(3):  # (again after an exception: the signal it came from has been handled)
                    try:
                        signal.signal(sig, handler)
                        break
                    except BaseException as err:  # noqa: PERF203  (a KeyboardInterrupt too)
                        error = error or err
        finally:
            self._closing = False
        if error is not None:
            raise error


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: the worker ignores SIGINT and SIGTERM. Ctrl-C in a terminal and a
    Slurm job's SIGTERM reach every process of the job, the workers too; a worker that died of them
    stopped the run with "DataLoader worker ... exited unexpectedly" before the main process could finish
    its step and save. Workers still end when the main process shuts them down or exits."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
