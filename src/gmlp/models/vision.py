"""gMLP for vision (paper section 3), with timm's model API.

Parameter names are flat: ``stem.proj``, ``blocks.N.{norm,fc1,sgu.norm,sgu.proj,fc2}``, ``norm``, ``head``.
Inside the stack the activations are token-major ``(tokens, batch, dim)`` so that each block's token
mixing is one matrix product; :meth:`GMLPVision.forward_features` returns the usual ``(batch, tokens, dim)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..nn import GMLPBlock, PatchEmbed, TokenProjection
from ..nn._checks import check_int, check_number
from .registry import register_model

__all__ = ["GMLPVision", "drop_path_rates"]


def drop_path_rates(rate: float, depth: int, schedule: str = "uniform") -> list[float]:
    """Per-block stochastic depth probabilities.

    ``"uniform"``: every block drops with ``rate`` (the paper quotes one survival probability; timm does
    this). ``"linear"``: from 0 at the first block to ``rate`` at the last (DeiT/Swin style).
    """
    check_number(rate, "drop_path_rate", high=1.0)
    if schedule == "uniform":
        return [rate] * depth
    if schedule == "linear":
        return [rate * i / max(depth - 1, 1) for i in range(depth)]
    raise ValueError(f"drop_path_schedule must be 'uniform' or 'linear', got {schedule!r}")


class GMLPVision(nn.Module):
    """gMLP image classifier: patch stem, ``depth`` gMLP blocks, final LayerNorm, mean pool, linear head.

    Args:
        img_size: input image size (int or (H, W)).
        patch_size: patch size of the stem.
        in_chans: image channels.
        num_classes: classes of the head (0 = no head, the model returns pooled features).
        embed_dim: ``d_model``.
        depth: number of blocks.
        mlp_ratio: ``d_ffn / d_model`` (6 in the paper's vision models).
        drop_rate: dropout before the head.
        proj_drop_rate: dropout on each block's output.
        drop_path_rate: stochastic depth probability (1 - survival probability).
        drop_path_schedule: ``"uniform"`` or ``"linear"`` across blocks, see :func:`drop_path_rates`.
        global_pool: ``"avg"`` (mean over tokens) or ``""`` (no pooling).
        attn_dim: tiny attention size for a vision aMLP (None = gMLP).
        heads: number of SGU channel groups.
        variant: gating function, see :data:`gmlp.nn.VARIANTS`.
        norm_eps, sgu_norm_eps: LayerNorm epsilons; the defaults (1e-6, 1e-5) are timm's, so converted
            timm weights give timm's outputs.
        init_std: std of the near-zero init of the spatial weights.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 256,
        depth: int = 30,
        mlp_ratio: float = 6.0,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        drop_path_schedule: str = "uniform",
        global_pool: str = "avg",
        attn_dim: int | None = None,
        heads: int = 1,
        variant: str = "sgu",
        norm_eps: float = 1e-6,
        sgu_norm_eps: float = 1e-5,
        init_std: float = 1e-6,
        pretrained_cfg: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        num_classes = check_int(num_classes, "num_classes", 0)
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        embed_dim, depth = check_int(embed_dim, "embed_dim"), check_int(depth, "depth")
        in_chans = check_int(in_chans, "in_chans")
        check_number(mlp_ratio, "mlp_ratio", low_open=True)
        for name, value in (("drop_rate", drop_rate), ("proj_drop_rate", proj_drop_rate)):
            check_number(value, name, high=1.0)
        if pretrained_cfg is not None and not isinstance(pretrained_cfg, dict):
            raise TypeError(f"pretrained_cfg must be a dict or None, got {type(pretrained_cfg).__name__}")
        dim_ffn = int(round(mlp_ratio * embed_dim))
        if dim_ffn < 1 or (variant == "sgu" and dim_ffn % 2):  # else the block names dim_ffn, not given here
            even = ", and even for the split SGU (variant='sgu')" if variant == "sgu" else ""
            raise ValueError(
                f"mlp_ratio * embed_dim = {mlp_ratio!r} * {embed_dim} rounds to d_ffn = {dim_ffn}, which "
                f"must be a positive int{even}"
            )
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.grad_checkpointing = False
        self.stem = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.img_size = self.stem.img_size
        self.patch_size = self.stem.patch_size
        self.grid_size = self.stem.grid_size
        self.in_chans = in_chans
        n = self.stem.num_patches
        self.blocks = nn.ModuleList(
            GMLPBlock(
                embed_dim,
                dim_ffn,
                n,
                variant=variant,
                heads=heads,
                attn_dim=attn_dim,
                drop_path=p,
                dropout=proj_drop_rate,
                norm_eps=norm_eps,
                sgu_norm_eps=sgu_norm_eps,
                init_std=init_std,
            )
            for p in drop_path_rates(drop_path_rate, depth, drop_path_schedule)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        cfg = dict(_DEFAULT_CFG)
        cfg.update(pretrained_cfg or {})
        cfg["input_size"] = (in_chans, *self.img_size)
        cfg["num_classes"] = num_classes
        self.pretrained_cfg = cfg
        self.init_weights()

    # -- init ---------------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """Linear layers: xavier-uniform weights and zero biases; stem: lecun-normal (as timm's Mixer
        family); head: zero; spatial W ~ N(0, init_std), b = 1; LayerNorms: ones/zeros."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if name == "head":
                    nn.init.zeros_(module.weight)
                else:
                    nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                nn.init.trunc_normal_(module.weight, std=math.sqrt(1.0 / fan_in))
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, TokenProjection):  # a subclass too (by name it was left uninitialised)
                module.reset_parameters()

    # -- timm model API -----------------------------------------------------------------------------
    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name of :attr:`pretrained_cfg` (the same dict)."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: dict[str, Any]) -> None:
        self.pretrained_cfg = cfg

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay (timm convention)."""
        return {"stem": r"^stem", "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass to save memory."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay besides biases and norms (none)."""
        return set()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classification head."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh (zero-initialised) one for ``num_classes`` (0 = remove)."""
        num_classes = check_int(num_classes, "num_classes", 0)
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        device, dtype = self.norm.weight.device, self.norm.weight.dtype
        if num_classes > 0:
            self.head = nn.Linear(self.embed_dim, num_classes, device=device, dtype=dtype)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        else:
            self.head = nn.Identity()

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> normalized token-major features ``(tokens, batch, dim)``."""
        x = self.stem(x)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> token features ``(B, tokens, dim)`` after the final norm."""
        return self._tokens(x).transpose(0, 1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Token features ``(B, tokens, dim)`` -> logits (or pooled features if ``pre_logits``).

        Raises:
            ValueError: ``x`` is not ``(B, tokens, embed_dim)`` (e.g. already pooled features).
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"forward_head takes token features (batch, tokens, {self.embed_dim}) as forward_features "
                f"returns them, got {got}"
            )
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> logits ``(B, num_classes)``."""
        return self.forward_head(self.forward_features(x))


_DEFAULT_CFG: dict[str, Any] = {
    "num_classes": 1000,
    "input_size": (3, 224, 224),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "interpolation": "bicubic",
    "crop_pct": 0.875,
    "first_conv": "stem.proj",
    "classifier": "head",
}

# Fashion-MNIST statistics (train split), used by the small grey-scale models.
_FASHION_MNIST_CFG: dict[str, Any] = {
    "num_classes": 10,
    "mean": (0.2860,),
    "std": (0.3530,),
    "interpolation": "bilinear",
    "crop_pct": 1.0,
}


def _create(arch: str, cfg: dict[str, Any] | None = None, **kwargs: Any) -> GMLPVision:
    """``GMLPVision(**kwargs)`` with ``pretrained_cfg`` made of ``cfg``, the given one and the architecture
    name (``arch``, not ``variant``: that is GMLPVision's gating-function argument)."""
    given = kwargs.pop("pretrained_cfg", None) or {}
    if not isinstance(given, dict):
        raise TypeError(f"pretrained_cfg must be a dict or None, got {type(given).__name__}")
    pretrained_cfg = {**(cfg or {}), **given}
    pretrained_cfg["architecture"] = arch
    if "img_size" in kwargs:
        pretrained_cfg.pop("input_size", None)
    return GMLPVision(pretrained_cfg=pretrained_cfg, **kwargs)


def _defaults(kwargs: dict[str, Any], **defaults: Any) -> dict[str, Any]:
    return {**defaults, **kwargs}


@register_model
def gmlp_ti16_224(**kwargs: Any) -> GMLPVision:
    """gMLP-Ti/16 (paper Table 1): depth 30, d_model 128, d_ffn 768; 5,867,328 parameters; survival 1.00
    (no stochastic depth)."""
    return _create("gmlp_ti16_224", **_defaults(kwargs, patch_size=16, embed_dim=128, depth=30, mlp_ratio=6))


@register_model
def gmlp_s16_224(**kwargs: Any) -> GMLPVision:
    """gMLP-S/16 (paper Table 1): depth 30, d_model 256, d_ffn 1536; 19,422,656 parameters.

    The paper trains it with survival probability 0.95: pass ``drop_path_rate=0.05`` (as
    ``recipes/imagenet_gmlp_s.yaml`` does); the default here is 0, as in timm's model functions."""
    return _create("gmlp_s16_224", **_defaults(kwargs, patch_size=16, embed_dim=256, depth=30, mlp_ratio=6))


@register_model
def gmlp_b16_224(**kwargs: Any) -> GMLPVision:
    """gMLP-B/16 (paper Table 1): depth 30, d_model 512, d_ffn 3072; 73,075,392 parameters.

    The paper trains it with survival probability 0.80: pass ``drop_path_rate=0.2`` (as
    ``recipes/imagenet_gmlp_b.yaml`` does); the default here is 0, as in timm's model functions."""
    return _create("gmlp_b16_224", **_defaults(kwargs, patch_size=16, embed_dim=512, depth=30, mlp_ratio=6))


@register_model
def gmlp_nano4_28(**kwargs: Any) -> GMLPVision:
    """Small gMLP for 28x28 grey images (Fashion-MNIST): patch 4 (7x7 = 49 tokens), depth 6, d_model 128,
    d_ffn 384; 467,702 parameters. The default of ``gmlp train``."""
    return _create(
        "gmlp_nano4_28",
        _FASHION_MNIST_CFG,
        **_defaults(
            kwargs, img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=128, depth=6, mlp_ratio=3
        ),
    )


@register_model
def gmlp_micro4_28(**kwargs: Any) -> GMLPVision:
    """Very small gMLP for 28x28 grey images: patch 4, depth 4, d_model 64, d_ffn 256 (for quick runs)."""
    return _create(
        "gmlp_micro4_28",
        _FASHION_MNIST_CFG,
        **_defaults(
            kwargs, img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4, mlp_ratio=4
        ),
    )
