"""A timm-style model registry: ``register_model``, ``list_models``, ``create_model``."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["register_model", "list_models", "create_model", "is_model"]

_MODEL_FNS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model factory under its function name (decorator)."""
    name = fn.__name__
    if name in _MODEL_FNS:
        raise ValueError(f"model {name!r} is already registered")
    _MODEL_FNS[name] = fn
    return fn


def is_model(name: str) -> bool:
    """True if ``name`` is a registered model."""
    return name in _MODEL_FNS


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered models matching the shell-style ``pattern``."""
    return sorted(n for n in _MODEL_FNS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, pretrained: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered model, optionally loading weights.

    Args:
        name: a name from :func:`list_models`.
        pretrained: path to a checkpoint: one of ours (``.safetensors``) or a timm / g-mlp-pytorch
            state dict (``.pth``, ``.bin``, ``.safetensors``), converted on the fly. If the model is built
            for another image size than the checkpoint, the spatial weights are resampled.
        **kwargs: overrides of the model's constructor arguments (``num_classes``, ``img_size``,
            ``drop_path_rate``, ...).

    Raises:
        ValueError: unknown model name (the message lists the known ones).
    """
    if not isinstance(name, str) or name not in _MODEL_FNS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    model = _MODEL_FNS[name](**kwargs)
    if pretrained is not None:
        from .loading import load_pretrained

        load_pretrained(model, pretrained)
    return model
