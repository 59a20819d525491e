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
    """

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None  # the first signal's number
        self._old: dict[int, Any] = {}
        self._pid = os.getpid()
        self._shield = 0  # depth of shielded() blocks
        self._abort_pending = False

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked child (DataLoader worker): the parent decides
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
        for sig, old in self._old.items():
            # (None: a handler not installed from Python, which cannot be put back; the default instead)
            signal.signal(sig, signal.SIG_DFL if old is None else old)
        self._old.clear()


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: the worker ignores SIGINT and SIGTERM. Ctrl-C in a terminal and a
    Slurm job's SIGTERM reach every process of the job, the workers too; a worker that died of them
    stopped the run with "DataLoader worker ... exited unexpectedly" before the main process could finish
    its step and save. Workers still end when the main process shuts them down or exits."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
