"""gMLP building blocks, pure PyTorch.

All layers take token-major activations ``(seq_len, batch, channels)`` and optional padding masks
``(batch, seq_len)`` with True/1 for real tokens. See :mod:`gmlp.nn.sgu` for why.
"""

from .attention import TinyAttention
from .block import DropPath, GMLPBlock, drop_path
from .patch import PatchEmbed
from .resample import resample_spatial_bias, resample_spatial_weight
from .sgu import VARIANTS, SpatialGatingUnit, TokenLinear, TokenProjection

__all__ = [
    "VARIANTS",
    "DropPath",
    "GMLPBlock",
    "PatchEmbed",
    "SpatialGatingUnit",
    "TinyAttention",
    "TokenLinear",
    "TokenProjection",
    "drop_path",
    "resample_spatial_bias",
    "resample_spatial_weight",
]
