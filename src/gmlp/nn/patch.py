"""Patch embedding for vision models: non-overlapping patches -> token-major tokens."""

from __future__ import annotations

import torch
from torch import nn

from ._checks import NotScriptable, as_int, check_devices, check_input_dtype, check_int
from ._inplace import plain_call

__all__ = ["PatchEmbed", "to_2tuple"]


def to_2tuple(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    """``7 -> (7, 7)``; a pair is checked and returned as a tuple of ints (numpy's ints are taken).

    Raises:
        ValueError: ``value`` is neither a positive int nor a pair of them (a float, None, a bool, ...).
    """
    single = as_int(value)
    try:
        items = (single, single) if single is not None else tuple(value)  # type: ignore[arg-type]
    except TypeError:
        items = ()
    pair = [as_int(v) for v in items]
    if len(pair) != 2 or not all(v is not None and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return pair[0], pair[1]  # type: ignore[return-value]


class PatchEmbed(NotScriptable, nn.Module):
    """Conv ``patch x patch`` stride ``patch`` stem; returns tokens ``(grid_h * grid_w, batch, dim)``.

    Tokens are in row-major grid order (the order of timm's ``flatten(2)``). The parameter names
    (``proj.weight``, ``proj.bias``) match timm's ``stem.proj``.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        dim: int = 256,
    ) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size, "img_size")
        self.patch_size = to_2tuple(patch_size, "patch_size")
        if any(i % p for i, p in zip(self.img_size, self.patch_size, strict=True)):
            raise ValueError(f"img_size {self.img_size} must be divisible by patch_size {self.patch_size}")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = in_chans = check_int(in_chans, "in_chans")
        dim = check_int(dim, "dim")
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (batch, in_chans, H, W) -> tokens (num_patches, batch, dim), contiguous."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"images must have shape (batch, {self.in_chans}, H, W), got {shape}")
        if not x.is_floating_point():
            raise TypeError(
                f"images must be a floating-point tensor (normalised pixels), got dtype {x.dtype}; convert "
                f"raw images first, e.g. (x.float() / 255 - mean) / std"
            )
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"images must have {self.in_chans} channels, got {x.shape[1]} (shape {tuple(x.shape)})"
            )
        if tuple(x.shape[2:]) != self.img_size:
            h, w = x.shape[2], x.shape[3]
            size = h if h == w else (h, w)
            raise ValueError(
                f"images must be {self.img_size[0]}x{self.img_size[1]} pixels for this model, got {h}x{w}. "
                f"gMLP's spatial weights are tied to the token grid: build the model for the new size, e.g. "
                f"create_model(name, img_size={size}, pretrained=...), which resamples W from the "
                f"checkpoint's grid (gmlp.nn.resample_spatial_weight)"
            )
        weight = getattr(self.proj, "weight", None)
        plain = plain_call(self.proj, nn.Conv2d)  # a wrapped stem (offloading hooks) places its own weight
        if plain and isinstance(weight, torch.Tensor) and weight.device != x.device:  # (once per forward)
            # torch's conv2d takes CPU images with a meta weight and returns uninitialised memory
            check_devices(x, "images", weight, None, "model")
        try:
            y = self.proj(x)
        except (RuntimeError, TypeError, ValueError) as err:  # (on the error path only: no per-call cost)
            check_input_dtype(x, weight, err, plain, name="images", owner="model")
            raise
        return y.flatten(2).permute(2, 0, 1).contiguous()
