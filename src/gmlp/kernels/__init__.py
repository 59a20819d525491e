"""Fast paths behind the :mod:`gmlp.nn` modules, each with the plain reference path it is tested against."""

from .cpu_linear import (
    apply_linear,
    cpu_fusion_enabled,
    fused_linear,
    fused_linear_reference,
    is_plain_linear,
    token_mix,
    token_mix_reference,
)
from .norm_triton import layer_norm, layer_norm_reference
from .sgu_triton import (
    gelu_split_layernorm,
    gelu_split_layernorm_reference,
    spatial_gating,
    spatial_gating_reference,
    triton_available,
)
from .toeplitz import toeplitz_matrix, toeplitz_matrix_reference, toeplitz_mix_fft

__all__ = [
    "apply_linear",
    "cpu_fusion_enabled",
    "fused_linear",
    "fused_linear_reference",
    "gelu_split_layernorm",
    "gelu_split_layernorm_reference",
    "is_plain_linear",
    "layer_norm",
    "layer_norm_reference",
    "spatial_gating",
    "spatial_gating_reference",
    "token_mix",
    "token_mix_reference",
    "toeplitz_matrix",
    "toeplitz_matrix_reference",
    "toeplitz_mix_fft",
    "triton_available",
]
