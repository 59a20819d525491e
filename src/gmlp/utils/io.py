"""Safe weight I/O: atomic writes, safetensors or ``torch.load(weights_only=True)`` reads, clear errors."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import stat
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "CheckpointError",
    "append_line",
    "atomic_dir",
    "atomic_write",
    "load_state_dict_file",
    "naming_write_errors",
    "read_jsonl_records",
    "replace_dir",
    "save_state_dict_file",
]

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile, wrapped in either order


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, or its keys/shapes do not fit the model."""


def _new_temp_file(path: Path) -> tuple[Path, int]:
    """Create an empty file next to ``path``; return it and the mode a plain ``open(path, "w")`` gives.

    (``tempfile.mkstemp`` makes it 0600 whatever the umask, as safetensors' own writer does.)
    """
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies
        except FileExistsError:
            continue
        return tmp, stat.S_IMODE(os.stat(tmp).st_mode)


#: How safetensors (Rust) reports an OS error: "... I/O error: No space left on device (os error 28)".
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _os_error_of(err: BaseException) -> OSError | None:
    """The OS error (with an errno) that made a write fail: ``err`` itself, one it was raised from or while
    handling (``torch.save`` to a file object wraps a full disk's ``OSError`` in a ``RuntimeError``
    "unexpected pos ..."), or the errno in the message of a safetensors ``SafetensorError``; None when there
    is none."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current
        found = _RUST_OS_ERROR.search(str(current))
        if found is not None:
            number = int(found.group(1))
            return OSError(number, os.strerror(number))
        current = current.__cause__ or current.__context__
    return None


def _write_error(err: BaseException, written: Path | str, named: Path | str) -> OSError | None:
    """``err``, a failed write of ``written`` (a temporary name), as an ``OSError`` of the same errno (so the
    same subclass: ``PermissionError`` for EACCES) that names ``named``, the file or folder it was to become,
    instead of the temporary's name or none (a full disk's ``OSError`` from ``write`` has no file name), or
    instead of torch's or safetensors' own error, which hides the errno. None where ``err`` holds no OS error,
    or one about another file (an input read while writing): that is raised as it is."""
    found = _os_error_of(err)
    if found is None:
        return None
    filename = None if found.filename is None else os.fspath(found.filename)
    if filename is not None and not (filename == os.fspath(written)
                                     or filename.startswith(os.fspath(written) + os.sep)):
        return None
    return OSError(found.errno, found.strerror or os.strerror(found.errno), os.fspath(named))


@contextlib.contextmanager
def naming_write_errors(written: Path | str, named: Path | str) -> Iterator[None]:
    """Raise an error of the block that holds an OS error about ``written`` (a temporary) as the ``OSError``
    :func:`_write_error` makes of it, naming ``named``; other errors as they are."""
    try:
        yield
    except Exception as err:
        clear = _write_error(err, written, named)
        if clear is None or (isinstance(err, OSError) and str(err) == str(clear)):
            raise
        raise clear from err


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and ``os.replace`` it onto ``path``.

    A crash at any moment leaves either the old file or the new one, never a half-written file. The new
    file keeps the permissions of the one it replaces (a new one gets the umask's, as with ``open``).

    Raises:
        IsADirectoryError: ``path`` is a directory.
        OSError: the file system refused the write (a full disk, a read-only folder, no permission): an
            ``OSError`` of its errno that names ``path``, whichever writer failed (a full disk fails
            ``torch.save`` with a ``RuntimeError`` and safetensors with a ``SafetensorError``, which hold the
            errno only in their chain or message). No temporary file is left beside ``path``.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {str(path)!r}: it is a directory, not a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path, mode = _new_temp_file(path)
    except OSError as err:  # (the temporary's name would say nothing of the file the user asked for)
        if err.filename is not None and not Path(os.fspath(err.filename)).name.endswith(".tmp"):
            raise  # (about the folder: named)
        raise OSError(err.errno, err.strerror, str(path)) from err
    try:
        with naming_write_errors(tmp_path, path):
            yield tmp_path
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            with contextlib.suppress(FileNotFoundError):  # keep the mode of the file being replaced
                mode = stat.S_IMODE(os.stat(path).st_mode)
            os.chmod(tmp_path, mode)  # (also where the body's writer made it anew, 0600 as mkstemp does)
            os.replace(tmp_path, path)
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def append_line(path: str | Path, line: str) -> None:
    """Append ``line`` and a newline to the text file ``path`` (made if missing), whole or not at all (e.g. a
    record of a ``metrics.jsonl``).

    A write the file system refuses part way (a full disk) is cut back off, so the file never ends in part of
    a line, and the ``OSError`` names ``path`` (``write``'s own names no file). A file that already ends in
    part of one (a process killed while writing it) gets the line on a line of its own: the part stays a
    line that readers skip, and does not spoil this one.

    Raises:
        OSError: the file system refused the write; the file is as it was.
    """
    path = Path(path)
    data = (line + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from err
    try:
        start = os.fstat(fd).st_size
        if start and os.pread(fd, 1, start - 1) != b"\n":
            data = b"\n" + data
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError as err:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise OSError(err.errno, err.strerror, str(path)) from err
    finally:
        os.close(fd)


def read_jsonl_records(path: str | Path, stacklevel: int = 2) -> list[tuple[str, dict[str, Any]]]:
    """The JSON objects of a ``.jsonl`` file (e.g. a ``metrics.jsonl``), one per line, each with its line as
    written. A line that is not one (cut short by a killed run, corrupt, not UTF-8, or JSON but not an
    object) is skipped with a warning naming the file and the first such line; blank lines are skipped
    silently. ``stacklevel`` is the warning's, as for :func:`warnings.warn`."""
    records, bad = [], []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        if isinstance(record, dict):
            records.append((line, record))
        else:
            bad.append(number)
    if bad:
        warnings.warn(
            f"{str(path)!r}: skipped {len(bad)} line(s) that are not JSON records (line {bad[0]} first)",
            stacklevel=stacklevel + 1,
        )
    return records


def _remove_entry(path: Path) -> None:
    """Remove ``path`` if it is there: a folder with all it holds, a file, or a symbolic link itself (never
    what the link points to; ``shutil.rmtree`` refuses a link, and with ``ignore_errors`` left it there)."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def replace_dir(tmp: str | Path, dest: str | Path) -> None:
    """Put the complete folder ``tmp`` in the place of ``dest`` (which may exist). A process killed at any
    moment leaves ``dest`` complete, the old one or the new one, or absent (the old one then waits in
    ``.NAME.old`` beside it), never partly removed, as removing the old folder first would. A ``dest`` that
    is a symbolic link is replaced itself (the folder it points to is left as it is)."""
    tmp, dest = Path(tmp), Path(dest)
    old = dest.with_name(f".{dest.name}.old")
    _remove_entry(old)
    if dest.exists() or dest.is_symlink():
        os.replace(dest, old)
    os.replace(tmp, dest)
    _remove_entry(old)


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``dest`` (``.NAME.tmp``) to write a whole folder into; when
    the block ends without an error it takes the place of ``dest`` (:func:`replace_dir`). The temporary
    folder is removed either way, so a failed write leaves ``dest`` as it was and nothing beside it."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    _remove_entry(tmp)  # (what a killed process left)
    tmp.mkdir(parents=True)
    try:
        with naming_write_errors(tmp, dest):  # a full disk while saving: an OSError naming dest
            yield tmp
            replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_state_dict_file(
    state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write ``state_dict`` as safetensors, atomically (contiguous CPU tensors; tied weights stored twice)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"cannot save state_dict[{key!r}]: it is a {type(value).__name__}, not a tensor")
        t = value.detach().to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr()
        if storage in seen:  # tied/overlapping views share storage, which safetensors refuses: store a copy
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[key] = t
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


#: What torch's weights-only unpickler says of a pickle that would call a function of a module it blocks
#: outright (``os``, ``subprocess``, ``builtins.eval``, ...): a file made to run code, not a corrupt one.
_BLOCKED_GLOBAL = re.compile(r"GLOBAL (\S+) whose module (\S+) is blocked")


def _code_running_pickle_error(path: str | Path, err: BaseException) -> CheckpointError | None:
    """A CheckpointError for a torch file that ``torch.load(weights_only=True)`` refused because loading it
    would call a function of a blocked module (a file made to run code when unpickled), else None. Its
    message warns against ``weights_only=False``, which torch's own message suggests."""
    found = _BLOCKED_GLOBAL.search(str(err))
    if found is None:
        return None
    return CheckpointError(
        f"refusing to read torch checkpoint {str(path)!r}: loading it would call {found.group(1)} (module "
        f"{found.group(2)}), which no file of weights needs: the file is made to run code when it is loaded. "
        f"Do not load it with weights_only=False"
    )


def _guarded(path: Path, what: str, fn: Callable[[], object]) -> object:
    try:
        return fn()
    except Exception as err:  # corrupt bytes fail the readers in many ways (UnpicklingError, IndexError, ...)
        malicious = _code_running_pickle_error(path, err)
        if malicious is not None:
            raise malicious from err
        if "Unsupported global" in str(err):  # a sound file holding objects besides tensors (not bad bytes)
            raise CheckpointError(
                f"cannot read torch checkpoint {str(path)!r} safely: besides tensors it holds Python objects "
                f"(e.g. the argparse.Namespace of a timm train.py checkpoint), which loading with "
                f"weights_only=True refuses. If you trust the file, save its weights alone: "
                f"torch.save(torch.load(path, weights_only=False)['state_dict'], 'weights.pth')"
            ) from err
        raise CheckpointError(
            f"cannot read {what} checkpoint {str(path)!r}: it is truncated or corrupt "
            f"({type(err).__name__}: {err})"
        ) from err


def _is_safetensors(path: Path) -> bool:
    """Whether ``path`` holds safetensors, told by its first bytes (a little-endian header size, then ``{``,
    which neither torch's zip nor its pickles have there), or by its name where they show neither that nor a
    torch file (a file truncated to a few bytes)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:] == b"{":
        return True
    if len(head) == 9 and head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip, or a pickle
        return False
    return path.suffix == ".safetensors"


def load_state_dict_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a state dict from ``.safetensors`` (safe) or a torch pickle with ``weights_only=True``.

    The format is told by the file's first bytes, whatever its name. Common wrappers
    (``{"state_dict": ...}``, ``{"model": ...}``), DDP ``module.`` and ``torch.compile`` ``_orig_mod.``
    prefixes are removed. A directory is read through its ``model.safetensors``.

    Returns:
        ``(state_dict, metadata)``; metadata is the safetensors header metadata (empty for pickles).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is truncated, corrupt, or holds no state dict (names to tensors).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {str(path)!r}")
    metadata: dict[str, str] = {}
    if _is_safetensors(path):
        from safetensors import safe_open

        def read() -> dict[str, torch.Tensor]:
            with safe_open(str(path), framework="pt") as f:
                metadata.update(f.metadata() or {})
            return load_file(str(path))

        state = _guarded(path, "safetensors", read)
    else:

        def read_torch() -> object:
            with open(path, "rb") as f:  # (a file object: torch.load takes a ".safetensors" name for its own)
                return torch.load(f, map_location="cpu", weights_only=True)

        state = _guarded(path, "torch", read_torch)
    if isinstance(state, dict):
        for key in _WRAPPER_KEYS:
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    tensors_only = isinstance(state, dict) and all(  # (str keys: an int key is no parameter name)
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    )
    if not tensors_only or not state:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not hold a state dict of tensors (parameter names to tensors)"
        )
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    return state, metadata
