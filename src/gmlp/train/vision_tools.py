"""``gmlp eval`` and ``gmlp info``: accuracy of a checkpoint on a dataset; size, GMACs and speed of a model.

Checkpoints are found from a file or a run directory (:func:`resolve_checkpoint`); a training run's
``config.json`` supplies the model name, dataset and settings it was trained with. The input channels,
number of classes and image size are read from the weights themselves when not given, so a checkpoint
made for 8x8 grey digits loads into ``gmlp_micro4_28`` without flags. timm checkpoints are converted on the
fly (``gmlp.create_model(name, pretrained=path)``) and evaluated with timm's preprocessing (resize to
``size / crop_pct``, centre crop, the model's mean/std and interpolation).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.loading import _recorded_grid
from ..utils.io import CheckpointError, load_state_dict_file
from .checkpoint import latest_checkpoint
from .distributed import DistEnv, _pick_device
from .recipe import ConfigError, check_cuda_available

__all__ = [
    "build_with_own_head", "checkpoint_shapes", "count_macs", "evaluate_checkpoint", "measure_throughput",
    "model_info", "resolve_checkpoint",
]


def _run_config(path: Path) -> dict[str, Any] | None:
    """A vision training run's settings (``config.json`` with ``model`` and ``dataset``), else None."""
    if path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if isinstance(cfg, dict) and "model" in cfg and "dataset" in cfg:
            return cfg
    return None


def _same_root(a: Any, b: Any) -> bool:
    """Whether two ``--data-root`` values name the same data: equal, or paths to the same folder
    (``data/x``, ``./data/x`` and its absolute path)."""
    if a is None or b is None:
        return False
    if str(a) == str(b):
        return True
    return Path(str(a)).expanduser().resolve() == Path(str(b)).expanduser().resolve()


