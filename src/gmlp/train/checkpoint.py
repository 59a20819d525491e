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
import datetime
import errno
import json
import numbers
import os
import re
import shutil
import socket
import stat
import tempfile
import warnings
from collections.abc import Iterator
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
from .recipe import ConfigError

__all__ = ["Checkpoint", "latest_checkpoint", "load_checkpoint", "remove_run_files", "run_lock",
           "save_checkpoint", "write_json_atomic"]

_LATEST = "latest.json"
_RUN_LOCK = ".gmlp-run.lock"  # held (flock) by the process that writes the run folder
#: What flock raises on a file system without locks (some network and FUSE file systems).
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
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
    named = _latest_tag(root)
    if named is not None:  # first what this save would prune anyway (checkpoints beyond keep_last, e.g. after
        # a resume with a lower --keep-last, and the temporaries of killed saves): a disk that the last save
        # filled has room for this one only then
        _prune(root, keep_last, keep=named, stale=".step-*.tmp")
    tmp: Path | None = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{tag}.", suffix=".tmp", dir=root))
        os.chmod(tmp, stat.S_IMODE(root.stat().st_mode))  # mkdtemp's 0700 would stay on the checkpoint
        save_state_dict_file(model_state, tmp / "model.safetensors", metadata)
        with atomic_write(tmp / "optimizer.pt") as f, open(f, "wb") as opened:
            # (through a file object: a full disk's OSError is kept in the chain of torch's RuntimeError)
            torch.save(optimizer_state, opened)
        write_json_atomic(tmp / "state.json", {**state, "step": step})
        _fsync_dir(tmp)
        replace_dir(tmp, final)  # (the same step saved again, e.g. after a resume: swapped out whole)
        _fsync_dir(root)
    except OSError as err:  # a full disk, a read-only folder: name the checkpoint file, not the temporary
        _drop_unnamed(root, tag)
        raise _renamed(err, tmp, final) from err
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_json_atomic(root / _LATEST, {"tag": tag, "step": step})
    except BaseException:
        _drop_unnamed(root, tag)
        raise
    _prune(root, keep_last, keep=tag)
    return final


def _drop_unnamed(root: Path, tag: str) -> None:
    """After a failed save of ``tag``: remove what of it is in place if ``latest.json`` does not name it (it
    would take the room the next save needs, and count as one of ``keep_last``), or else put back the one a
    re-save of it swapped out (:func:`latest_checkpoint` does)."""
    if _latest_tag(root) != tag:
        shutil.rmtree(root / tag, ignore_errors=True)
        shutil.rmtree(root / f".{tag}.old", ignore_errors=True)
    else:
        with contextlib.suppress(OSError, CheckpointError):
            latest_checkpoint(root.parent)


def _renamed(err: OSError, tmp: Path | None, final: Path) -> OSError:
    """``err``, raised while checkpoint ``final`` was written into the temporary folder ``tmp``, naming the
    file of ``final`` it was about (the temporary is gone by the time anyone reads the message); an error
    about another file is returned as it is."""
    name = None if err.filename is None else Path(os.fspath(err.filename))
    if err.errno is None:
        return err
    if name is None or (name.parent == final.parent and name.name.startswith(f".{final.name}.")):
        where = final  # (no file named, or mkdtemp's folder, or replace_dir's .step-N.old)
    elif tmp is not None and name.is_relative_to(tmp):
        where = final / name.relative_to(tmp)
    else:
        return err
    return OSError(err.errno, err.strerror or os.strerror(err.errno), str(where))


