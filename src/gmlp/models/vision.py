"""gMLP for vision (paper section 3), with timm's model API.

Parameter names are flat: ``stem.proj``, ``blocks.N.{norm,fc1,sgu.norm,sgu.proj,fc2}``, ``norm``, ``head``.
Inside the stack the activations are token-major ``(tokens, batch, dim)`` so that each block's token
mixing is one matrix product; :meth:`GMLPVision.forward_features` returns the usual ``(batch, tokens, dim)``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..nn import GMLPBlock, PatchEmbed, TokenLinear, TokenProjection
from ..nn._checks import NotScriptable, as_int, check_flag, check_int, check_number
from ..nn.patch import to_2tuple
from ..nn.resample import resample_spatial_bias, resample_spatial_weight
from .registry import register_model

__all__ = ["FeatureGetterNet", "FeatureInfo", "GMLPVision", "drop_path_rates", "feature_take_indices"]


def drop_path_rates(rate: float, depth: int, schedule: str = "uniform") -> list[float]:
    """Per-block stochastic depth probabilities.

    ``"uniform"``: every block drops with ``rate`` (the paper quotes one survival probability; timm does
    this). ``"linear"``: from 0 at the first block to ``rate`` at the last (DeiT/Swin style).

    Raises:
        ValueError: ``rate`` not a number in ``[0, 1)``, ``depth`` not a positive int, or an unknown
            ``schedule``.
    """
    check_number(rate, "drop_path_rate", high=1.0)
    depth = check_int(depth, "depth")
    if schedule == "uniform":
        return [rate] * depth
    if schedule == "linear":
        return [rate * i / max(depth - 1, 1) for i in range(depth)]
    raise ValueError(f"drop_path_schedule must be 'uniform' or 'linear', got {schedule!r}")


def _checked_cfg(cfg: object, name: str) -> dict[str, Any]:
    """``cfg`` (a ``pretrained_cfg`` or ``pretrained_cfg_overlay``) as a dict ({} for None).

    Raises:
        TypeError: ``cfg`` is neither a dict nor None.
    """
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise TypeError(f"{name} must be a dict or None, got {type(cfg).__name__}")
    return cfg


def _fit_channels(cfg: dict[str, Any], in_chans: int) -> None:
    """Give ``cfg``'s ``mean`` and ``std`` one value per input channel (in place), as
    :func:`gmlp.train.vision.norm_stats` does: ``in_chans == 1`` takes the average of several values,
    another count the values repeated cyclically (as timm's ``adapt_input_conv`` repeats the RGB filters).
    One value (for every channel, as ``Normalize`` broadcasts it) or one per channel is kept, and so is
    anything that is not a sequence of numbers (metadata the caller gave; timm reads what it reads).

    A model built with ``in_chans=1`` kept the default RGB ``(0.5, 0.5, 0.5)`` while its ``input_size``
    said one channel: timm's ``create_transform(**resolve_data_config({}, model=m))`` then failed on every
    image ("output with shape [1, H, W] doesn't match the broadcast shape [3, H, W]").
    """
    for key in ("mean", "std"):
        values = cfg.get(key)
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            continue
        if len(values) in (0, 1, in_chans) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
        ):
            continue
        if in_chans == 1:
            cfg[key] = (sum(float(v) for v in values) / len(values),)
        else:
            cfg[key] = tuple(float(values[i % len(values)]) for i in range(in_chans))


def _checked_factory(
    device: object, dtype: object
) -> tuple[torch.device | None, torch.dtype | None]:
    """timm's ``device`` and ``dtype`` arguments of the model functions (:func:`_create`) checked (None
    kept).

    Raises:
        ValueError: ``device`` is not a ``torch.device`` or a device string.
        TypeError: ``dtype`` is not a floating-point ``torch.dtype`` (parameters are floats).
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(
            f"dtype must be None or a floating-point torch.dtype (torch.bfloat16, ...), got {dtype!r}"
        )
    if device is None:
        return None, dtype
    try:
        if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
            raise TypeError
        return torch.device(device), dtype
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"device must be None, a torch.device or a device string ('cpu', 'cuda:0', 'meta'), got "
            f"{device!r}"
        ) from None