def resolve_checkpoint(path: str | Path, ema: bool = False) -> tuple[Path, dict[str, Any] | None]:
    """``(weights file, training settings or None)`` for a weights file, a run directory or a checkpoint
    directory. ``ema`` picks a run's ``model_ema.safetensors``.

    Raises:
        FileNotFoundError: no such path, or a directory without the weights.
        ConfigError: ``ema`` with a file.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {str(p)!r}")
    name = "model_ema.safetensors" if ema else "model.safetensors"
    if p.is_file():
        if ema:
            raise ConfigError("--ema needs a run directory (holding model_ema.safetensors), not a file")
        return p, _run_config(p.parent / "config.json")
    if (p / name).is_file():
        cfg = _run_config(p / "config.json")
        if cfg is None and (p / "state.json").is_file():  # a checkpoint directory
            cfg = json.loads((p / "state.json").read_text()).get("config")
        return p / name, cfg
    latest = latest_checkpoint(p)
    if ema:
        trained_with_ema = (_run_config(p / "config.json") or {}).get("ema")
        if latest is not None and trained_with_ema:  # not finished: the EMA weights are in its checkpoints
            raise FileNotFoundError(
                f"{str(p)!r} holds no {name} yet: the run has not finished (`gmlp train --output {p} "
                f"--resume` writes it at the end, from the EMA weights of its checkpoints); without --ema, "
                f"gmlp eval reads its last checkpoint's model weights"
            )
        why = "was the run trained with --ema?"
        if trained_with_ema is False:
            why = "the run was trained without --ema"
        raise FileNotFoundError(f"{str(p)!r} holds no {name} ({why})")
    if latest is None:
        raise FileNotFoundError(f"{str(p)!r} holds neither model.safetensors nor checkpoints/")
    return latest / "model.safetensors", json.loads((latest / "state.json").read_text()).get("config")


def checkpoint_shapes(path: str | Path) -> dict[str, Any]:
    """What the weights say about the model: ``in_chans``, ``num_classes`` (0 for weights saved without a
    head), ``img_size`` (if knowable).

    g-mlp-pytorch files store the patch embedding flattened (``in_chans * p * p`` columns): they are read
    as 3 channels, else as 1 (no width fits both). The grid comes from the file's recorded ``grid_size``,
    else from a square token-mixing weight (``(n, n)``, or ``(heads, n, n)`` with several heads).

    Weights of another layout are read as a timm model's (:func:`_timm_shapes`): a ViT trained by ``gmlp
    train`` / ``compare-vit``, or any timm model whose architecture the file records.
    """
    from ..convert import to_gmlp

    state, metadata = load_state_dict_file(path)
    converted = None
    for channels in (3, 1):
        try:
            converted = to_gmlp(state, in_chans=channels)
            break
        except CheckpointError:
            continue
    if converted is None:
        return _timm_shapes(state, metadata)  # not a gMLP layout: a timm ViT, ...
    state = converted
    out: dict[str, Any] = {}
    stem = state.get("stem.proj.weight")
    if stem is not None and stem.dim() == 4:
        out["in_chans"] = stem.shape[1]
        patch = stem.shape[2:]
        proj = next((v for k, v in state.items() if k.endswith("sgu.proj.weight")), None)
        grid = _recorded_grid(metadata, path)  # (checked: a crafted "a,b" or "1,2,3" is a CheckpointError)
        if grid is not None:
            gh, gw = grid
            if proj is not None and proj.dim() in (2, 3) and proj.shape[-1] != gh * gw:
                raise CheckpointError(
                    f"{path}: its metadata grid_size {gh},{gw} ({gh * gw} tokens) does not fit its spatial "
                    f"weights, which mix {proj.shape[-1]} tokens; the file is corrupt"
                )
            out["img_size"] = (gh * patch[0], gw * patch[1])
        elif proj is not None and proj.dim() in (2, 3) and proj.shape[-1] == proj.shape[-2]:
            side = math.isqrt(proj.shape[-1])
            if side * side == proj.shape[-1]:
                out["img_size"] = (side * patch[0], side * patch[1])
    head = state.get("head.weight")
    if head is not None and head.dim() == 2:
        out["num_classes"] = head.shape[0]
    elif "head.bias" not in state and any(k.startswith("blocks.") for k in state):
        out["num_classes"] = 0  # saved without a head (num_classes=0): a feature extractor
    return out


def _timm_shapes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, Any]:
    """``in_chans``, ``num_classes`` and (ViT-style models) ``img_size`` of a timm model's weights.

    The first convolution and the classifier are those the ``pretrained_cfg`` of the recorded architecture
    (``gmlp train`` writes ``timm:NAME`` into every weights file) names, else ViT's (``patch_embed.proj``,
    ``head``). The grid comes from a ``(1, tokens, dim)`` position embedding: the tokens after the class,
    register and distillation tokens, or all of them (models that embed no position for those), whichever
    count is square. Empty when the weights have neither layer."""
    first, classifiers = "patch_embed.proj", ("head",)
    arch = metadata.get("architecture", "")
    if arch.startswith("timm:"):
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(arch[5:])
        if cfg is not None:
            first = cfg.first_conv or first
            named = cfg.classifier or classifiers
            classifiers = tuple(named) if isinstance(named, (tuple, list)) else (named,)
    out: dict[str, Any] = {}
    conv = state.get(f"{first}.weight")
    if conv is None or conv.dim() != 4:
        return out
    out["in_chans"] = conv.shape[1]
    head = state.get(f"{classifiers[0]}.weight")
    if head is not None and head.dim() == 2:
        out["num_classes"] = head.shape[0]
    elif f"{classifiers[0]}.bias" not in state:
        out["num_classes"] = 0  # saved without a head (num_classes=0): a feature extractor
    pos = state.get("pos_embed")
    if first == "patch_embed.proj" and pos is not None and pos.dim() == 3:
        prefix = sum(state[k].shape[1] for k in ("cls_token", "reg_token", "dist_token")
                     if k in state and state[k].dim() == 3)
        for tokens in (pos.shape[1] - prefix, pos.shape[1]):
            side = math.isqrt(max(tokens, 0))
            if tokens > 0 and side * side == tokens:
                out["img_size"] = (side * conv.shape[2], side * conv.shape[3])
                break
    return out


def build_with_own_head(name: str, weights: Path, why: str, **kwargs: Any) -> nn.Module:
    """``build_model(name, pretrained=weights, **kwargs)``, refusing a checkpoint whose head does not fit the
    model (loading would keep a freshly initialised head, whose outputs mean nothing): a ``ValueError``
    whose message ends with ``why``. Other loading warnings pass through."""
    from .vision import build_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_model(name, pretrained=weights, **kwargs)
    for w in caught:
        if "freshly initialised head" in str(w.message):
            raise ValueError(f"{weights}: {w.message}; {why}")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return model


def _load_for_eval(name: str, weights: Path, num_classes: int, img_size: Any, in_chans: int | None,
                   model_kwargs: dict[str, Any]) -> nn.Module:
    explicit = {"num_classes": num_classes, "img_size": img_size, "in_chans": in_chans}
    why = f"evaluation needs the checkpoint's own head (the dataset has {num_classes} classes)"
    kwargs = {**model_kwargs, **{k: v for k, v in explicit.items() if v is not None}}
    try:
        return build_with_own_head(name, weights, why, **kwargs).eval()
    except CheckpointError:
        raise
    except (ValueError, TypeError) as err:  # a head that does not fit, constructor arguments it refuses: a
        raise ConfigError(str(err)) from err  # usage error of `gmlp eval`, as of `gmlp export`


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    model: str | None = None,
    dataset: str | None = None,
    data_root: str | None = None,
    split: str | None = None,
    img_size: int | None = None,
    batch_size: int = 256,
    workers: int = 4,
    device: str = "auto",
    subset: int | None = None,
    strict_images: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    ema: bool = False,
    precision: str | None = None,
) -> dict[str, Any]:
    """Top-1 / top-5 accuracy and mean cross-entropy of a checkpoint on a dataset split.

    Unset arguments come from the run's ``config.json`` when the checkpoint belongs to a training run. A
    run that read Fashion-MNIST / digits through timm's PIL transforms (``auto_augment``) is evaluated
    through them too (resize and centre crop by the model's ``crop_pct``), as its training evaluated it.
    ``precision`` (``auto``: bf16 autocast on a CUDA GPU that has it, else fp32; ``fp32``; ``bf16``)
    defaults to the run's own ``--precision``, so a run is evaluated as its training evaluated it; the
    result names the one used (``bf16`` or ``fp32``).

    Raises:
        ConfigError: ``batch_size``, ``subset`` or ``img_size`` below 1, ``workers`` below 0, an unknown
            dataset or precision, no ``model`` for a checkpoint outside a training run, ``device='cuda'``
            without CUDA.
        FileNotFoundError: no such checkpoint.
    """
    limits = (("batch_size", batch_size, 1), ("subset", subset, 1), ("workers", workers, 0),
              ("img_size", img_size, 1))
    for name, value, low in limits:
        if value is not None and value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    from ..data import folders
    from ..data.images import load_image_dataset
    from .vision import (
        PIL_DATASETS,
        PRECISIONS,
        TENSOR_DATASETS,
        _evaluate_tensors,
        eval_loader,
        evaluate_loader,
        model_input_size,
        norm_stats,
        pil_transforms,
        uses_bf16,
    )

    if precision is not None and precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    check_cuda_available(device)
    weights, run = resolve_checkpoint(checkpoint, ema=ema)
    run = run or {}
    precision = precision or run.get("precision") or "auto"
    if precision not in PRECISIONS:
        raise ConfigError(
            f"the run's precision {precision!r} is not one of {', '.join(PRECISIONS)}: pass --precision"
        )
    name = model or run.get("model")
    if name is None:
        raise ConfigError(f"{str(checkpoint)!r} is not a training run: pass --model NAME")
    dataset = dataset or run.get("dataset") or "fashion_mnist"
    if dataset not in TENSOR_DATASETS + PIL_DATASETS:
        known = ", ".join(TENSOR_DATASETS + PIL_DATASETS)
        raise ConfigError(f"unknown dataset {dataset!r}; expected one of {known}")
    same_data = dataset == run.get("dataset")
    data_root = data_root or (run.get("data_root") if same_data else None)
    if dataset in PIL_DATASETS and not data_root:
        raise ConfigError(f"dataset {dataset!r} needs --data-root")
    kwargs = dict(model_kwargs if model_kwargs is not None else (run.get("model_kwargs") or {}))
    mean = run.get("mean") if same_data else None
    std = run.get("std") if same_data else None
    shapes = checkpoint_shapes(weights)
    dev = _pick_device(device, 0)
    env = DistEnv(device=dev)

    def evaluate_pil(net: nn.Module, source: Any) -> dict[str, float]:
        """Top-1/top-5/loss of ``net`` through timm's eval transforms (the model's crop_pct, ...)."""
        from .vision import VisionTrainConfig

        chans = model_input_size(net)[0]
        mean_t, std_t = norm_stats(net, chans, mean, std)
        _, eval_tf = pil_transforms(net, VisionTrainConfig(), mean_t, std_t)
        pin = dev.type == "cuda"
        loader = eval_loader(source, eval_tf, chans, batch_size, workers, strict_images, None, pin)
        return evaluate_loader(net, loader, dev, precision, None)

    if dataset in TENSOR_DATASETS:
        test = load_image_dataset(dataset, split or "test", data_root).subset(subset)
        _, chans, h, w = test.images.shape
        if img_size is not None and (img_size, img_size) != (h, w):
            raise ConfigError(
                f"img_size {img_size}: the {dataset} images are {h}x{w} tensors, which are not resized; "
                f"leave img_size unset"
            )
        net = _load_for_eval(name, weights, len(test.classes), (h, w), chans, kwargs).to(dev)
        if same_data and run.get("auto_augment") is not None:  # trained and evaluated through PIL transforms
            result = evaluate_pil(net, folders.TensorSource(test))
        else:
            mean_t, std_t = norm_stats(net, chans, mean, std)
            m, s = (torch.tensor(v, device=dev).view(1, -1, 1, 1) for v in (mean_t, std_t))
            result = _evaluate_tensors(net, test, batch_size, m, s, dev, precision, env)
        split_name = split or "test"
    else:  # imagefolder or hf
        candidates = ("val", "validation", "test")
        if split is None and same_data:  # the split the run validated on (its --val-split), else the first
            split = run.get("val_split")  # of the candidates, as training chose it
        if dataset == "imagefolder":
            root = Path(data_root).expanduser()
            classes = None
            train_split = (run.get("train_split") if same_data else None) or "train"
            if split != train_split and (root / train_split).is_dir():  # number the classes as training did
                classes = folders.folder_classes(root / train_split)
            source = folders.image_folder_source(root, split, classes, candidates=candidates)
            split_name = source.root.name
        else:
            # the run's --image-key/--label-key name columns of its own dataset, not of another --data-root
            own = same_data and _same_root(data_root, run.get("data_root"))
            source = folders.hf_source(data_root, split, candidates=("validation", "val", "test"),
                                       image_key=run.get("image_key") if own else None,
                                       label_key=run.get("label_key") if own else None)
            head, found = shapes.get("num_classes"), len(source.classes)
            if head and found < head and source.classes == tuple(map(str, range(found))):
                # integer labels without class names: the classes are 0..n-1 of the training split, which
                # trained the head; this split may lack the highest labels (it gave one class per label seen)
                source.classes = tuple(str(i) for i in range(head))
            split_name = source.name.rsplit("[", 1)[-1].rstrip("]")
        source = folders.subset_source(source, subset)
        size = img_size or run.get("img_size") or shapes.get("img_size")
        net = _load_for_eval(name, weights, len(source.classes), size, shapes.get("in_chans"), kwargs).to(dev)
        result = evaluate_pil(net, source)
    return {"model": name, "checkpoint": str(weights), "dataset": dataset, "split": str(split_name),
            "top1": result["accuracy"], "top5": result["top5"], "loss": result["loss"],
            "count": result["count"], "precision": "bf16" if uses_bf16(dev, precision) else "fp32",
            **({"skipped_images": result["skipped_images"]} if "skipped_images" in result else {})}


# --- info ----------------------------------------------------------------------------------------------


def count_macs(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one forward pass on one image (torch.utils.flop_counter: matmuls and
    convolutions; FLOPs = 2 x MACs)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, *input_size, device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:  # (also when the model refuses the input)
        model.train(was_training)
    return counter.get_total_flops() // 2


@torch.no_grad()
def measure_throughput(model: nn.Module, input_size: tuple[int, int, int], batch_size: int = 32,
                       seconds: float = 3.0, device: torch.device | None = None) -> float:
    """Inference images per second (eval mode; bf16 autocast on CUDA) over about ``seconds``.

    The model is put back in the mode (train or eval) it was in, and the input comes from a generator of its
    own (the caller's random stream is left alone)."""
    from .vision import _autocast

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, *input_size, generator=torch.Generator().manual_seed(0)).to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    try:
        with _autocast(device, "auto"):
            for _ in range(2):
                model(x)
            sync()
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds or n < 3:
                model(x)
                n += 1
            sync()
    finally:
        model.train(was_training)
    return n * batch_size / (time.perf_counter() - start)


