"""A timm-style model registry: ``register_model``, ``list_models``, ``create_model``."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["register_model", "list_models", "create_model", "is_model"]

_MODEL_FNS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model factory under its function name (decorator)."""
    name = fn.__name__
    if name in _MODEL_FNS:
        raise ValueError(f"model {name!r} is already registered")
    _MODEL_FNS[name] = fn
    return fn


def is_model(name: str) -> bool:
    """True if ``name`` is a registered model (False for anything but a str, a list included)."""
    return isinstance(name, str) and name in _MODEL_FNS


def _patterns(value: Any, arg: str) -> list[str]:
    """A shell-style pattern or an iterable of them as a list (empty for ``""`` or None), as in timm."""
    if not value:
        return []
    if isinstance(value, str):
        return [value]
    values = list(value) if isinstance(value, Iterable) else None
    if values is not None and all(isinstance(v, str) for v in values):
        return values
    raise TypeError(f"{arg} must be a shell-style pattern (str) or a list of them, got {value!r}")


def list_models(
    filter: str | Iterable[str] = "",
    pretrained: bool = False,
    exclude_filters: str | Iterable[str] = "",
) -> list[str]:
    """Sorted names of the registered models, with timm's arguments.

    Args:
        filter: shell-style pattern(s) (``"gmlp_*16_224"``, or a list: a name matching any is listed);
            ``""`` lists all.
        pretrained: only models with hosted pretrained weights, as in timm: gmlp has none, so ``True``
            gives an empty list (load local checkpoints with ``create_model(name, pretrained=PATH)``).
        exclude_filters: pattern(s) of names to leave out.

    Raises:
        TypeError: a filter not a pattern or a list of them, ``pretrained`` not a bool.
    """
    include, exclude = _patterns(filter, "filter"), _patterns(exclude_filters, "exclude_filters")
    if not isinstance(pretrained, bool):  # a str such as "no" would be truthy
        raise TypeError(f"pretrained must be True or False, got {pretrained!r}")
    if pretrained:
        return []
    names = [n for n in _MODEL_FNS if not include or any(fnmatch.fnmatchcase(n, f) for f in include)]
    return sorted(n for n in names if not any(fnmatch.fnmatchcase(n, f) for f in exclude))


