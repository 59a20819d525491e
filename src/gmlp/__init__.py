"""gmlp: gMLP and aMLP ("Pay Attention to MLPs", Liu, Dai, So, Le, NeurIPS 2021) for vision and language.

The names below are imported on first use (PEP 562), so that ``import gmlp.nn`` loads torch alone (not
safetensors and the model registry) and ``gmlp.create_model`` still works after a plain ``import gmlp``.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import convert, nn
    from .models import create_model, list_models
    from .models.loading import load_pretrained, save_model
    from .utils.io import CheckpointError

__version__ = "0.1.0"

__all__ = ["CheckpointError", "convert", "create_model", "list_models", "load_pretrained", "nn", "save_model"]

# public name -> the module that defines it (a sub-module itself for "convert" and "nn")
_LAZY = {
    "CheckpointError": "gmlp.utils.io",
    "convert": "gmlp.convert",
    "create_model": "gmlp.models",
    "list_models": "gmlp.models",
    "load_pretrained": "gmlp.models.loading",
    "nn": "gmlp.nn",
    "save_model": "gmlp.models.loading",
}


def __getattr__(name: str) -> Any:
    """Import a public name of :data:`__all__`, or a sub-package (``gmlp.models``), on first access."""
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
    elif name.isidentifier() and not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}"):
        try:  # as the eager imports made it an attribute
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:  # (hasattr(gmlp, "viz") without matplotlib: False, not an error)
            raise AttributeError(f"module 'gmlp' has no attribute {name!r} ({err})") from err
    else:
        raise AttributeError(f"module 'gmlp' has no attribute {name!r}")
    value = module if module.__name__ == f"{__name__}.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
