"""Safe weight I/O: atomic writes, safetensors or ``torch.load(weights_only=True)`` reads, clear errors."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "CheckpointError",
    "atomic_dir",
    "atomic_write",
    "load_state_dict_file",
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


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and ``os.replace`` it onto ``path``.

    A crash at any moment leaves either the old file or the new one, never a half-written file. The new
    file keeps the permissions of the one it replaces (a new one gets the umask's, as with ``open``).

    Raises:
        IsADirectoryError: ``path`` is a directory.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {str(path)!r}: it is a directory, not a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path, mode = _new_temp_file(path)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        with contextlib.suppress(FileNotFoundError):  # keep the mode of the file being replaced
            mode = stat.S_IMODE(os.stat(path).st_mode)
        os.chmod(tmp_path, mode)  # (also where the body's writer made the file anew, 0600 as mkstemp does)
        os.replace(tmp_path, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


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
