"""Loading checkpoints into models: format conversion, resolution change, clear mismatch errors."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..convert import to_gmlp
from ..nn.resample import resample_spatial_bias, resample_spatial_weight
from ..utils.io import CheckpointError, load_state_dict_file, save_state_dict_file

__all__ = [
    "load_pretrained",
    "load_state_dict_checked",
    "normalisation_metadata",
    "restore_normalisation",
    "save_model",
]


def _recorded_grid(metadata: dict[str, str], path: str | Path) -> tuple[int, int] | None:
    """The patch grid a weights file records (``grid_size``: ``"H,W"``, as :func:`save_model` writes it), or
    None where it records none.

    Raises:
        CheckpointError: a ``grid_size`` that is not two ints >= 1 (a corrupt or crafted file).
    """
    if "grid_size" not in metadata:
        return None
    text = metadata["grid_size"]
    parts = text.split(",")
    if len(parts) == 2 and all(p.strip().isascii() and p.strip().isdigit() for p in parts):
        h, w = int(parts[0]), int(parts[1])
        if h >= 1 and w >= 1:
            return h, w
    raise CheckpointError(
        f"{path}: its metadata grid_size must be two ints >= 1, 'H,W' (the patch grid its spatial weights "
        f"were made for), got {text[:100]!r}; the file is corrupt or was not written by gmlp"
    )


def _read_normalisation(metadata: dict[str, str], path: str | Path) -> dict[str, tuple[float, ...]]:
    """The input normalisation a weights file records (``mean``, ``std``: :func:`normalisation_metadata`),
    checked: finite numbers, std > 0, as many of each.

    Raises:
        CheckpointError: a value that is not that (a corrupt or crafted file), naming the key and value.
    """
    out: dict[str, tuple[float, ...]] = {}
    for key in ("mean", "std"):
        if key not in metadata:
            continue
        text = metadata[key]
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            values = ()
        positive = key == "std"
        if not values or not all(math.isfinite(v) and (v > 0 or not positive) for v in values):
            kind = "numbers > 0" if positive else "finite numbers"
            raise CheckpointError(
                f"{path}: its metadata {key} must be comma-separated {kind} (the input normalisation the "
                f"weights were trained with), got {text[:100]!r}; the file is corrupt or was not written by "
                f"gmlp"
            )
        out[key] = values
    if len(out) == 2 and len(out["mean"]) != len(out["std"]):
        mean, std = metadata["mean"][:100], metadata["std"][:100]
        raise CheckpointError(
            f"{path}: its metadata mean and std need one value per input channel each, got "
            f"{len(out['mean'])} and {len(out['std'])} ({mean!r}, {std!r})"
        )
    return out


def _grid_from(recorded: tuple[int, int] | None, n: int) -> tuple[int, int]:
    if recorded is not None:
        h, w = recorded
        if h * w == n:
            return h, w
    side = math.isqrt(n)
    if side * side != n:
        raise CheckpointError(
            f"checkpoint spatial weights are for {n} tokens, which is not a square grid, and the checkpoint "
            f"does not record its grid_size"
        )
    return side, side


def load_state_dict_checked(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(strict=True)``, but with an error that names the offending keys.

    A model with tensors on the meta device (built with ``device="meta"`` or under ``torch.device("meta")``)
    takes the checkpoint's tensors themselves (``assign=True``, converted to the model's dtypes), as
    transformers' ``from_pretrained`` does for a model made without memory: copying into meta tensors would
    do nothing, and leave the model without weights.

    Raises:
        CheckpointError: missing, unexpected or misshapen keys; or a meta model given meta tensors (which
            hold no values) in ``state_dict``.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[:5]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[:5]})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (first: {mismatched[:5]})")
        raise CheckpointError("checkpoint does not fit the model: " + "; ".join(parts))
    if any(t.is_meta for t in own.values()):
        empty = [k for k, v in state_dict.items() if v.is_meta]
        if empty:
            raise CheckpointError(
                f"the model is on the meta device and {len(empty)} tensors to load are meta tensors too, "
                f"without values (first: {empty[:5]}); load real tensors"
            )
        state_dict = {k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        model.load_state_dict(state_dict, strict=True, assign=True)
        return
    model.load_state_dict(state_dict, strict=True)


def load_pretrained(model: nn.Module, path: str | Path, *, size_given: bool = True) -> None:
    """Load a checkpoint file (ours, timm's or g-mlp-pytorch's) into a vision model.

    - timm / g-mlp-pytorch layouts are converted (:mod:`gmlp.convert`);
    - spatial weights made for another patch grid are resampled to the model's grid
      (:func:`gmlp.nn.resample_spatial_weight`), so a 224 px checkpoint loads into a 256 px model; with
      ``size_given=False`` (``create_model`` without ``img_size``: the model is at its default size, not
      at one the caller chose) that resampling warns, naming the ``img_size`` that loads them as trained;
    - a classifier head with another number of classes is dropped (the model keeps its fresh head), with
      a warning, as timm does when ``num_classes`` differs; so is a checkpoint without a head (saved with
      ``num_classes=0``) loaded into a model with one;
    - the input normalisation recorded in the file goes into ``model.pretrained_cfg`` once the weights are
      loaded (a load that fails leaves the model as it was);
    - a model on the meta device (``create_model(name, device="meta", pretrained=PATH)``) takes the file's
      tensors, in the model's dtypes (:func:`load_state_dict_checked`), and a head kept fresh is zeros.

    Raises:
        FileNotFoundError, CheckpointError: unreadable file, or keys/shapes that do not fit.
    """
    state, metadata = load_state_dict_file(path)
    normalisation = _read_normalisation(metadata, path)  # (checked before anything is loaded)
    state = to_gmlp(state, in_chans=getattr(model, "in_chans", 3))
    text_keys = any(k.startswith("gmlp.") for k in state)
    if text_keys and not any(k.startswith("gmlp.") for k in model.state_dict()):
        raise CheckpointError(
            f"{path} holds a text model (its keys start with 'gmlp.', as in GMLPForMaskedLM), not a vision "
            f"model; load it with gmlp.models.text (e.g. GMLPModel.from_pretrained)"
        )
    grid = getattr(model, "grid_size", None)
    if grid is not None:
        n_model = grid[0] * grid[1]
        recorded = _recorded_grid(metadata, path)
        same_grid = recorded is None or recorded == (grid[0], grid[1])
        warn = grid[0] != grid[1] and recorded is None  # once, at the first spatial weight
        for key in [k for k in state if k.endswith("sgu.proj.weight")]:
            n_ckpt = state[key].shape[-1]
            if n_ckpt == n_model and same_grid:
                if warn:
                    side = math.isqrt(n_model)
                    square = f"{side}x{side} (timm and g-mlp-pytorch make square grids only) or " if (
                        side * side == n_model
                    ) else ""
                    warnings.warn(
                        f"{path} does not record the patch grid its spatial weights were made for; they are "
                        f"read on the model's {grid[0]}x{grid[1]} grid (a checkpoint made for {square}"
                        f"{grid[1]}x{grid[0]} would need resampling: gmlp.nn.resample_spatial_weight)",
                        stacklevel=3,
                    )
                    warn = False
                continue  # (a recorded grid with as many tokens but another shape is resampled)
            old = _grid_from(recorded, n_ckpt)
            if not size_given:
                _warn_resampled(path, model, old, grid)
                size_given = True  # once, at the first spatial weight
            state[key] = resample_spatial_weight(state[key], old, grid)
            bias_key = key[: -len("weight")] + "bias"
            if bias_key in state:
                state[bias_key] = resample_spatial_bias(state[bias_key], old, grid)
    head = getattr(model, "head", None)
    ckpt_head = state.get("head.weight")
    classes = ckpt_head.shape[0] if ckpt_head is not None and ckpt_head.dim() == 2 else None
    if ckpt_head is None and "head.bias" not in state and any(k.startswith("blocks.") for k in state):
        classes = 0  # saved with num_classes=0 (a feature extractor)
    if isinstance(head, nn.Linear) and classes is not None and classes != head.out_features:
        # another number of classes, or none (a head of another width is a mismatch, reported below)
        warnings.warn(
            f"checkpoint head has {classes} classes, the model {head.out_features}: keeping the model's "
            f"freshly initialised head",
            stacklevel=3,
        )
        state["head.weight"], state["head.bias"] = _fresh(head.weight), _fresh(head.bias)
    elif not isinstance(head, nn.Linear):
        state.pop("head.weight", None)
        state.pop("head.bias", None)
    load_state_dict_checked(model, state)
    _set_normalisation(model, normalisation)  # only once the weights are in: a failed load changes nothing


def _fresh(param: torch.Tensor) -> torch.Tensor:
    """A copy of the model's freshly initialised head tensor ``param``, to load in place of the checkpoint's;
    zeros (GMLPVision's head init) where the model is on the meta device and ``param`` has no values."""
    if param.is_meta:  # (on the CPU, as the file's tensors: also under a torch.device("meta") context)
        return torch.zeros(param.shape, dtype=param.dtype, device="cpu")
    return param.detach().clone()


def restore_normalisation(model: nn.Module, metadata: dict[str, str]) -> None:
    """Put the input normalisation recorded in a weights file's ``metadata`` (:func:`normalisation_metadata`)
    into ``model.pretrained_cfg``, for gmlp and timm models alike.

    Raises:
        CheckpointError: a ``mean`` or ``std`` that is not comma-separated finite numbers (std > 0, as many
            as mean); ``model`` is then left as it was.
    """
    _set_normalisation(model, _read_normalisation(metadata, "checkpoint"))


def _set_normalisation(model: nn.Module, normalisation: dict[str, tuple[float, ...]]) -> None:
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict):
        cfg.update(normalisation)


