"""Training checkpoints: written atomically, resumed without losing completed steps.

Layout of a run directory::

    RUN/checkpoints/step-00001200/model.safetensors   model weights (safetensors)
    RUN/checkpoints/step-00001200/optimizer.pt        optimizer (+ scheduler, scaler) state, tensors only
    RUN/checkpoints/step-00001200/state.json          step, epoch, config, RNG seed, metrics
    RUN/checkpoints/latest.json                        {"tag": "step-00001200"}

A checkpoint directory is filled under a temporary name, fsynced, then renamed into place, and only then
does ``latest.json`` (itself replaced atomically) point to it. A process killed at any moment leaves the
previous checkpoint intact and ``latest.json`` pointing at a complete one. Older checkpoints beyond
``keep_last`` are pruned after the new one is in place; the one ``latest.json`` names is never deleted.
This is the one place checkpoints are written: the vision and text pipelines both call it.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import re
import shutil
import stat
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..utils.io import (
    CheckpointError,
    _code_running_pickle_error,
    atomic_write,
    load_state_dict_file,
    replace_dir,
    save_state_dict_file,
)

__all__ = ["Checkpoint", "latest_checkpoint", "load_checkpoint", "remove_run_files", "save_checkpoint",
           "write_json_atomic"]

_LATEST = "latest.json"
_TAG = re.compile(r"step-(\d{8,})")  # what save_checkpoint names a checkpoint: step-{step:08d}


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns."""

    path: Path
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    state: dict[str, Any]


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    *,
    keep_last: int = 2,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write checkpoint ``step-{step:08d}`` under ``run_dir/checkpoints`` atomically and point latest at it.

    Args:
        run_dir: the run directory.
        step: the number of completed optimizer steps (the checkpoint's name).
        model_state: model ``state_dict()`` (saved as safetensors).
        optimizer_state: anything ``torch.load(weights_only=True)`` can read back (optimizer, scheduler
            and grad-scaler state dicts).
        state: JSON-serialisable training state (``step`` is added).
        keep_last: how many checkpoints to keep (>= 1).
        metadata: string metadata stored in the safetensors header.

    Returns:
        The checkpoint directory.
    """
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"step must be an int >= 0 (completed optimizer steps), got {step!r}")
    if isinstance(keep_last, bool) or not isinstance(keep_last, numbers.Integral) or keep_last < 1:
        raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
    step, keep_last = int(step), int(keep_last)  # (a NumPy integer would not go into state.json)
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tag = f"step-{step:08d}"
    final = root / tag
    tmp = Path(tempfile.mkdtemp(prefix=f".{tag}.", suffix=".tmp", dir=root))
    try:
        os.chmod(tmp, stat.S_IMODE(root.stat().st_mode))  # mkdtemp's 0700 would stay on the checkpoint
        save_state_dict_file(model_state, tmp / "model.safetensors", metadata)
        with atomic_write(tmp / "optimizer.pt") as f:
            torch.save(optimizer_state, f)
        write_json_atomic(tmp / "state.json", {**state, "step": step})
        _fsync_dir(tmp)
        replace_dir(tmp, final)  # (the same step saved again, e.g. after a resume: swapped out whole)
        _fsync_dir(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json_atomic(root / _LATEST, {"tag": tag, "step": step})
    _prune(root, keep_last, keep=tag)
    return final


def _prune(root: Path, keep_last: int, keep: str) -> None:
    # by step, not by name: past 99,999,999 steps the names grow a digit ("step-100000000" < "step-99999999")
    tags = sorted((p.name for p in root.glob("step-*") if p.is_dir() and _TAG.fullmatch(p.name)),
                  key=lambda t: int(t[5:]))
    for tag in tags[:-keep_last]:
        if tag != keep:
            shutil.rmtree(root / tag, ignore_errors=True)
    for stale in root.glob(".step-*"):  # temporaries of runs killed mid-write
        shutil.rmtree(stale, ignore_errors=True)


def remove_run_files(run_dir: str | Path, names: tuple[str, ...]) -> None:
    """Delete the files and folders ``names`` of a run folder (those missing are skipped): what a run
    started again with ``--overwrite`` removes of the previous one, and nothing else. A symbolic link among
    them (e.g. ``checkpoints`` kept on another disk) is removed itself: what it points to is never followed
    into, nor deleted."""
    for name in names:
        path = Path(run_dir) / name
        if path.is_symlink():  # (before is_dir, which follows it: rmtree refuses a link, with an OSError)
            warnings.warn(
                f"{path} is a symbolic link (to {os.readlink(path)}): --overwrite removes the link and "
                f"leaves what it points to as it is; the new run writes a {name} of its own there",
                stacklevel=2,
            )
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The directory of the newest complete checkpoint of a run, or None if it has none."""
    root = Path(run_dir) / "checkpoints"
    latest = root / _LATEST
    if not latest.is_file():
        return None
    try:
        record = json.loads(latest.read_text())
    except (ValueError, RecursionError) as err:  # (JSONDecodeError, UnicodeDecodeError; deep nesting)
        raise CheckpointError(f"{latest} is corrupt: {type(err).__name__}: {str(err)[:200]}") from err
    tag = record.get("tag") if isinstance(record, dict) else None
    if not isinstance(tag, str) or not _TAG.fullmatch(tag):
        # (a tag is also never a path: "../x" would lead a resume out of the run folder)
        raise CheckpointError(
            f"{latest} is corrupt or foreign: expected {{\"tag\": \"step-NNNNNNNN\", ...}}, got "
            f"{json.dumps(record)[:200]}"
        )
    path = root / tag
    swapped = root / f".{tag}.old"
    if not path.exists() and (swapped / "state.json").is_file():
        # killed while save_checkpoint swapped a re-save of this step in: the old one is complete
        with contextlib.suppress(OSError):  # (another process may have put it back already)
            os.replace(swapped, path)
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{latest} names {tag}, but {path} is missing or incomplete")
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint directory, or the latest checkpoint of a run directory.

    Raises:
        FileNotFoundError: nothing to resume from.
        CheckpointError: the checkpoint is incomplete or corrupt.
    """
    path = Path(path)
    if not (path / "state.json").is_file():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {str(path)!r} (expected {path}/checkpoints/{_LATEST})")
        path = found
    try:
        model, _ = load_state_dict_file(path / "model.safetensors")
    except FileNotFoundError as err:  # a checkpoint without weights is incomplete, not absent
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: {err}") from err
    try:
        optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: it has no optimizer.pt") from err
    except Exception as err:  # corrupt bytes fail torch.load in many ways (UnpicklingError, RuntimeError..)
        malicious = _code_running_pickle_error(path / "optimizer.pt", err)
        if malicious is not None:  # (not "corrupt": torch's message would then advise weights_only=False)
            raise malicious from err
        if "Unsupported global" in str(err):  # sound, but not tensors alone: not a file these functions wrote
            raise CheckpointError(
                f"cannot read {str(path / 'optimizer.pt')!r} safely: besides tensors it holds Python "
                f"objects, which loading with weights_only=True refuses (a checkpoint gmlp did not write?)"
            ) from err
        first_line = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated or corrupt: its optimizer.pt does not load "
            f"({type(err).__name__}: {first_line})"
        ) from err
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError, RecursionError) as err:  # (JSONDecodeError and UnicodeDecodeError are
        # ValueErrors; a crafted file nested thousands of levels deep fails with a RecursionError)
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated or corrupt: its state.json does not load "
            f"({type(err).__name__}: {str(err)[:200]})"
        ) from err
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: its state.json gives no step")
    return Checkpoint(path=path, model=model, optimizer=optimizer, state=state)