def _latest_tag(root: Path) -> str | None:
    """The tag ``root/latest.json`` names, or None (no such file, or not one to rely on)."""
    try:
        record = json.loads((root / _LATEST).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    tag = record.get("tag") if isinstance(record, dict) else None
    return tag if isinstance(tag, str) and _TAG.fullmatch(tag) else None


def _prune(root: Path, keep_last: int, keep: str, stale: str = ".step-*") -> None:
    """Remove the checkpoints of ``root`` older than the ``keep_last`` newest, never ``keep``, and what
    matches ``stale`` (the temporaries of killed saves)."""
    # by step, not by name: past 99,999,999 steps the names grow a digit ("step-100000000" < "step-99999999")
    tags = sorted((p.name for p in root.glob("step-*") if p.is_dir() and _TAG.fullmatch(p.name)),
                  key=lambda t: int(t[5:]))
    for tag in tags[:-keep_last]:
        if tag != keep:
            shutil.rmtree(root / tag, ignore_errors=True)
    for path in root.glob(stale):  # temporaries of runs killed mid-write
        shutil.rmtree(path, ignore_errors=True)


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


def _make_run_dir(out: Path) -> list[Path]:
    """Create the run folder ``out`` (and its parents); return the folders it created, deepest first. A
    ConfigError when a file is in the way; the OSError (naming the folder) when one cannot be made."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {str(out)!r} is a file, not a folder: give the folder the run writes into "
                          f"(a new one, or that of the run to continue)")
    made = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), out)
        raise ConfigError(f"output {str(out)!r} cannot be created: {str(blocker)!r} is a file, not a "
                          f"folder") from err
    except OSError:
        _remove_empty(made)
        raise
    return made


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are there and empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError:  # (not empty: nor are those above it)
            return


def _holder(fd: int) -> str:
    """Who holds the lock file open as ``fd``, as its holder wrote it (pid, host, start time)."""
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        record = {}
    if not isinstance(record, dict) or "pid" not in record:
        return "a process that has not yet written who it is"
    return f"pid {record.get('pid')} on host {record.get('host')}, started {record.get('started')}"


@contextlib.contextmanager
def run_lock(run_dir: str | Path, enabled: bool = True) -> Iterator[None]:
    """Hold the run folder ``run_dir`` for this process while the block runs: another run given the same
    folder (on this machine, or on another sharing the file system) is refused at once, with a ConfigError
    naming the holder (pid, host, start time), instead of both writing checkpoints and metrics over each
    other's without a word. ``enabled=False`` (the processes of a distributed run other than the one that
    writes) does nothing.

    The lock is an ``flock`` of ``run_dir/.gmlp-run.lock``, which the kernel releases when its process ends
    in any way (``kill -9`` included): a dead run never keeps a folder. The file is removed when the block
    ends. Taking it is also the run's first write into the folder, so an output that is a file, or a folder
    that cannot be written (read-only, no permission, a full disk), is refused here, before any training.
    A folder this created is removed again if the block leaves it empty (a run refused for a setting). On a
    file system without locks the run goes on unlocked, with a warning.

    Raises:
        ConfigError: the folder is in use by another run, or it (or a folder above it) is a file.
        OSError: the folder or the lock file cannot be written (its errno: ``PermissionError``, EROFS,
            ENOSPC), naming the path.
    """
    if not enabled:
        yield
        return
    out = Path(run_dir)
    made = _make_run_dir(out)
    path = out / _RUN_LOCK
    try:
        import fcntl
    except ImportError:  # (Windows: no flock)
        fcntl = None  # type: ignore[assignment]
    fd = -1
    try:
        writable = True
        while True:
            try:  # (0o666 and the umask: another user of a shared run folder may take it after this run)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except PermissionError:
                if not path.is_file():
                    raise
                # left by a run of another user killed with -9: flock needs no write access
                fd, writable = os.open(path, os.O_RDONLY), False
            if fcntl is None:  # (no flock: the folder is not held; nothing is written either)
                writable = False
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                raise ConfigError(
                    f"output {str(out)!r} is in use by another run ({holder}; lock file {path}): two runs "
                    f"in one folder overwrite each other's checkpoints and metrics. Give another --output, "
                    f"or wait until that run ends (the lock goes with its process, however it ends)"
                ) from None
            except OSError as err:
                if err.errno not in _NO_LOCKS:
                    raise
                warnings.warn(f"{path}: the file system takes no locks ({err.strerror}); nothing stops "
                              f"another run from writing into {out} at the same time", stacklevel=3)
                break
            try:  # the holder that just ended may have removed the file between open and flock: lock anew
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
            fd = -1
        if writable:
            started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started})
            os.ftruncate(fd, 0)
            os.pwrite(fd, (record + "\n").encode(), 0)
    except OSError as err:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        _remove_empty(made)
        if err.filename is not None or err.errno is None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err  # (os.write's names no file)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        _remove_empty(made)
        raise
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # (still held: a run waiting to open it finds it gone, and makes its own)
        os.close(fd)
        _remove_empty(made)  # (only if empty: a run refused before it wrote anything)
