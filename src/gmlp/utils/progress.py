"""The training loops' progress output: a tqdm bar on a terminal, whole lines in a log file."""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Any

__all__ = ["LineProgress", "progress_bar"]

#: What ``TQDM_DISABLE`` may be set to and still leave the bars on (any other value turns them off).
_FALSE_WORDS = ("", "0", "false", "no", "off")


def _progress_disabled_by_env() -> bool:
    """Whether the environment turns progress bars off: ``TQDM_DISABLE`` set to anything but 0/false/no/off
    (tqdm's own switch, which a bar made with an explicit ``disable=`` ignores)."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in _FALSE_WORDS


def _interactive(stream: Any) -> bool:
    """Whether ``stream`` is shown live to someone, where a bar redrawn in place (``\\r``) reads well: a
    terminal, or a Jupyter kernel's output (which tqdm.auto draws as a widget)."""
    if "ipykernel" in sys.modules:
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # (None, a closed file, an object without isatty)
        return False


class LineProgress:
    """A progress report for output that is not a terminal (a Slurm ``--output`` file, ``nohup``, a
    Kubernetes log): one whole line per :meth:`set_postfix` call (the training loops call it once per log
    interval), never the ``\\r`` redraws a tqdm bar writes there up to ten times a second. With ``file=None``
    it prints no progress at all (the bar is off); :meth:`write` prints either way.

    It has the part of tqdm's interface the training loops use: ``update``, ``set_postfix``, ``write``,
    ``close`` and ``n``.
    """

    def __init__(self, total: int, *, desc: str = "", initial: int = 0, file: Any = None) -> None:
        self.total, self.desc, self.initial, self.n = total, desc, initial, initial
        self.file = file
        self.disable = file is None
        self._start = time.monotonic()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more steps done (no output)."""
        self.n += n

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True,
                    **kwargs: Any) -> None:
        """Print one line: the steps done, the elapsed and remaining time, the rate and ``kwargs``
        (``loss=..., lr=...``), as a tqdm bar shows them, without the bar."""
        if self.file is None:
            return
        from tqdm import tqdm

        postfix = {**(ordered_dict or {}), **kwargs}
        line = tqdm.format_meter(
            self.n, self.total, time.monotonic() - self._start, prefix=self.desc, initial=self.initial,
            postfix=", ".join(f"{k}={v}" for k, v in postfix.items()),
            bar_format="{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) [{elapsed}<{remaining}, "
                       "{rate_fmt}{postfix}]",
        )
        print(line, file=self.file, flush=True)

    @staticmethod
    def write(s: str, file: Any = None, end: str = "\n") -> None:
        """Print ``s`` (a result line: an evaluation's) to ``file`` (default: stdout), flushed at once."""
        print(s, file=file if file is not None else sys.stdout, end=end, flush=True)

    def close(self) -> None:
        """Nothing to clear (the lines stay)."""


def progress_bar(total: int, *, desc: str, initial: int = 0, enabled: bool = True, leave: bool = True) -> Any:
    """The progress display of a training loop, fit for where stderr goes.

    - ``enabled`` false, or ``TQDM_DISABLE`` set (to anything but 0/false/no/off): no progress output.
    - stderr a terminal (or a Jupyter kernel): a tqdm bar (``tqdm.auto``), redrawn in place.
    - otherwise (a log file, a pipe): a :class:`LineProgress`, one line on stderr per log interval. A tqdm
      bar there wrote every redraw (``\\r`` and ~100 bytes, up to 10 a second, and at every postfix) one
      after another into a single line of the file: tens to hundreds of MB over a multi-day run, which
      ``tail``, ``grep`` and ``less`` then read as one line.

    In every case ``write`` prints a line to stdout and flushes it (a block-buffered stdout kept result lines
    back from ``tail -f`` for hours, and a killed job lost them).

    Args:
        total: the steps the bar counts to; ``initial`` of them are done already (a resumed run).
        desc: the label of the bar or lines (``epoch 3/300``, ``pretrain``).
        enabled: False for no progress output (``--no-progress``, or a process other than the main one).
        leave: whether a terminal bar stays on screen when closed (tqdm's ``leave``).
    """
    if not enabled or _progress_disabled_by_env():
        return LineProgress(total, desc=desc, initial=initial, file=None)
    if not _interactive(sys.stderr):
        return LineProgress(total, desc=desc, initial=initial, file=sys.stderr)
    return _flushing_tqdm()(total=total, initial=initial, desc=desc, leave=leave, dynamic_ncols=True)


@functools.cache
def _flushing_tqdm() -> type:
    """``tqdm.auto.tqdm`` whose ``write`` also flushes the stream it wrote to (made once, on first use:
    tqdm is imported only by a run that draws a bar)."""
    from tqdm.auto import tqdm

    class FlushingTqdm(tqdm):  # type: ignore[misc,valid-type]
        @classmethod
        def write(cls, s: str, file: Any = None, end: str = "\n", nolock: bool = False) -> None:
            super().write(s, file=file, end=end, nolock=nolock)
            (file if file is not None else sys.stdout).flush()

    return FlushingTqdm