def create_model(
    name: str,
    pretrained: bool | str | Path | None = None,
    *,
    checkpoint_path: str | Path | None = None,
    features_only: bool = False,
    out_indices: int | Sequence[int] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model, optionally loading weights.

    Args:
        name: a name from :func:`list_models`.
        pretrained: path to a checkpoint: one of ours (``.safetensors``) or a timm / g-mlp-pytorch
            state dict (``.pth``, ``.bin``, ``.safetensors``), converted on the fly. If the model is built
            for another image size than the checkpoint, the spatial weights are resampled. ``False`` or
            None: no weights (random initialisation), as in timm. ``True`` is refused: timm would download
            hosted weights, and gmlp has none to download. Without ``img_size`` the model is built at its
            default size; a checkpoint made for another grid then loads resampled with a warning naming the
            ``img_size`` that loads it as trained.
        checkpoint_path: timm's name for the same thing (a local checkpoint); give this or a path as
            ``pretrained``, not both.
        features_only: return a feature extractor (:class:`gmlp.models.vision.FeatureGetterNet`) whose
            forward gives the list of block maps ``(B, embed_dim, grid_h, grid_w)``, as timm's for ViT and
            MLP-Mixer; the blocks after the last map, the final norm and the head are pruned, so the head's
            arguments are refused with it (``num_classes`` other than 0, ``global_pool`` other than ``""``,
            ``drop_rate`` other than 0).
        out_indices: with ``features_only``, the blocks whose maps are returned: an int ``n`` = the last
            ``n`` (None: 3, timm's default), or a list of block indices (negative ones count from the end).
        **kwargs: overrides of the model's constructor arguments (``num_classes``, ``img_size``,
            ``drop_path_rate``, ...); as in timm, one given as None keeps the model's default. timm's
            ``device`` and ``dtype`` too: ``device="meta"`` allocates nothing, and with a checkpoint the
            model takes the file's tensors (in ``dtype``, if given) instead of initialising its own. A
            ``mean`` or ``std`` given in ``pretrained_cfg`` or timm's ``pretrained_cfg_overlay`` wins over
            the one a checkpoint records (which the loading otherwise puts into ``pretrained_cfg``).

    Raises:
        ValueError: unknown model name (the message lists the known ones), ``pretrained=True``, an empty
            path, a path given both ways, or a ``pretrained`` that is neither a bool nor a path;
            ``out_indices`` without ``features_only`` or out of range; a head argument with
            ``features_only``.
        TypeError: ``features_only`` not a bool.
    """
    if not isinstance(name, str) or name not in _MODEL_FNS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    path = _checkpoint_argument(pretrained, checkpoint_path)
    if not isinstance(features_only, bool):
        raise TypeError(f"features_only must be True or False, got {features_only!r}")
    if out_indices is not None and not features_only:
        raise ValueError(f"out_indices={out_indices!r} is only used with features_only=True")
    # as timm: arguments left at None (e.g. unset command-line options) keep the model's defaults
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if features_only:
        for arg, pruned in (("num_classes", 0), ("global_pool", ""), ("drop_rate", 0)):
            if arg in kwargs and kwargs[arg] != pruned:  # (a bad type is then refused by the model)
                raise ValueError(
                    f"{arg}={kwargs[arg]!r} has no effect with features_only=True: the feature extractor's "
                    f"classifier head (pooling, dropout and linear layer) is pruned; leave {arg} out"
                )
        kwargs.setdefault("num_classes", 0)  # the head is pruned: no checkpoint head to fit
    _sizes_from_cfg(kwargs)
    given_cfg = {key for arg in ("pretrained_cfg", "pretrained_cfg_overlay")
                 if isinstance(kwargs.get(arg), dict) for key in kwargs[arg]}  # fmt: skip
    model = _MODEL_FNS[name](**kwargs)
    if path is not None:
        from .loading import load_pretrained

        cfg = getattr(model, "pretrained_cfg", None)
        cfg = cfg if isinstance(cfg, dict) else {}
        # the caller's normalisation over the checkpoint's (which the loading restores): else ignored
        kept = {k: cfg[k] for k in ("mean", "std") if k in given_cfg and k in cfg}
        load_pretrained(model, path, size_given="img_size" in kwargs)
        if kept:
            model.pretrained_cfg.update(kept)
    if features_only:
        from .vision import FeatureGetterNet

        return FeatureGetterNet(model, out_indices)
    return model


def _sizes_from_cfg(kwargs: dict[str, Any]) -> None:
    """As timm: a ``pretrained_cfg`` (or ``pretrained_cfg_overlay``, over it) that records ``num_classes``
    or ``input_size`` (C, H, W) gives the defaults of ``num_classes``, ``in_chans`` and ``img_size`` where
    those arguments are left out (given ones win; the model records its actual sizes in its cfg).

    Raises:
        ValueError: an ``input_size`` that is not three positive ints.
    """
    cfgs = [kwargs.get(a) for a in ("pretrained_cfg", "pretrained_cfg_overlay")]
    merged = {k: v for cfg in cfgs if isinstance(cfg, dict) for k, v in cfg.items()}  # (else: model's error)
    if merged.get("num_classes") is not None:
        kwargs.setdefault("num_classes", merged["num_classes"])
    size = merged.get("input_size")
    if size is None:
        return
    try:
        chans, height, width = (int(v) for v in size)
        ok = min(chans, height, width) >= 1 and all(float(v) == int(v) for v in size)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"pretrained_cfg's input_size must be (in_chans, height, width), three ints >= 1, "
                         f"got {size!r}")
    kwargs.setdefault("in_chans", chans)
    kwargs.setdefault("img_size", (height, width))


def _checkpoint_argument(pretrained: Any, checkpoint_path: Any) -> str | Path | None:
    """The checkpoint to load from ``create_model``'s ``pretrained`` and ``checkpoint_path``, or None."""
    if pretrained is True:
        raise ValueError(
            "pretrained=True would download hosted weights in timm; gmlp has none to download: pass a "
            "local checkpoint as pretrained=PATH or checkpoint_path=PATH (ours, timm's or g-mlp-pytorch's)"
        )
    paths = []
    for arg, value in (("pretrained", pretrained), ("checkpoint_path", checkpoint_path)):
        if value is None or value is False:
            continue
        if not isinstance(value, (str, Path)):
            raise ValueError(f"{arg} must be a path (str or Path), None or False; got {value!r}")
        if str(value) == "":
            raise ValueError(f"{arg} is an empty path; pass None for no weights")
        paths.append(value)
    if len(paths) == 2:
        raise ValueError(
            f"both pretrained={str(paths[0])!r} and checkpoint_path={str(paths[1])!r} given; pass one"
        )
    return paths[0] if paths else None