def model_info(name: str, *, img_size: int | None = None, in_chans: int | None = None,
               num_classes: int | None = None, throughput: bool = False, batch_size: int = 32,
               device: str = "auto", model_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Parameters, GMACs per image and (optionally) inference throughput of a model; ``summary`` is a text.

    Raises:
        ConfigError: an unknown model, ``img_size`` / ``in_chans`` below 1, ``num_classes`` below 0, or
            (with ``throughput``) ``batch_size`` below 1 or ``device='cuda'`` without CUDA.
    """
    from ..models import list_models
    from .vision import build_model, model_input_size

    if name.startswith("timm:"):
        import timm

        if not timm.is_model(name[5:]):
            raise ConfigError(f"unknown timm model {name[5:]!r}")
    elif name not in list_models():
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())} (or timm:NAME)")
    sizes = (("img_size", img_size, 1), ("in_chans", in_chans, 1), ("num_classes", num_classes, 0))
    for arg, value, low in sizes:
        if value is not None and value < low:
            raise ConfigError(f"{arg} must be >= {low}, got {value}")
    if batch_size < 1:  # also without --throughput: a bad value is refused, not ignored
        raise ConfigError(f"batch_size (of the throughput measurement) must be >= 1, got {batch_size}")
    if throughput:
        check_cuda_available(device)

    explicit = {"num_classes": num_classes, "img_size": img_size, "in_chans": in_chans}
    given = {k: v for k, v in explicit.items() if v is not None}
    model = build_model(name, **{**(model_kwargs or {}), **given})
    params = sum(p.numel() for p in model.parameters())
    input_size = model_input_size(model)
    macs = count_macs(model, input_size)
    info: dict[str, Any] = {"model": name, "params": params, "input_size": input_size, "gmacs": macs / 1e9,
                            "gflops": 2 * macs / 1e9}
    lines = [f"{name}: {params:,} parameters, input {input_size}, {macs / 1e9:.3f} GMACs "
             f"({2 * macs / 1e9:.3f} GFLOPs) per image"]
    if hasattr(model, "blocks") and hasattr(model, "embed_dim"):
        tokens = getattr(getattr(model, "stem", None), "num_patches", None)
        tokens_text = f", tokens {tokens}" if tokens else ""
        lines.append(f"  {len(model.blocks)} blocks, width {model.embed_dim}{tokens_text}")
    if throughput:
        dev = _pick_device(device, 0)
        model.to(dev)
        ips = measure_throughput(model, input_size, batch_size, device=dev)
        info["throughput"] = ips
        lines.append(f"  throughput {ips:,.1f} images/s (batch {batch_size}, {dev})")
    info["summary"] = "\n".join(lines)
    return info

