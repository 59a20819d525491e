"""TensorBoard event files of a training run (``OUTPUT/tensorboard``), shared by the training commands.

``tensorboard`` is an optional package: a run writes event files when it is installed (``enabled=None``, the
default of the commands' ``--tensorboard`` / ``--no-tensorboard``), requires it with ``enabled=True`` and
writes none with ``enabled=False``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["add_record", "open_writer", "require_tensorboard"]

_MISSING = "--tensorboard needs the tensorboard package (pip install tensorboard)"


def require_tensorboard() -> None:
    """Raise the error :func:`open_writer` raises with ``enabled=True`` when tensorboard is not installed,
    without importing it: for the processes of a multi-process run that write no event files, so that they
    stop with process 0 instead of waiting for it in their next collective."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise ModuleNotFoundError(_MISSING, name="tensorboard")


def open_writer(log_dir: str | Path, enabled: bool | None, purge_step: int | None = None) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` writing into ``log_dir``, or None (``enabled`` False, or
    None and tensorboard not installed).

    ``purge_step``: a resumed run's first step. TensorBoard then hides the points that earlier event files
    of ``log_dir`` hold at that step and after (they are written again by the resumed run): give the step
    after the checkpoint's (``step + 1``), since the points logged at the checkpoint's own step are not
    logged again, or the checkpoint's step together with writing those points again.

    Raises:
        ImportError: ``enabled`` is True and tensorboard is not installed (naming the flag and the package).
    """
    if enabled is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if enabled:
            raise ImportError(_MISSING) from None
        return None
    return SummaryWriter(str(log_dir), purge_step=purge_step)


def add_record(writer: Any, record: Mapping[str, Any], step: int, prefix: str) -> None:
    """Write each number of ``record`` (ints and floats, not bools; a NaN or infinity too) as the scalar
    ``PREFIX/KEY`` at ``step``; ``step`` itself and other values (strings, None, lists) are left out."""
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        writer.add_scalar(f"{prefix}/{key}", float(value), step)