def normalisation_metadata(mean: Sequence[float] | None, std: Sequence[float] | None) -> dict[str, str]:
    """The input normalisation the weights were trained with, as safetensors metadata (``"mean"``,
    ``"std"``: comma-separated floats; :func:`load_pretrained` restores them into ``pretrained_cfg``)."""
    pairs = (("mean", mean), ("std", std))
    return {key: ",".join(repr(float(v)) for v in values) for key, values in pairs if values is not None}


def _warn_resampled(path: str | Path, model: nn.Module, old: tuple[int, int], grid: tuple[int, int]) -> None:
    patch = getattr(model, "patch_size", None)
    size = f"img_size={(old[0] * patch[0], old[1] * patch[1])}" if patch else "its image size"
    if patch and old[0] * patch[0] == old[1] * patch[1]:
        size = f"img_size={old[0] * patch[0]}"
    warnings.warn(
        f"{path} holds spatial weights for a {old[0]}x{old[1]} patch grid; the model is built at its "
        f"default size (a {grid[0]}x{grid[1]} grid), so they were resampled and its outputs are not the "
        f"checkpoint's: "
        f"pass {size} to create_model to load them as trained (any img_size given explicitly resamples "
        f"without this warning)",
        stacklevel=4,
    )


def save_model(model: nn.Module, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Save a vision model's weights as safetensors (atomically), recording its architecture, grid and
    input normalisation (``pretrained_cfg`` ``mean``/``std``, which :func:`load_pretrained` restores).

    ``state_dict`` replaces ``model.state_dict()`` (e.g. the gathered full state of an FSDP-sharded model).
    """
    metadata = {"format": "gmlp"}
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    if "architecture" in cfg:
        metadata["architecture"] = str(cfg["architecture"])
    metadata.update(normalisation_metadata(cfg.get("mean"), cfg.get("std")))
    grid = getattr(model, "grid_size", None)
    if grid is not None:
        metadata["grid_size"] = f"{grid[0]},{grid[1]}"
    save_state_dict_file(model.state_dict() if state_dict is None else state_dict, path, metadata)
