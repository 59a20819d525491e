"""gmlp: gMLP and aMLP ("Pay Attention to MLPs", Liu, Dai, So, Le, NeurIPS 2021) for vision and language."""

from . import convert, nn
from .models import create_model, list_models
from .models.loading import load_pretrained, save_model
from .utils.io import CheckpointError

__version__ = "0.1.0"

__all__ = ["CheckpointError", "convert", "create_model", "list_models", "load_pretrained", "nn", "save_model"]