def feature_take_indices(
    num_features: int, indices: int | Sequence[int] | None = None, name: str = "indices"
) -> tuple[list[int], int]:
    """The block indices to take and the largest of them, with timm's semantics.

    ``None``: all ``num_features``; an int ``n``: the last ``n``; a list or tuple of ints: those indices, a
    negative one counting from the end (``-1`` = the last block). ``name`` is the argument's name in errors.

    Raises:
        ValueError: an int outside ``[1, num_features]``, an index outside ``[-num_features,
            num_features - 1]``, an empty sequence, or something else than None, an int or ints.
    """
    if indices is None:
        indices = num_features
    count = as_int(indices)
    if count is not None:
        if not 1 <= count <= num_features:
            raise ValueError(
                f"{name} as an int takes the last n blocks, n in [1, {num_features}], got {indices!r}"
            )
        take = list(range(num_features - count, num_features))
        return take, take[-1]
    items = list(indices) if isinstance(indices, Iterable) and not isinstance(indices, (str, bytes)) else None
    ints = [as_int(i) for i in items] if items is not None else None
    if not ints or any(i is None or not -num_features <= i < num_features for i in ints):
        raise ValueError(
            f"{name} must be None, an int (the last n blocks) or a non-empty list of block indices in "
            f"[{-num_features}, {num_features - 1}] (negative ones count from the end), got {indices!r}"
        )
    take = [i + num_features if i < 0 else i for i in ints]  # type: ignore[operator]
    return take, max(take)


