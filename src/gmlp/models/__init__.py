"""Model families: vision (timm-style registry) and text (transformers-style, in :mod:`gmlp.models.text`)."""

from . import vision
from .registry import create_model, is_model, list_models, register_model
from .vision import FeatureGetterNet, GMLPVision

__all__ = [
    "FeatureGetterNet",
    "GMLPVision",
    "create_model",
    "is_model",
    "list_models",
    "register_model",
    "vision",
]
