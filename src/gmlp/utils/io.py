"""Safe weight I/O: atomic writes, safetensors or ``torch.load(weights_only=True)`` reads, clear errors."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["CheckpointError", "atomic_write", "load_state_dict_file", "save_state_dict_file"]

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, or its keys/shapes do not fit the model."""


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and ``os.replace`` it onto ``path``.

    A crash at any moment leaves either the old file or the new one, never a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_state_dict_file(
    state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write ``state_dict`` as safetensors, atomically (contiguous CPU tensors; tied weights stored twice)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        t = value.detach().to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr()
        if storage in seen:  # tied/overlapping views share storage, which safetensors refuses: store a copy
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[key] = t
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _guarded(path: Path, what: str, fn: Callable[[], object]) -> object:
    try:
        return fn()
    except Exception as err:  # corrupt bytes fail the readers in many ways (UnpicklingError, IndexError, ...)
        if "Weights only load failed" in str(err):  # a sound file holding objects besides tensors
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


def load_state_dict_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a state dict from ``.safetensors`` (safe) or a torch pickle with ``weights_only=True``.

    Common wrappers (``{"state_dict": ...}``, ``{"model": ...}``) and DDP ``module.`` prefixes are removed.
    A directory is read through its ``model.safetensors``.

    Returns:
        ``(state_dict, metadata)``; metadata is the safetensors header metadata (empty for pickles).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is truncated, corrupt, or holds no tensors.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {str(path)!r}")
    metadata: dict[str, str] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        def read() -> dict[str, torch.Tensor]:
            with safe_open(str(path), framework="pt") as f:
                metadata.update(f.metadata() or {})
            return load_file(str(path))

        state = _guarded(path, "safetensors", read)
    else:
        state = _guarded(path, "torch", lambda: torch.load(path, map_location="cpu", weights_only=True))
    if isinstance(state, dict):
        for key in _WRAPPER_KEYS:
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    tensors_only = isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    if not tensors_only or not state:
        raise CheckpointError(f"checkpoint {str(path)!r} does not hold a state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state, metadata