class GMLPVision(NotScriptable, nn.Module):
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
        pretrained_cfg: timm's metadata (``mean``, ``std``, ``interpolation``, ``crop_pct``, ...) over the
            defaults, as :attr:`pretrained_cfg`. Its ``num_classes`` and ``input_size`` are replaced by the
            model's (:func:`gmlp.create_model` takes them as the defaults of the arguments left out, as
            timm does; :meth:`reset_classifier` and :meth:`set_input_size` keep them up to date); a ``mean``
            or ``std`` of several values but not one per channel is fitted to ``in_chans`` (averaged for one
            channel, repeated cyclically for more), so timm's transforms fit the model; weight sources
            (``file``, ``url``, ``hf_hub_id``) are kept as metadata, as timm keeps them without
            ``pretrained=True``: load weights with ``create_model(name, pretrained=PATH)``.
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
        given_cfg = _checked_cfg(pretrained_cfg, "pretrained_cfg")
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
        reduction = max(self.patch_size)  # not hierarchical: every block's map is at the patch stride
        self.feature_info = [
            {"num_chs": embed_dim, "reduction": reduction, "module": f"blocks.{i}"} for i in range(depth)
        ]
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        cfg = dict(_DEFAULT_CFG)
        cfg.update(given_cfg)
        cfg["input_size"] = (in_chans, *self.img_size)
        cfg["num_classes"] = num_classes
        _fit_channels(cfg, in_chans)
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
            elif isinstance(module, (TokenProjection, TokenLinear)):  # a subclass too (by name it was left
                module.reset_parameters()  # uninitialised); TokenLinear: variant "mixer"'s token MLP

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
        """Parameter groups for layer-wise learning-rate decay (timm convention). ``coarse`` (timm's switch
        between per-block and per-stage groups) gives the same groups: a flat stack's stages are its blocks,
        as for timm's own gMLP.

        Raises:
            TypeError: ``coarse`` not a bool.
        """
        check_flag(coarse, "coarse")
        return {"stem": r"^stem", "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass to save memory (in training only).

        Raises:
            TypeError: ``enable`` not a bool (a string such as ``"no"`` would be truthy).
        """
        self.grad_checkpointing = check_flag(enable, "enable")

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay besides the 1-D ones (biases, norms): the spatial
        biases of several SGU heads, ``(heads, tokens)``, which timm's layer-decay grouping (it looks at
        ``ndim`` only) would otherwise decay."""
        return {n for n, p in self.named_parameters() if n.endswith(".bias") and p.dim() > 1}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classification head."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh (zero-initialised) one for ``num_classes`` (0 = remove);
        ``pretrained_cfg["num_classes"]`` follows. The new head's parameters are ordinary tensors even when
        this is called under ``torch.inference_mode()`` (the model can still be trained afterwards)."""
        num_classes = check_int(num_classes, "num_classes", 0)
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        # the head takes the final norm's output (a pruned norm, nn.Identity, has no weight: the stem's)
        like = getattr(self.norm, "weight", None)
        like = like if isinstance(like, torch.Tensor) else self.stem.proj.weight
        device, dtype = like.device, like.dtype
        if num_classes > 0:
            # (parameters made under inference_mode are inference tensors, which autograd refuses to save:
            # a later training step would fail with "Inference tensors cannot be saved for backward")
            with torch.inference_mode(False), torch.no_grad():
                self.head = nn.Linear(self.embed_dim, num_classes, device=device, dtype=dtype)
                nn.init.zeros_(self.head.weight)
                nn.init.zeros_(self.head.bias)
        else:
            self.head = nn.Identity()
        if isinstance(self.pretrained_cfg, dict):  # (the model's actual sizes, as at construction)
            self.pretrained_cfg["num_classes"] = num_classes

    @torch.jit.ignore
    def set_input_size(
        self, img_size: int | tuple[int, int] | None = None, patch_size: int | tuple[int, int] | None = None
    ) -> None:
        """Change the input image size in place (timm's model API).

        gMLP's token-mixing W and b are tied to the token grid, so every block's W and b are resampled to
        the new grid with :func:`gmlp.nn.resample_spatial_weight` / :func:`~gmlp.nn.resample_spatial_bias`,
        exactly as ``create_model(name, img_size=..., pretrained=PATH)`` does with a checkpoint of this
        model. ``pretrained_cfg["input_size"]`` follows. The resampled W and b are new parameters (ordinary
        tensors, also when called under ``torch.inference_mode()``): build the optimizer after this call.
        The stem (and so the patch size) is unchanged. Resampling is lossy: a change to another size and
        back does not restore W and b (nor the outputs); keep the state dict (or reload the checkpoint) to
        return to a size exactly. A refused call changes nothing.

        Args:
            img_size: the new image size (int or (H, W)), divisible by the patch size; None keeps it.
            patch_size: None or the current patch size (changing it is not supported).

        Raises:
            ValueError: ``img_size`` not a positive int or pair, or not divisible by the patch size;
                ``patch_size`` other than None or the current one.
            TypeError: a block whose token mixing cannot be resampled (variant ``"mixer"``, a Toeplitz
                projection or another module than :class:`gmlp.nn.TokenProjection`).
        """
        if patch_size is not None and to_2tuple(patch_size, "patch_size") != self.patch_size:
            raise ValueError(
                f"patch_size cannot be changed (it would need the stem's kernel resampled): pass None or the "
                f"current {self.patch_size}, got {patch_size!r}"
            )
        if img_size is None:
            return
        size = to_2tuple(img_size, "img_size")
        if any(i % p for i, p in zip(size, self.patch_size, strict=True)):
            raise ValueError(f"img_size {size} must be divisible by patch_size {self.patch_size}")
        old, grid = self.grid_size, (size[0] // self.patch_size[0], size[1] // self.patch_size[1])
        n = grid[0] * grid[1]
        if grid != old:
            # every block's new W and b are made before any is set: a block refused (or failing to resample)
            # half-way must leave the model as it was, not some blocks resampled and the grid unchanged
            resampled: list[tuple[TokenProjection, nn.Parameter, nn.Parameter]] = []
            # ordinary tensors under inference_mode too: inference tensors as parameters would make a later
            # training step fail ("Inference tensors cannot be saved for backward")
            with torch.inference_mode(False), torch.no_grad():
                for block in self.blocks:
                    if block.sgu.mix1 is not None:  # a token MLP's rows are not a grid of tokens to resample
                        raise TypeError(
                            "set_input_size cannot resample the token MLP of variant 'mixer' (W1's hidden "
                            "rows are not tokens); build the model at the new img_size instead"
                        )
                    proj = block.sgu.proj
                    if proj is not None:  # (variant "none" mixes no tokens)
                        if not isinstance(proj, TokenProjection) or proj.toeplitz:
                            kind = " (Toeplitz)" if getattr(proj, "toeplitz", False) else ""
                            raise TypeError(
                                f"set_input_size resamples dense TokenProjection weights, got "
                                f"{type(proj).__name__}{kind}"
                            )
                        w, b = proj.weight, proj.bias
                        weight = resample_spatial_weight(w.detach(), old, grid)
                        bias = resample_spatial_bias(b.detach(), old, grid)
                        resampled.append((
                            proj,
                            nn.Parameter(weight, requires_grad=w.requires_grad),
                            nn.Parameter(bias, requires_grad=b.requires_grad),
                        ))  # fmt: skip
            for proj, weight, bias in resampled:
                proj.weight, proj.bias, proj.seq_len = weight, bias, n
            for block in self.blocks:
                block.sgu.seq_len = block.seq_len = n
        self.stem.img_size, self.stem.grid_size, self.stem.num_patches = size, grid, n
        self.img_size, self.grid_size = size, grid
        self.pretrained_cfg["input_size"] = (self.in_chans, *size)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward returning the outputs of chosen blocks (timm's model API).

        Args:
            x: images ``(B, C, H, W)``.
            indices: which blocks: None = all, an int ``n`` = the last ``n``, a list = those block indices
                (negative ones count from the end). The maps come in block order, once each.
            norm: apply the final LayerNorm to each map.
            stop_early: run no block after the last one taken (the final features are then those of
                that block, normalised).
            output_fmt: ``"NCHW"``: ``(B, embed_dim, grid_h, grid_w)`` maps; ``"NLC"``: ``(B, tokens,
                embed_dim)``.
            intermediates_only: return only the list of maps.

        Returns:
            The list of maps, or ``(final features, maps)`` with the final features as
            :meth:`forward_features` returns them (``(B, tokens, embed_dim)``, normalised).

        Raises:
            ValueError: bad ``indices`` (see :func:`feature_take_indices`) or ``output_fmt``.
            TypeError: ``norm``, ``stop_early`` or ``intermediates_only`` not a bool.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        norm = check_flag(norm, "norm")
        stop_early = check_flag(stop_early, "stop_early")
        intermediates_only = check_flag(intermediates_only, "intermediates_only")
        take, last = feature_take_indices(len(self.blocks), indices)
        maps = []
        x = self.stem(x)  # token-major (tokens, batch, dim)
        blocks = self.blocks[: last + 1] if stop_early else self.blocks
        for i, block in enumerate(blocks):
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i in take:
                maps.append(self.norm(x) if norm else x)
        if output_fmt == "NCHW":
            h, w = self.grid_size
            maps = [y.permute(1, 2, 0).reshape(y.shape[1], y.shape[2], h, w).contiguous() for y in maps]
        else:
            maps = [y.transpose(0, 1).contiguous() for y in maps]
        if intermediates_only:
            return maps
        return self.norm(x).transpose(0, 1), maps

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last one that ``indices`` takes (timm's model API).

        Args:
            indices: as in :meth:`forward_intermediates`.
            prune_norm: replace the final LayerNorm by an identity.
            prune_head: remove the classifier head and the pooling (``reset_classifier(0, "")``).

        Returns:
            The absolute indices taken (valid in the pruned model too).
        """
        prune_norm, prune_head = check_flag(prune_norm, "prune_norm"), check_flag(prune_head, "prune_head")
        take, last = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: last + 1]
        self.feature_info = self.feature_info[: last + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

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
            TypeError: ``pre_logits`` not a bool.
        """
        if pre_logits is not False and pre_logits is not True:  # (a str such as "no" would be truthy)
            raise TypeError(f"pre_logits must be True or False, got {pre_logits!r}")
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


class FeatureInfo:
    """timm's ``feature_info`` of a features-only model: the maps' dicts (``num_chs``, ``reduction``,
    ``module``, ``index``) and the indices taken, with the accessors ``channels()``, ``reduction()``,
    ``module_name()``, ``get_dicts()`` (per taken map, or at the given indices)."""

    def __init__(self, info: Sequence[dict[str, Any]], out_indices: Sequence[int]) -> None:
        self.info = [{**d, "index": d.get("index", i)} for i, d in enumerate(copy.deepcopy(list(info)))]
        self.out_indices = tuple(out_indices)

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> Any:
        """``key`` of each taken map (``idx`` None), of map ``idx`` (an int) or of the maps ``idx``."""
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, Sequence):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get_dicts(self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None) -> Any:
        """The dicts (restricted to ``keys``) of the taken maps, or at ``idx``."""
        pick = (lambda d: d) if keys is None else (lambda d: {k: d[k] for k in keys})
        if idx is None:
            return [pick(self.info[i]) for i in self.out_indices]
        if isinstance(idx, Sequence):
            return [pick(self.info[i]) for i in idx]
        return pick(self.info[idx])

    def channels(self, idx: int | Sequence[int] | None = None) -> Any:
        """Channels (``num_chs``) of the taken maps."""
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> Any:
        """Stride of the maps in pixels (the patch size: gMLP is not hierarchical)."""
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> Any:
        """Name of the block each map is taken after."""
        return self.get("module", idx)

    def __getitem__(self, item: int) -> dict[str, Any]:
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)


class FeatureGetterNet(nn.Module):
    """A features-only vision model: ``forward(images)`` returns the list of block maps that
    :meth:`GMLPVision.forward_intermediates` gives for ``out_indices`` (what timm's ``FeatureGetterNet``
    does for ViT and MLP-Mixer). ``create_model(name, features_only=True, out_indices=...)`` builds it.

    Args:
        model: the model to wrap (it is pruned in place with ``prune=True``).
        out_indices: as ``indices`` of :meth:`GMLPVision.forward_intermediates`; None: the last 3 blocks
            (timm's default for ViT and MLP-Mixer), or all of them if there are fewer.
        output_fmt: ``"NCHW"`` (``(B, embed_dim, grid_h, grid_w)``) or ``"NLC"``.
        norm: apply the final LayerNorm to every map.
        prune: drop the blocks after the last map taken, the head, and the final norm unless ``norm``.

    Attributes:
        feature_info: a :class:`FeatureInfo` (``.channels()``, ``.reduction()``, ...).
        pretrained_cfg: the model's, without ``num_classes``, ``classifier`` and ``global_pool``.
    """

    def __init__(
        self,
        model: nn.Module,
        out_indices: int | Sequence[int] | None = None,
        output_fmt: str = "NCHW",
        norm: bool = False,
        prune: bool = True,
    ) -> None:
        super().__init__()
        if not hasattr(model, "forward_intermediates") or not hasattr(model, "feature_info"):
            raise TypeError(
                f"model must have forward_intermediates and feature_info (a GMLPVision), got "
                f"{type(model).__name__}"
            )
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        norm, prune = check_flag(norm, "norm"), check_flag(prune, "prune")
        if out_indices is None:
            out_indices = min(3, len(model.blocks))
        out_indices, _ = feature_take_indices(len(model.blocks), out_indices, "out_indices")
        if prune:  # absolute indices from here on: negative ones would shift with the pruned blocks
            out_indices = model.prune_intermediate_layers(out_indices, prune_norm=not norm)
        self.model = model
        self.out_indices = list(out_indices)
        self.output_fmt = output_fmt
        self.norm = norm
        self.feature_info = FeatureInfo(model.feature_info, self.out_indices)
        self.in_chans = getattr(model, "in_chans", None)
        cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
        for key in ("num_classes", "classifier", "global_pool"):
            cfg.pop(key, None)
        self.pretrained_cfg = cfg

    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name of :attr:`pretrained_cfg`."""
        return self.pretrained_cfg

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images ``(B, C, H, W)`` -> the maps of the blocks ``out_indices``, in block order."""
        return self.model.forward_intermediates(
            x, indices=self.out_indices, norm=self.norm, output_fmt=self.output_fmt, intermediates_only=True
        )


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


#: timm's create_model arguments that gmlp's models do not take, with why (a plain "unexpected keyword
#: argument" would not say what to do instead)
_TIMM_ONLY_ARGUMENTS: dict[str, str] = {
    "scriptable": "timm's layer-config switch selects layer implementations; gmlp's layers have one each, "
    "which torch.jit.script cannot compile: use torch.jit.trace, torch.export.export or "
    "gmlp.export.export_onnx",
    "exportable": "timm's layer-config switch selects layer implementations; gmlp's layers have one each, "
    "which gmlp.export.export_onnx exports as built",
    "no_jit": "timm's layer-config switch selects layer implementations; gmlp's layers have one each",
    "cache_dir": "gmlp downloads no weights: pass a local checkpoint as pretrained=PATH",
    "pretrained_strict": "gmlp loads checkpoints strictly (a head for another num_classes is dropped with "
    "a warning, as in timm)",
    "feature_cfg": "features_only takes out_indices; for output_fmt or norm wrap the model yourself: "
    "gmlp.models.FeatureGetterNet(model, out_indices, output_fmt=..., norm=...)",
    "feature_cls": "features_only always builds gmlp.models.FeatureGetterNet (timm's 'getter')",
    "output_fmt": "for a features_only model wrap it yourself: gmlp.models.FeatureGetterNet(model, "
    "out_indices, output_fmt=...); forward_intermediates takes output_fmt",
}


def _check_arguments(arch: str, kwargs: dict[str, Any]) -> None:
    """A TypeError naming an argument GMLPVision does not take (with what to do instead for timm's), and
    what it takes; timm's layer-config switches given as False are dropped (they change nothing here)."""
    for name in ("scriptable", "exportable", "no_jit"):
        if kwargs.get(name) is False:
            del kwargs[name]
    accepted = set(inspect.signature(GMLPVision).parameters) | {"pretrained_cfg_overlay", "device", "dtype"}
    for name, value in kwargs.items():
        if name not in accepted:
            why = _TIMM_ONLY_ARGUMENTS.get(name)
            detail = f" ({why})" if why else ""
            raise TypeError(
                f"{arch} got an unexpected argument {name}={value!r}{detail}; it takes "
                f"{', '.join(sorted(accepted))} (and create_model's pretrained, checkpoint_path, "
                f"features_only, out_indices)"
            )


def _create(arch: str, cfg: dict[str, Any] | None = None, **kwargs: Any) -> GMLPVision:
    """``GMLPVision(**kwargs)`` with ``pretrained_cfg`` made of ``cfg``, the given one, timm's
    ``pretrained_cfg_overlay`` (merged over it, as in timm) and the architecture name (``arch``, not
    ``variant``: that is GMLPVision's gating-function argument).

    timm's ``device`` and ``dtype`` (which ``timm.create_model`` passes to its models): the model is built
    and initialised on ``device`` directly (on ``"meta"`` nothing is allocated: then ``to_empty`` and
    ``init_weights``, or a checkpoint, see :func:`gmlp.models.loading.load_state_dict_checked`), then
    converted to ``dtype`` (initialised in float32).

    Raises:
        TypeError: an argument GMLPVision does not take (see :func:`_check_arguments`), a cfg not a dict,
            a ``dtype`` that is not a floating-point ``torch.dtype``.
        ValueError: a ``device`` that is not a device.
    """
    device, dtype = _checked_factory(kwargs.pop("device", None), kwargs.pop("dtype", None))
    _check_arguments(arch, kwargs)
    given = _checked_cfg(kwargs.pop("pretrained_cfg", None), "pretrained_cfg")
    overlay = _checked_cfg(kwargs.pop("pretrained_cfg_overlay", None), "pretrained_cfg_overlay")
    # a cfg's sizes are recorded as the model's actual ones (create_model takes a given cfg's sizes as the
    # defaults of the arguments left out, as timm does)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = GMLPVision(pretrained_cfg={**(cfg or {}), **given}, **kwargs)
    if dtype is not None:
        model.to(dtype=dtype)
    sizes = {k: model.pretrained_cfg[k] for k in ("num_classes", "input_size")}
    model.pretrained_cfg.update(overlay)
    model.pretrained_cfg.update(sizes, architecture=arch)
    _fit_channels(model.pretrained_cfg, model.in_chans)  # (an overlay's mean/std too)
    return model


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
    the packaged ``imagenet_gmlp_s`` recipe does); the default here is 0, as in timm's model functions."""
    return _create("gmlp_s16_224", **_defaults(kwargs, patch_size=16, embed_dim=256, depth=30, mlp_ratio=6))


@register_model
def gmlp_b16_224(**kwargs: Any) -> GMLPVision:
    """gMLP-B/16 (paper Table 1): depth 30, d_model 512, d_ffn 3072; 73,075,392 parameters.

    The paper trains it with survival probability 0.80: pass ``drop_path_rate=0.2`` (as
    the packaged ``imagenet_gmlp_b`` recipe does); the default here is 0, as in timm's model functions."""
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
