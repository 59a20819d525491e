"""Audit of the layers under unusual but valid inputs (eighteenth session): in-place inference paths with
subclassed or replaced submodules, non-floating activations, and size arguments of other types."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gmlp.models.vision import GMLPVision, drop_path_rates
from gmlp.nn import (
    GMLPBlock,
    PatchEmbed,
    SpatialGatingUnit,
    TinyAttention,
    TokenProjection,
    resample_spatial_bias,
    resample_spatial_weight,
)


def randomize_(module: nn.Module, std: float = 0.3) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


class RecordingProjection(TokenProjection):
    """Keeps the last gate it returned (for plotting): a subclass, not a hook."""

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.last_gate = super().forward(z, mask)
        return self.last_gate


def test_a_subclassed_projection_keeps_its_output_in_inference() -> None:
    """The gating product is not written into a tensor that a subclass of TokenProjection returned (and
    may keep): in-place finishing is for a gate the SGU's own ``mix`` has just made."""
    torch.manual_seed(0)
    sgu = randomize_(SpatialGatingUnit(8, 5))
    recording = RecordingProjection(5)
    recording.load_state_dict(sgu.proj.state_dict())
    sgu.proj = recording
    z = torch.randn(5, 2, 8)
    with torch.no_grad():
        out = sgu(z)
        gate = sgu.proj.mix(sgu.norm(z[..., 4:]))
    assert torch.equal(recording.last_gate, gate)
    assert torch.allclose(out, z[..., :4] * gate)


def test_a_patched_projection_forward_keeps_its_output_in_inference() -> None:
    torch.manual_seed(0)
    sgu = randomize_(SpatialGatingUnit(8, 5))
    kept: dict[str, torch.Tensor] = {}
    original = sgu.proj.forward

    def patched(z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        kept["gate"] = original(z, mask)
        return kept["gate"]

    sgu.proj.forward = patched
    z = torch.randn(5, 2, 8)
    with torch.no_grad():
        sgu(z)
        assert torch.equal(kept["gate"], sgu.proj.mix(sgu.norm(z[..., 4:])))


@pytest.mark.parametrize("slot", ["dropout", "drop_path"])
def test_dropout_and_drop_path_may_be_replaced_by_identity(slot: str) -> None:
    """``block.dropout = nn.Identity()`` (as when stripping a model for export) gives the same output instead
    of an AttributeError on ``.p``, with or without autograd."""
    torch.manual_seed(0)
    block = randomize_(GMLPBlock(8, 12, 5)).eval()
    x = torch.randn(5, 2, 8)
    with torch.no_grad():
        expected = block(x)
    setattr(block, slot, nn.Identity())
    with torch.no_grad():
        assert torch.allclose(block(x), expected)
    assert torch.allclose(block(x), expected)


def test_a_subclassed_dropout_is_called_in_inference() -> None:
    """A dropout subclass with its own forward runs under no_grad too (it was skipped there, so inference
    and grad-mode outputs differed)."""

    class Halve(nn.Dropout):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 0.5

    torch.manual_seed(0)
    block = randomize_(GMLPBlock(8, 12, 5)).eval()
    block.dropout = Halve(0.0)
    x = torch.randn(5, 2, 8)
    with torch.no_grad():
        fast = block(x)
    assert torch.allclose(fast, block(x))


@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.bool])
def test_non_floating_activations_are_refused_naming_the_argument(dtype: torch.dtype) -> None:
    """Integer tokens into TokenProjection cast W (values near 0) to integers: a silent all-zero mixing.
    Every layer refuses non-floating activations with an error that names the argument."""
    layers = [
        (TokenProjection(5), torch.ones(5, 2, 4, dtype=dtype), "z"),
        (SpatialGatingUnit(4, 5), torch.ones(5, 2, 4, dtype=dtype), "z"),
        (GMLPBlock(4, 8, 5), torch.ones(5, 2, 4, dtype=dtype), "x"),
        (TinyAttention(4, 2, 3), torch.ones(5, 2, 4, dtype=dtype), "x"),
    ]
    for layer, x, name in layers:
        with pytest.raises(TypeError, match=f"{name} must be a floating-point tensor, got dtype {dtype}"):
            layer(x)


def test_float_activations_of_any_width_are_still_taken() -> None:
    proj = TokenProjection(5)
    z = torch.randn(5, 2, 4, dtype=torch.float64)
    assert proj(z).dtype is torch.float64
    assert proj(z.half()).dtype is torch.float16


def test_tiny_attention_checks_its_flag_and_sizes() -> None:
    with pytest.raises(TypeError, match="causal must be True or False, got 'no'"):
        TinyAttention(8, 4, 6, causal="no")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dim must be a positive int, got True"):
        TinyAttention(True, 4, 6)
    with pytest.raises(ValueError, match="attn_dim must be a positive int, got True"):
        GMLPBlock(8, 12, 5, attn_dim=True)


@pytest.mark.parametrize("value", [8.0, None, "8", (8, 8.0), (8, True), torch.tensor([8.0, 8.0])])
def test_sizes_of_other_types_get_a_named_error(value: object) -> None:
    with pytest.raises(ValueError, match="img_size must be a positive int or a pair of positive ints"):
        PatchEmbed(value, 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="old_grid must be a positive int or a pair of positive ints"):
        resample_spatial_weight(torch.randn(4, 4), value, 3)  # type: ignore[arg-type]


def test_numpy_integer_sizes_are_taken() -> None:
    """Sizes computed with numpy (``np.int64``) are ints: they were refused with "not iterable"."""
    embed = PatchEmbed(np.int64(8), (np.int64(8), np.int32(4)), dim=6)
    assert embed.img_size == (8, 8) and embed.patch_size == (8, 4) and embed.grid_size == (1, 2)
    assert all(type(v) is int for v in (*embed.img_size, *embed.patch_size))
    assert resample_spatial_weight(torch.randn(4, 4), np.int64(2), (3, np.int64(3))).shape == (9, 9)
    assert resample_spatial_bias(torch.randn(4), (np.int64(2), 2), 3).shape == (9,)
    block = GMLPBlock(np.int64(8), np.int32(16), np.int64(4), fft_threshold=None)
    assert type(block.dim) is int and type(block.sgu.dim) is int and type(block.sgu.proj.seq_len) is int
    assert block(torch.randn(4, 2, 8)).shape == (4, 2, 8)
    block = GMLPBlock(8, 16, 4, dropout=np.float32(0.25), drop_path=np.float64(0.5), norm_eps=np.float32(1))
    assert block.dropout.p == 0.25 and type(block.drop_path.p) is float and block.drop_path.p == 0.5


def test_vision_num_classes_and_drop_path_rate_are_checked() -> None:
    kwargs = {"img_size": 8, "patch_size": 4, "embed_dim": 8, "depth": 1}
    with pytest.raises(ValueError, match="num_classes must be an int >= 0, got True"):
        GMLPVision(num_classes=True, **kwargs)
    model = GMLPVision(num_classes=3, **kwargs)
    with pytest.raises(ValueError, match="num_classes must be an int >= 0, got False"):
        model.reset_classifier(False)
    assert model.num_classes == 3
    with pytest.raises(ValueError, match=r"drop_path_rate must be a number in \[0, 1\), got '0.1'"):
        GMLPVision(drop_path_rate="0.1", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"drop_path_rate must be a number in \[0, 1\), got True"):
        drop_path_rates(True, 2)  # type: ignore[arg-type]
    assert drop_path_rates(0.2, 3, "linear") == [0.0, 0.1, 0.2]
