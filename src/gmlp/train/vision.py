"""Image classification training (``gmlp train``): AdamW, warmup + cosine, checkpoints, exact resume.

Two input pipelines:

- **tensor** (``fashion_mnist``, ``digits`` without ``auto_augment``): uint8 images held in memory, batches
  indexed straight from the tensor, random shift + flip on the batch. No per-sample Python work: the default
  ``gmlp train`` (Fashion-MNIST, >= 89% test accuracy in 10 minutes on 2 CPU cores) runs this way.
- **PIL** (``imagefolder``, ``hf``, or any dataset with ``auto_augment``): a DataLoader (worker processes,
  pinned memory) over :mod:`gmlp.data.folders` with timm's transforms (``create_transform`` from the model's
  pretrained_cfg: resize / crop / interpolation / mean / std, RandAugment or AutoAugment).

On the batch, both pipelines can apply timm's ``Mixup``/CutMix (with ``SoftTargetCrossEntropy``) and
``RandomErasing``; timm's ``ModelEmaV3`` keeps an optional weight average that is evaluated alongside.
``batch_size`` is the *global* batch of one optimizer step, split over ``torchrun`` processes and
``grad_accum_steps`` micro-steps (:mod:`gmlp.data.sampling`). Several processes replicate the model
(``strategy="ddp"``: DistributedDataParallel) or shard it (``strategy="fsdp"``: FSDP2 ``fully_shard`` per
block); checkpoints hold the full model either way.

Determinism: the data order of epoch ``e`` is a permutation seeded by ``(seed, e)`` and every random choice
inside step ``s`` (augmentation, mixup, erasing, dropout, stochastic depth) is seeded by ``(seed, s)`` (and
the sample's position, or the micro-batch's place in the global batch). A run resumed from a checkpoint
therefore continues exactly as the uninterrupted run would have; one resumed on another number of processes
or accumulation steps (the same global batch) continues with the same data and, where processes x
accumulation steps is the same, the same random draws (the gradients summed in another order).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.images import ImageSplit, load_image_dataset
from ..data.sampling import StepBatches, step_seed
from ..models import create_model
from ..models.loading import normalisation_metadata, save_model
from ..utils.io import append_line
from ..utils.malloc import tune_malloc
from ..utils.progress import progress_bar
from ..utils.state import import_timm_optim, restoring_process_state
from .checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    remove_run_files,
    save_checkpoint,
    write_json_atomic,
)
from .distributed import (
    DistEnv,
    all_reduce_max,
    all_reduce_sum,
    assert_in_sync,
    barrier,
    full_model_state_dict,
    full_state_dicts,
    holding_output,
    init_distributed,
    load_full_optimizer_state,
    shard_model,
    shutdown,
)
from .interrupt import StopRequest, ignore_stop_signals
from .recipe import ConfigError
from .vision_config import (  # the settings live in a torch-free module (for the CLI); re-exported here
    PIL_DATASETS,  # noqa: F401 (re-exported: gmlp.train.vision_tools imports it from here)
    PRECISIONS,  # noqa: F401 (re-exported, as PIL_DATASETS)
    TENSOR_DATASETS,
    VisionTrainConfig,
)

__all__ = ["TENSOR_DATASETS", "VisionTrainConfig", "build_model", "evaluate", "train_vision"]

# --- models --------------------------------------------------------------------------------------------


_AUTO_AUGMENT_EXAMPLES = (
    "rand-m9-mstd0.5-inc1 (RandAugment), original or v0 (AutoAugment), augmix-m5-w4-d2, 3a"
)


def _check_auto_augment(policy: str) -> None:
    """Refuse an ``auto_augment`` string that timm's ``create_transform`` would reject when the run starts
    (with a bare ``AssertionError``, after the run's folder was written) or would partly ignore: timm skips
    a section without a number (``rand-mx`` ran RandAugment at its default magnitude)."""
    import re

    from timm.data import auto_augment as aa

    kind = next((k for k in ("rand", "augmix", "original", "v0", "3a") if policy.startswith(k)), None)
    if kind is None:
        raise ConfigError(f"auto_augment {policy!r} is not a timm policy (e.g. {_AUTO_AUGMENT_EXAMPLES})")
    _, *sections = policy.split("-")
    ignored = [s for s in sections if not re.search(r"\d", s) and not (kind == "rand" and s.startswith("t"))]
    if ignored:
        raise ConfigError(
            f"auto_augment {policy!r}: section(s) {', '.join(map(repr, ignored))} hold no value, which timm "
            f"would silently ignore (sections are a letter key and a number: m9, mstd0.5, inc1, n2; e.g. "
            f"{_AUTO_AUGMENT_EXAMPLES})"
        )
    build = {"rand": aa.rand_augment_transform, "augmix": aa.augment_and_mix_transform}.get(
        kind, aa.auto_augment_transform
    )
    try:
        build(policy, {"translate_const": 100, "img_mean": (128, 128, 128)})
    except (AssertionError, ValueError, KeyError, TypeError, IndexError) as err:
        reason = str(err) or "timm cannot parse it"
        raise ConfigError(
            f"auto_augment {policy!r} is not a valid timm policy ({reason}); e.g. {_AUTO_AUGMENT_EXAMPLES}"
        ) from None


def _timm_schedule_error(name: str, schedule: str) -> ConfigError:
    return ConfigError(
        f"drop_path_schedule {schedule!r} is a setting of the gmlp models, which timm model {name[5:]!r} "
        f"does not take: a timm model spreads drop_path_rate over its blocks by its own rule (timm's ViT, "
        f"DeiT, Swin, ConvNeXt, ResNet: growing linearly with depth; its MLP-Mixer and gMLP: uniform); leave "
        f"drop_path_schedule at 'uniform' (unused for timm models)"
    )


def _create_timm(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model`` of ``timm:NAME``. Arguments the model's constructor does not take are left out
    where leaving them out changes nothing: ``img_size`` for size-agnostic (convolutional) models, whose
    ``pretrained_cfg['input_size']`` records it instead (the transforms and ``model_input_size`` read it),
    and ``drop_path_rate`` / ``drop_rate`` of 0.

    Raises:
        ConfigError: a drop rate above 0 that the model does not take.
    """
    import timm

    kwargs = dict(kwargs)
    size = kwargs.get("img_size")
    if isinstance(size, (tuple, list)) and size[0] == size[1]:
        kwargs["img_size"] = size[0]
    left_out: dict[str, Any] = {}
    while True:
        try:
            model = timm.create_model(name[5:], pretrained=False, **kwargs)
            break
        except TypeError as err:
            key = next((k for k in ("img_size", "drop_path_rate", "drop_rate")
                        if k in kwargs and f"unexpected keyword argument '{k}'" in str(err)), None)
            if key is None:
                raise
            if key != "img_size" and kwargs[key] != 0:
                raise ConfigError(f"{key} {kwargs[key]}: timm model {name[5:]!r} takes no {key}; set it to 0"
                                  ) from err
            left_out[key] = kwargs.pop(key)
    if "img_size" in left_out:
        size = left_out["img_size"]
        h, w = (size, size) if isinstance(size, int) else size
        chans = kwargs.get("in_chans", (model.pretrained_cfg.get("input_size") or (3,))[0])
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (int(chans), int(h), int(w))}
    return model


def build_model(name: str, pretrained: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """A gmlp model (``create_model``) or, with a ``timm:`` prefix, a timm one (``timm.create_model``).

    ``kwargs`` are constructor arguments (``num_classes``, ``img_size``, ``in_chans``, ``drop_path_rate``,
    ...); None values are left out (the model's default applies). ``drop_path_schedule`` and ``drop_rate``
    at their defaults are not passed to gmlp models. timm models take no ``drop_path_schedule`` (their own
    rule spreads ``drop_path_rate`` over the blocks): ``'uniform'`` is left out, another value refused; an
    ``img_size`` a size-agnostic timm model does not take is recorded in its ``pretrained_cfg`` instead.

    Raises:
        ConfigError: ``drop_path_schedule`` other than ``'uniform'`` for a timm model, or a drop rate above
            0 that a timm model does not take.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if name.startswith("timm:") and kwargs.get("drop_path_schedule", "uniform") != "uniform":
        raise _timm_schedule_error(name, kwargs["drop_path_schedule"])
    if kwargs.get("drop_path_schedule") == "uniform":
        del kwargs["drop_path_schedule"]
    if kwargs.get("drop_rate") == 0.0 and not name.startswith("timm:"):
        del kwargs["drop_rate"]
    if name.startswith("timm:"):
        model = _create_timm(name, kwargs)
        model.pretrained_cfg = {**model.pretrained_cfg, "architecture": name}
        if pretrained is not None:
            from ..models.loading import _read_normalisation, _set_normalisation, load_state_dict_checked
            from ..utils.io import load_state_dict_file

            state, metadata = load_state_dict_file(pretrained)
            normalisation = _read_normalisation(metadata, pretrained)  # (checked first, the file named)
            load_state_dict_checked(model, state)
            _set_normalisation(model, normalisation)  # (gmlp eval of a compare-vit ViT: its mean/std)
        return model
    return create_model(name, pretrained=pretrained, **kwargs)


def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """``(channels, height, width)`` the model was built for."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    chans = getattr(model, "in_chans", None)
    if chans is None and cfg.get("first_conv"):
        with contextlib.suppress(AttributeError):
            chans = model.get_submodule(cfg["first_conv"]).in_channels
    size = getattr(model, "img_size", None)
    if size is None and hasattr(model, "patch_embed"):
        size = getattr(model.patch_embed, "img_size", None)
    fallback = cfg.get("input_size", (3, 224, 224))
    chans = chans or fallback[0]
    if size is None:
        size = fallback[1:]
    if isinstance(size, int):
        size = (size, size)
    return int(chans), int(size[0]), int(size[1])


def norm_stats(model: nn.Module, chans: int, mean: Any = None, std: Any = None) -> tuple[tuple, tuple]:
    """Normalisation mean/std: the given ones (one per channel, or one for all), else the model's
    pretrained_cfg (3 values averaged for 1 channel, 1 value repeated for 3).

    Raises:
        ConfigError: a given mean or std with neither one value nor one per channel.
    """
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    out = []
    for given, key in ((mean, "mean"), (std, "std")):
        values = tuple(given if given is not None else cfg.get(key, (0.5,) * chans))
        if given is not None and len(values) not in (1, chans):
            raise ConfigError(
                f"--{key} has {len(values)} values {values}; the images have {chans} channel(s): give "
                f"{chans} value(s) or one for all"
            )
        if len(values) != chans:
            if chans == 1:
                values = (sum(values) / len(values),)
            elif len(values) == 1:
                values = values * chans
            else:
                raise ValueError(f"{key} {values} has {len(values)} values; the model has {chans} channels")
        out.append(tuple(float(v) for v in values))
    return out[0], out[1]


# --- tensor pipeline -----------------------------------------------------------------------------------


def _normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (images.float().div_(255.0) - mean) / std


def _shift_flip_params(
    n: int, generator: torch.Generator, pad: int, hflip: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < hflip
    return dy, dx, flip


def _shift_flip(
    images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int
) -> torch.Tensor:
    """Translate each image by ``(dy, dx) - pad`` pixels (zero padding) and flip the flagged ones."""
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
    batch = torch.arange(n)[:, None, None, None]
    chans = torch.arange(images.shape[1])[None, :, None, None]
    out = padded[batch, chans, rows, cols]
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def _augment(
    images: torch.Tensor, generator: torch.Generator, pad: int = 2, hflip: float = 0.5
) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (zero padding) and random horizontal flip, per sample."""
    return _shift_flip(images, *_shift_flip_params(len(images), generator, pad, hflip), pad)


# --- evaluation ----------------------------------------------------------------------------------------


def uses_bf16(device: torch.device, precision: str) -> bool:
    """Whether ``precision`` (one of :data:`PRECISIONS`) means bf16 autocast on ``device``: ``bf16``, or
    ``auto`` on a CUDA device that has bf16."""
    auto_bf16 = precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16" or auto_bf16


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if uses_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _Tally:
    """Sums of correct top-1 / top-5 predictions, loss and count."""

    def __init__(self) -> None:
        self.correct = self.correct5 = self.loss = self.count = 0.0
        self.skipped = 0

    def add(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        logits = logits.float()
        self.loss += F.cross_entropy(logits, y, reduction="sum").item()
        self.correct += (logits.argmax(-1) == y).sum().item()
        k = min(5, logits.shape[-1])
        self.correct5 += (logits.topk(k, dim=-1).indices == y[:, None]).any(-1).sum().item()
        self.count += len(y)

    def result(self, env: DistEnv | None = None) -> dict[str, float]:
        values = [self.correct, self.correct5, self.loss, self.count, self.skipped]
        if env is not None:
            values = all_reduce_sum(env, values)
        correct, correct5, loss, count, skipped = values
        if count == 0:
            raise ValueError("evaluation saw no readable images")
        out = {"accuracy": correct / count, "loss": loss / count, "top5": correct5 / count,
               "count": int(count)}
        if skipped:
            out["skipped_images"] = int(skipped)
        return out


@torch.no_grad()
def _evaluate_tensors(
    model: nn.Module,
    data: ImageSplit,
    batch_size: int,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
    precision: str = "fp32",
    env: DistEnv | None = None,
) -> dict[str, float]:
    was_training = model.training
    model.eval()
    tally = _Tally()
    rank, world = (env.rank, env.world_size) if env is not None else (0, 1)
    images, labels = data.images[rank::world], data.labels[rank::world]
    # every process runs as many forward passes as the one with the largest share: FSDP all-gathers weights
    # (and DDP may sync buffers) in each, so a process that stopped early would leave the others hanging
    largest = -(-len(data.labels) // world)
    for start in range(0, largest, batch_size):
        if start >= len(labels):
            _stand_in_forward(model, device, precision, images.shape[1:])
            continue
        x = _normalize(images[start : start + batch_size].to(device), mean, std)
        with _autocast(device, precision):
            logits = model(x)
        tally.add(logits, labels[start : start + batch_size].to(device))
    model.train(was_training)
    return tally.result(env)


@torch.no_grad()
def evaluate_loader(model: nn.Module, loader: Any, device: torch.device, precision: str = "fp32",
                    env: DistEnv | None = None) -> dict[str, float]:
    """Top-1/top-5 accuracy and mean cross-entropy over a DataLoader of ``(images, labels, skipped)``."""
    was_training = model.training
    model.eval()
    tally = _Tally()
    # with several processes, each runs the same number of forward passes (see _evaluate_tensors): batches
    # of only corrupt images and the batches a smaller share lacks become zero-weight stand-in passes
    lockstep = env is not None and env.distributed
    rounds = int(all_reduce_max(env, len(loader))) if lockstep else len(loader)
    for x, y, skipped in loader:
        tally.skipped += skipped
        if len(y) == 0:
            if lockstep:
                _stand_in_forward(model, device, precision)
            continue
        with _autocast(device, precision):
            logits = model(x.to(device, non_blocking=True))
        tally.add(logits, y.to(device))
    for _ in range(rounds - len(loader)):
        _stand_in_forward(model, device, precision)
    model.train(was_training)
    return tally.result(env)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (an FSDP model is its own module)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _stand_in_forward(model: nn.Module, device: torch.device, precision: str,
                      shape: tuple[int, ...] | torch.Size | None = None) -> None:
    """One forward pass on a blank image whose output is discarded: keeps processes in lock-step."""
    shape = tuple(shape) if shape is not None else model_input_size(_unwrap(model))
    with _autocast(device, precision):
        model(torch.zeros(1, *shape, device=device))


def evaluate(model: nn.Module, data: ImageSplit, batch_size: int = 500) -> dict[str, float]:
    """Top-1 accuracy (``accuracy``), ``top5`` and mean cross-entropy (``loss``) of ``model`` on in-memory
    ``data`` (normalised with the model's pretrained_cfg)."""
    device = next(model.parameters()).device
    chans = data.images.shape[1]
    mean, std = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in norm_stats(model, chans))
    return _evaluate_tensors(model, data, batch_size, mean, std, device)


# --- data set-up ---------------------------------------------------------------------------------------


@dataclass
class _Data:
    """What the trainer needs from the data: sizes, classes and, per pipeline, the splits."""

    num_train: int
    classes: tuple[str, ...]
    chans: int | None = None
    size: tuple[int, int] | None = None
    train_tensors: ImageSplit | None = None
    test_tensors: ImageSplit | None = None
    train_source: Any = None
    test_source: Any = None


def load_data(config: VisionTrainConfig, *, train: bool = True) -> _Data:
    """The train and test/validation data of ``config`` (the train split only if ``train``)."""
    from ..data import folders

    if config.dataset in TENSOR_DATASETS:
        train_t = load_image_dataset(config.dataset, "train", config.data_root).subset(config.train_subset)
        test_t = load_image_dataset(config.dataset, "test", config.data_root).subset(config.test_subset)
        _, chans, h, w = train_t.images.shape
        data = _Data(len(train_t), train_t.classes, chans, (h, w), train_t, test_t)
        if config.uses_pil:
            data.train_source, data.test_source = folders.TensorSource(train_t), folders.TensorSource(test_t)
        return data
    if config.dataset == "imagefolder":
        # (several processes: process 0 scans the tree and sends the lists to the others, one scan per run)
        train_src = folders.image_folder_source(config.data_root, config.train_split, candidates=("train",),
                                                shared=True)
        test_src = folders.image_folder_source(config.data_root, config.val_split, train_src.classes,
                                               candidates=("val", "validation", "test"), shared=True)
    else:
        keys = {"image_key": config.image_key, "label_key": config.label_key}
        train_src = folders.hf_source(config.data_root, config.train_split, candidates=("train",), **keys)
        test_src = folders.hf_source(config.data_root, config.val_split, class_names=train_src.classes,
                                     candidates=("validation", "val", "test"), **keys)
    train_src = folders.subset_source(train_src, config.train_subset)
    test_src = folders.subset_source(test_src, config.test_subset)
    return _Data(len(train_src), train_src.classes, train_source=train_src, test_source=test_src)


def _posterize_any_bits(img: Any, bits_to_keep: int, **kwargs: Any) -> Any:
    """timm's ``posterize`` op, also for 0 bits kept: a black image, as older Pillow gave (and TensorFlow's
    RandAugment, which timm follows). Pillow >= 12 refuses ``ImageOps.posterize(img, 0)`` with a ValueError,
    which timm asks for at magnitude 10 of the increasing policies (``rand-m9-mstd0.5-inc1``: the magnitude
    noise reaches 10 for ~2% of draws) and at low levels of AutoAugment ``v0``: the paper recipe crashed
    within its first steps."""
    if bits_to_keep <= 0:
        from PIL import Image

        return Image.new(img.mode, img.size)
    from timm.data import auto_augment

    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def _posterize_to_zero_bits(transform: Any) -> None:
    """Point the posterize ops of a timm train transform (RandAugment, AutoAugment, AugMix) at
    :func:`_posterize_any_bits`, in place (this transform only; timm itself is left as it is)."""
    from timm.data import auto_augment

    for t in getattr(transform, "transforms", ()):
        ops = list(getattr(t, "ops", None) or ())  # RandAugment, AugMixAugment
        for sub_policy in getattr(t, "policy", None) or ():  # AutoAugment: a list of lists of ops
            ops.extend(sub_policy)
        for op in ops:
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize_any_bits


def pil_transforms(model: nn.Module, config: VisionTrainConfig, mean: tuple, std: tuple) -> tuple[Any, Any]:
    """timm's train and eval transforms for ``model`` (its pretrained_cfg: interpolation, crop_pct)."""
    from timm.data import create_transform, resolve_model_data_config

    cfg = resolve_model_data_config(model)
    input_size = model_input_size(model)
    interpolation = config.train_interpolation or cfg.get("interpolation", "bicubic")
    train_tf = create_transform(
        input_size, is_training=True, no_aug=not config.augment, scale=config.crop_scale, hflip=config.hflip,
        color_jitter=config.color_jitter, auto_augment=config.auto_augment, interpolation=interpolation,
        mean=mean, std=std, re_prob=0.0,
    )
    _posterize_to_zero_bits(train_tf)
    eval_tf = create_transform(
        input_size, is_training=False, interpolation=cfg.get("interpolation", "bicubic"), mean=mean, std=std,
        crop_pct=cfg.get("crop_pct"), crop_mode=cfg.get("crop_mode"),
    )
    return train_tf, eval_tf


def eval_loader(source: Any, transform: Any, chans: int, batch_size: int, workers: int, strict: bool,
                env: DistEnv | None = None, pin: bool = False) -> Any:
    """A DataLoader over this process's share (every ``world_size``-th sample) of an evaluation source."""
    from torch.utils.data import DataLoader, Subset

    from ..data.folders import TransformedImages, collate_skipping

    ds = TransformedImages(source, transform, "L" if chans == 1 else "RGB", strict=strict)
    if env is not None and env.distributed:
        ds = Subset(ds, list(range(env.rank, len(source), env.world_size)))
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin,
                      collate_fn=collate_skipping, worker_init_fn=ignore_stop_signals if workers else None)


# --- training ------------------------------------------------------------------------------------------


def _micro_seed(seed: int, rank: int, micro: int) -> int:
    if rank == 0 and micro == 0:
        return seed  # one process, no accumulation: the step seed itself
    return (seed * 2_862_933_555_777_941_757 + rank * 3_037_000_493 + micro * 104_729 + 1) % (2**63)


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric records written after ``step`` (they belong to work the resumed run redoes)."""
    if not path.exists():
        return
    from ..utils.io import atomic_write, read_jsonl_records

    # (a line that is no record with a step, e.g. one cut short by a kill, is dropped with a warning)
    kept = [line for line, record in read_jsonl_records(path)
            if isinstance(record.get("step"), int) and record["step"] <= step]
    with atomic_write(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


_FINGERPRINT_DEFAULTS: dict[str, Any] = {"world_size": 1, "grad_accum_steps": 1, "model_kwargs": {},
                                         "strategy": "ddp"}
#: Fingerprint entries of the data that checkpoints before they were recorded lack (then not compared).
_FINGERPRINT_DATA = ("num_train", "classes")
#: Fingerprint entries a resumed run may change, with a warning (:func:`_resume_change_warnings`): the
#: global batch, the data order and each sample's augmentation stay those of the saved run.
_FINGERPRINT_ELASTIC = ("world_size", "grad_accum_steps", "epochs")


def _fingerprint(config: VisionTrainConfig, world_size: int, data: _Data | None = None) -> dict[str, Any]:
    fp = {"model": config.model, "dataset": config.dataset, "batch_size": config.batch_size,
          "train_subset": config.train_subset, "epochs": config.epochs, "seed": config.seed,
          "world_size": world_size, "grad_accum_steps": config.grad_accum_steps,
          "model_kwargs": config.model_kwargs}
    if world_size > 1:  # one process trains the plain model whatever the strategy
        fp["strategy"] = config.strategy
    if data is not None:  # what the run trains on: another folder or hub dataset that differs is refused
        fp.update(num_train=int(data.num_train), classes=[str(c) for c in data.classes])
    return fp


def _optimizer_layout(fp: dict[str, Any]) -> str:
    """How a run of fingerprint ``fp`` saves its optimizer state: "fsdp" (keyed by parameter name, gathered
    from the shards) or "ddp" (``optimizer.state_dict()``, keyed by index: one process, or DDP)."""
    several = fp.get("world_size", _FINGERPRINT_DEFAULTS["world_size"]) > 1
    return fp.get("strategy", _FINGERPRINT_DEFAULTS["strategy"]) if several else "ddp"


def _short_list(names: list[Any]) -> str:
    shown = ", ".join(map(repr, names[:5])) + (", ..." if len(names) > 5 else "")
    return f"{len(names)} [{shown}]"


def _check_fingerprint(saved: dict[str, Any], now: dict[str, Any], path: Path) -> dict[str, tuple[Any, Any]]:
    """Refuse to resume the run of fingerprint ``saved`` with one of fingerprint ``now`` where continuing
    would be silently wrong (another model, data, batch size or seed; an optimizer state this run cannot
    load), naming each setting with both values. Returns the differences a resumed run may have
    (:data:`_FINGERPRINT_ELASTIC`: another number of processes or accumulation steps, another ``epochs``),
    ``{name: (saved, now)}``."""
    def was(k: str) -> Any:
        return saved.get(k, _FINGERPRINT_DEFAULTS.get(k))

    diff = {k: (was(k), v) for k, v in now.items() if k != "strategy" and was(k) != v
            and not (k in _FINGERPRINT_DATA and k not in saved)}
    elastic = {k: diff.pop(k) for k in _FINGERPRINT_ELASTIC if k in diff}
    old_layout, new_layout = _optimizer_layout(saved), _optimizer_layout(now)
    if old_layout != new_layout:
        diff["strategy"] = (saved.get("strategy", "ddp"), now.get("strategy", "ddp"))
    if not diff:
        return elastic
    hints = []
    if "model" in diff:
        hints.append(f"the checkpoint holds a {diff['model'][0]!r} model, not {diff['model'][1]!r}")
    if "batch_size" in diff:
        old = diff["batch_size"][0]
        hints.append(f"step N of the run trained on images N x {old} to (N + 1) x {old} of its epoch's "
                     f"order: another global batch would skip or repeat images; resume with --batch-size "
                     f"{old} (more --grad-accum-steps or processes split it into smaller micro-batches)")
    if "seed" in diff:
        hints.append("the data order of each epoch and every random draw follow the seed; resume with "
                     f"--seed {diff['seed'][0]}")
    if "num_train" in diff or "classes" in diff or "train_subset" in diff or "dataset" in diff:
        hints.append("the run was trained on other data (check --dataset, --data-root, --train-split and "
                     "--train-subset)")
    if "strategy" in diff:
        old, new = diff["strategy"]
        if saved.get("world_size", 1) > 1 and now.get("world_size", 1) > 1:
            hints.append(f"it was written by a --strategy {old} run and this run uses --strategy {new} "
                         f"(their optimizer states are stored differently); resume with --strategy {old}")
        else:
            who = {"fsdp": "FSDP", "ddp": "DDP or one process"}
            hints.append(f"its optimizer state was written by {who[old_layout]}, stored differently from "
                         f"what this run ({who[new_layout]}) loads; resume with --strategy {old_layout}"
                         + (" on several processes" if old_layout == "fsdp" else ""))

    def shown(k: str, old: Any, new: Any) -> str:
        if k == "classes":
            return f"classes={_short_list(old)} (now {_short_list(new)})"
        return f"{k}={old!r} (now {new!r})"

    raise ConfigError(
        f"cannot resume from {path}: it was made with different settings "
        + ", ".join(shown(k, old, new) for k, (old, new) in diff.items())
        + ("; " + "; ".join(hints) if hints else "")
    )


def _resume_change_warnings(
    changes: dict[str, tuple[Any, Any]], saved: dict[str, Any], step: int, steps_per_epoch: int,
    config: VisionTrainConfig,
) -> list[str]:
    """The warnings of a resumed run for the changes :func:`_check_fingerprint` allows; a ConfigError for an
    ``epochs`` that ends before the checkpoint's step."""
    out = []
    if "epochs" in changes:
        old, new = changes["epochs"]
        if step > new * steps_per_epoch:
            raise ConfigError(
                f"cannot resume from step {step} with epochs {new} ({new * steps_per_epoch} steps): the run "
                f"(epochs {old}) is past that already; give --epochs {old} (or more), or start a new run"
            )
        out.append(
            f"epochs {old} -> {new}: the warmup + cosine learning-rate schedule is recomputed over "
            f"{new * steps_per_epoch} steps instead of {old * steps_per_epoch}, so the learning rate from "
            f"step {step} on is not the saved run's (nor that of an uninterrupted {new}-epoch run)"
        )
    if "world_size" in changes or "grad_accum_steps" in changes:
        old_w = new_w = saved.get("world_size", 1)
        old_a = new_a = saved.get("grad_accum_steps", 1)
        if "world_size" in changes:
            new_w = changes["world_size"][1]
        if "grad_accum_steps" in changes:
            new_a = changes["grad_accum_steps"][1]
        line = (f"{new_w} process(es) x {new_a} accumulation step(s) instead of {old_w} x {old_a}: the "
                f"global batch ({config.batch_size}), the data order and each image's augmentation are the "
                f"saved run's, but the gradients are summed in another order (results differ in the last "
                f"bits)")
        if new_w * new_a != old_w * old_a:
            line += (f", and the micro-batches hold {config.batch_size // (new_w * new_a)} images instead "
                     f"of {config.batch_size // (old_w * old_a)}, so the random draws made per micro-batch "
                     f"(mixup/cutmix, random erasing, dropout, drop path) differ")
        out.append(line)
    return out


def _kept_checkpoint(step: int | None) -> str:
    """What a run stopped for a non-finite value leaves behind, for its error message."""
    if step is None:
        return "no checkpoint was written"
    return f"the last checkpoint (step {step}) is kept as it was and --resume continues from it"


def _oom_message(err: BaseException, step: int, micro: int, config: VisionTrainConfig, env: DistEnv) -> str:
    accum = config.grad_accum_steps
    return (
        f"out of memory in training step {step} on {env.device}: micro-batch of {micro} images = global "
        f"batch {config.batch_size} / {env.world_size} process(es) / {accum} accumulation step(s). "
        f"Use --grad-accum-steps {accum * 2} (same global batch, half the memory per step) or a smaller "
        f"--batch-size. ({err})"
    )


def _tensorboard(config: VisionTrainConfig, out: Path, purge_step: int | None) -> Any:
    from .tensorboard import open_writer

    return open_writer(out / "tensorboard", config.tensorboard, purge_step)


@restoring_process_state()  # the run seeds the global generators and may set the thread count
def train_vision(config: VisionTrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train an image classifier as configured; returns the final test metrics and run facts.

    The caller's random generators (torch, NumPy, ``random``) and torch's thread count are as they were when
    this returns (the run seeds and sets its own); glibc's allocator stays tuned for the rest of the process
    (:func:`gmlp.utils.malloc.tune_malloc`; ``GMLP_NO_MALLOC_TUNING=1`` opts out).

    Writes into ``config.output`` (process 0 only): ``metrics.jsonl`` (one record per epoch),
    ``checkpoints/`` (atomic, resumable), ``config.json``, ``tensorboard/`` (if tensorboard is installed)
    and, at the end, ``model.safetensors`` (loadable with ``gmlp.create_model(name, pretrained=path)``),
    ``model_ema.safetensors`` (with ``ema``) and ``metrics.png``.

    Raises:
        ConfigError: an invalid config, or ``resume`` together with ``config.overwrite`` (one continues the
            run in ``config.output``, the other removes it: the overwrite was silently ignored).
        ConfigError: ``config.output`` held by another run (:func:`gmlp.train.checkpoint.run_lock`), or a
            file, or under one.
        OSError: ``config.output`` cannot be written (naming it).
    """
    config.validate()
    if resume and config.overwrite:
        raise ConfigError("resume=True continues the run in config.output, config.overwrite=True removes it: "
                          "give one of them")
    env = init_distributed(config.device, {"precision": config.precision, "compile": config.compile,
                                           "grad_accum_steps": config.grad_accum_steps})
    try:
        # (the stack: the SIGINT/SIGTERM handlers the training loop installs, put back however it ends)
        with _holding_output(config.output, env), contextlib.ExitStack() as handlers:
            return _train(config, env, resume, handlers)  # (a second run into this folder is refused)
    finally:
        shutdown(env)


def _holding_output(output: str, env: DistEnv) -> contextlib.AbstractContextManager[None]:
    """Process 0 holds the run folder (:func:`gmlp.train.distributed.holding_output`) while the block runs;
    when it cannot (the folder is in use, a file, or not writable), every process raises, not process 0 alone
    while the others wait for it in a collective. The process group is left to :func:`shutdown`."""
    return holding_output(output, env.is_main, lambda refused: bool(all_reduce_max(env, float(refused))))


#: What a run writes into its folder (``overwrite`` removes these, and nothing else).
_RUN_FILES = ("checkpoints", "metrics.jsonl", "config.json", "model.safetensors", "model_ema.safetensors",
              "metrics.png", "tensorboard")


def _start_fresh(out: Path, overwrite: bool, env: DistEnv) -> None:
    """Refuse to start a new run in a folder that holds one (its checkpoints would mix with the new run's:
    a later ``--resume`` could continue the old run, ``keep_last`` prune the wrong ones), unless
    ``overwrite``, which removes the old run's files first (process 0 only, once every process has looked:
    one still reading ``latest.json`` while they went failed with ``FileNotFoundError``)."""
    ckpt = latest_checkpoint(out)
    barrier(env)
    if ckpt is None:
        return
    if not overwrite:
        raise ConfigError(
            f"output {str(out)!r} already holds a run (checkpoint {ckpt.name}); pass --resume to continue it "
            f"or --overwrite to start again"
        )
    if env.is_main:
        remove_run_files(out, _RUN_FILES)
    barrier(env)


#: Settings that may change between a run and its resumption without changing what it computes.
_RESUME_FREE = {"output", "progress", "log_every", "tensorboard", "plot", "checkpoint_every", "keep_last",
                "max_steps", "device", "threads", "workers", "eval_batch_size", "overwrite", "strict_images",
                "grad_checkpointing"}


def _warn_changed_settings(
    saved: dict[str, Any], config: VisionTrainConfig, path: Path, allowed: list[str] | None = None
) -> None:
    """Warn (stderr) when a resumed run is given settings other than those it was started with; ``allowed``:
    the warnings of the run-shape changes a resume may make (:func:`_resume_change_warnings`), one line each.
    """
    now = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples as lists, as in the checkpoint
    changed = sorted(k for k in saved if k not in _RESUME_FREE and k not in _FINGERPRINT_ELASTIC and k in now
                     and saved[k] != now[k])
    for line in allowed or []:
        print(f"warning: resuming {path} with {line}", file=sys.stderr, flush=True)
    if changed:
        diffs = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        print(f"warning: resuming {path} with changed settings ({diffs}); the result will differ from an "
              f"uninterrupted run", file=sys.stderr, flush=True)


def _check_model_kwargs(model_kwargs: dict[str, Any], arch: dict[str, Any]) -> None:
    """Refuse ``model_kwargs`` that contradict what the data sets (classes, image size, channels): the data's
    values would silently win."""
    def same(a: Any, b: Any) -> bool:
        pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
        return pair(a) == pair(b)

    clashes = [f"{k}={model_kwargs[k]!r} (the data gives {v!r})" for k, v in arch.items()
               if k in ("num_classes", "img_size", "in_chans") and k in model_kwargs
               and not same(model_kwargs[k], v)]
    if clashes:
        raise ConfigError(f"model_kwargs {', '.join(clashes)}: the dataset sets these; leave them out")


def _flush_losses_every_step(device: torch.device) -> bool:
    """Whether the training loop reads each step's loss back at once (on the CPU, where that costs
    nothing) or only every ``log_every`` steps (on a GPU, where a read-back waits for the device)."""
    return device.type == "cpu"


def _check_batch_split(config: VisionTrainConfig, world_size: int) -> None:
    """Refuse a global batch that does not split into equal micro-batches over the processes and
    accumulation steps, or (with mixup/cutmix, which pair the samples of a batch) into even ones: timm's
    Mixup needs an even batch, and an odd micro-batch would lose a sample every step (a micro-batch of 1
    would train on nothing)."""
    parts = world_size * config.grad_accum_steps
    if config.batch_size % parts:
        raise ConfigError(
            f"batch_size ({config.batch_size}, the global batch per optimizer step) must be divisible by "
            f"processes x grad_accum_steps = {world_size} x {config.grad_accum_steps} = {parts}"
        )
    micro = config.batch_size // parts
    if (config.mixup > 0 or config.cutmix > 0) and micro % 2:
        raise ConfigError(
            f"mixup/cutmix pair the images of a micro-batch, which must be even: batch_size "
            f"{config.batch_size} / (processes {world_size} x grad_accum_steps {config.grad_accum_steps}) = "
            f"{micro}; change batch_size or grad_accum_steps, or turn mixup and cutmix off"
        )


def _train(  # noqa: C901
    config: VisionTrainConfig, env: DistEnv, resume: bool, handlers: contextlib.ExitStack
) -> dict[str, Any]:
    tune_malloc()
    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(config.output)
    main = env.is_main
    _check_batch_split(config, env.world_size)
    data = load_data(config)  # before anything is written: a batch the data cannot fill is a usage error
    if config.batch_size > data.num_train:
        raise ConfigError(
            f"batch_size ({config.batch_size}) is larger than the training set ({data.num_train} images)"
        )
    device = env.device
    num_classes = len(data.classes)
    # modulo 2**64, the generator's seed range (it reads a negative seed modulo 2**64 too, so every seed that
    # worked inits as before): a seed outside [-2**63, 2**64) stopped the run with a bare 'Overflow when
    # unpacking long long' traceback (the data order and the step seeds already take any integer)
    torch.manual_seed(config.seed % 2**64)
    arch: dict[str, Any] = {"num_classes": num_classes, "drop_path_rate": config.drop_path_rate,
                            "drop_path_schedule": config.drop_path_schedule, "drop_rate": config.drop_rate}
    if data.train_tensors is not None:  # in-memory images: the model takes their size and channels
        if config.img_size is not None and (config.img_size,) * 2 != tuple(data.size):
            raise ConfigError(
                f"img_size {config.img_size}: the {config.dataset} images are {data.size[0]}x{data.size[1]} "
                f"tensors, which this pipeline does not resize; leave img_size unset (or use an "
                f"image-folder/hub dataset, whose images are resized to img_size)"
            )
        arch.update(img_size=data.size, in_chans=data.chans)
    elif config.img_size is not None:
        arch["img_size"] = config.img_size
    _check_model_kwargs(config.model_kwargs, arch)
    try:
        model = build_model(config.model, **{**config.model_kwargs, **arch})
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # model_kwargs the constructor refuses: a usage error (as export)
        raise ConfigError(f"model {config.model!r} with model_kwargs {config.model_kwargs!r}: {err}") from err
    chans = model_input_size(model)[0]
    model.to(device)
    mean_t, std_t = norm_stats(model, chans, config.mean, config.std)
    mean, std = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in (mean_t, std_t))
    params = sum(p.numel() for p in model.parameters())
    fsdp = env.distributed and config.strategy == "fsdp"
    if config.grad_checkpointing:  # recompute each block in backward: activation memory of ~one block
        if not hasattr(model, "set_grad_checkpointing"):
            raise ValueError(f"grad_checkpointing: model {config.model!r} has no set_grad_checkpointing()")
        model.set_grad_checkpointing(True)
    # timm's transforms, built before anything is written: they may still refuse a setting
    transforms = pil_transforms(model, config, mean_t, std_t) if config.uses_pil else None
    # only now, with every setting checked against the data and the model: --overwrite removes the old run
    # here, so a usage error above leaves it in place
    if not resume:
        _start_fresh(out, config.overwrite, env)
    if main:
        out.mkdir(parents=True, exist_ok=True)

    step, loss_sum, loss_count, skipped_total = 0, 0.0, 0, 0
    epoch_read = 0  # readable training images of this process in this epoch (PIL pipeline)
    fingerprint = _fingerprint(config, env.world_size, data)
    metrics_path = out / "metrics.jsonl"
    ckpt = None
    if resume:  # the weights go in before FSDP shards them; the optimizer state after it is built
        ckpt = load_checkpoint(out)
        if "fingerprint" not in ckpt.state:
            raise ConfigError(
                f"cannot resume from {ckpt.path}: gmlp train did not write it (it has no run fingerprint; a "
                f"gmlp pretrain / finetune run?)"
            )
        saved_fp = ckpt.state["fingerprint"]
        changes = _check_fingerprint(saved_fp, fingerprint, ckpt.path)
        warnings_ = _resume_change_warnings(changes, saved_fp, ckpt.state["step"],
                                            data.num_train // config.batch_size, config)
        if "ema" in ckpt.optimizer and not config.ema:
            raise ConfigError(
                f"cannot resume from {ckpt.path} without ema: it holds EMA weights, which would be dropped; "
                f"resume with --ema"
            )
        if config.ema and "ema" not in ckpt.optimizer:
            raise ConfigError(
                f"cannot resume from {ckpt.path} with ema: it holds no EMA weights (the run was started "
                f"without --ema); resume without --ema"
            )
        if main:
            _warn_changed_settings(ckpt.state.get("config", {}), config, ckpt.path, warnings_)
        from ..models.loading import load_state_dict_checked

        load_state_dict_checked(model, ckpt.model)
    if fsdp:  # in place: the parameters become DTensor shards, so before the optimizer sees them
        shard_model(model, env)

    plan = StepBatches(data.num_train, config.batch_size, config.seed, 0, 0, rank=env.rank,
                       world_size=env.world_size, accum_steps=config.grad_accum_steps)
    steps_per_epoch = plan.steps_per_epoch
    total_steps = steps_per_epoch * config.epochs

    create_optimizer_v2 = import_timm_optim().create_optimizer_v2  # (without its process-wide settings)
    from timm.scheduler import CosineLRScheduler

    from .optim import fused_adamw

    opt_kwargs: dict[str, Any] = {"betas": config.betas, "eps": config.eps}
    if fused_adamw(device, sharded=fsdp):
        opt_kwargs["fused"] = True
    optimizer = create_optimizer_v2(model, opt="adamw", lr=config.lr, weight_decay=config.weight_decay,
                                    **opt_kwargs)
    if main:  # one line that says what this run really uses (device, precision, optimizer, processes)
        amp = "bf16 autocast" if isinstance(_autocast(device, config.precision), torch.autocast) else "fp32"
        params = sum(p.numel() for p in model.parameters())
        print(f"training {config.model} ({params:,} parameters) on {device} x {env.world_size} process(es), "
              f"{amp}, {'fused ' if opt_kwargs.get('fused') else ''}AdamW, {steps_per_epoch} steps/epoch",
              flush=True)
    warmup_lr = config.warmup_lr if config.warmup_lr is not None else config.lr * 1e-3
    if main and config.warmup_steps >= total_steps:
        print(f"warning: warmup_steps ({config.warmup_steps}) >= the run's {total_steps} optimizer steps: "
              f"the learning rate never reaches lr ({config.lr:g}) and never decays; lower --warmup-steps",
              file=sys.stderr, flush=True)
    scheduler = CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=config.min_lr,
                                  warmup_t=config.warmup_steps, warmup_lr_init=warmup_lr, t_in_epochs=False)
    ema = None
    if config.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=config.ema_warmup)
    mixup_fn = None
    if config.mixup > 0 or config.cutmix > 0:
        from timm.data import Mixup

        mixup_fn = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, prob=config.mixup_prob,
                         switch_prob=config.mixup_switch_prob, mode=config.mixup_mode,
                         label_smoothing=config.label_smoothing, num_classes=num_classes)
        from timm.loss import SoftTargetCrossEntropy

        soft_ce = SoftTargetCrossEntropy()
    erasing = None
    if config.reprob > 0:
        from timm.data.random_erasing import RandomErasing

        erasing = RandomErasing(config.reprob, mode=config.remode, max_count=config.recount,
                                device=str(device))

    def criterion(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y.dim() == 2:  # mixed soft targets
            return soft_ce(logits.float(), y)
        return F.cross_entropy(logits.float() if logits.dtype != torch.float32 else logits, y,
                               label_smoothing=config.label_smoothing)

    if ckpt is not None:
        # the state brings back the moments and step counts, and also the saved run's weight decay, betas
        # and eps, over which a changed --weight-decay / --betas / --eps (named in the warning above) was
        # silently lost: the settings given now apply (unchanged ones are the same values)
        given = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        if fsdp:
            load_full_optimizer_state(model, optimizer, ckpt.optimizer["optimizer"])
        else:
            optimizer.load_state_dict(ckpt.optimizer["optimizer"])
        for group, hyper in zip(optimizer.param_groups, given, strict=True):
            group.update(hyper)
        if ema is not None:  # (a checkpoint without EMA weights was refused above)
            ema.module.load_state_dict(ckpt.optimizer["ema"])
        step, loss_count = ckpt.state["step"], ckpt.state["loss_count"]
        loss_sum = ckpt.state["loss_sum"] if main else 0.0  # the checkpoint holds the sum over processes
        saved_world = saved_fp.get("world_size", 1)
        if main and saved_world != env.world_size:  # (the sum over another number of them: the epoch's
            loss_sum *= env.world_size / saved_world  # train_loss divides by this run's)
        skipped_total = ckpt.state.get("skipped_images", 0) if main else 0
        if main:
            _truncate_metrics(metrics_path, step)
        ckpt = None  # the full optimizer state in host memory is no longer needed
    elif main and metrics_path.exists():
        metrics_path.unlink()
    if main:
        write_json_atomic(out / "config.json", dataclasses.asdict(config))

    raw_model = model  # with FSDP the sharded model itself (fully_shard works in place)
    if env.distributed and not fsdp:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        model.compile()  # in place (also through DDP/FSDP): state_dict keys and checkpoints stay plain

    stop_at = total_steps if config.max_steps is None else min(total_steps, config.max_steps)
    plan.start_step, plan.stop_step = step, stop_at

    test_loader = None
    batches: Any = None
    if config.uses_pil:
        from torch.utils.data import DataLoader

        from ..data.folders import TransformedImages, collate_skipping

        train_tf, eval_tf = transforms
        mode = "L" if chans == 1 else "RGB"
        pin = device.type == "cuda"
        train_ds = TransformedImages(data.train_source, train_tf, mode, strict=config.strict_images)
        loader = DataLoader(train_ds, batch_sampler=plan, num_workers=config.workers, pin_memory=pin,
                            collate_fn=collate_skipping, persistent_workers=False,
                            prefetch_factor=4 if config.workers else None,
                            worker_init_fn=ignore_stop_signals if config.workers else None)
        batches = iter(loader)
        test_loader = eval_loader(data.test_source, eval_tf, chans, config.eval_batch_size, config.workers,
                                  config.strict_images, env, pin)

    # (a resume's first new point is at step + 1: purged at `step`, the checkpoint's own points were hidden)
    writer = _tensorboard(config, out, step + 1 if resume else None) if main else None
    if writer is not None:  # (closed however the run ends: a failed run left its writer thread and file open)
        handlers.callback(writer.close)

    def run_eval(m: nn.Module) -> dict[str, float]:
        if test_loader is not None:
            return evaluate_loader(m, test_loader, device, config.precision, env)
        return _evaluate_tensors(m, data.test_tensors, config.eval_batch_size, mean, std, device,
                                 config.precision, env)

    def checkpoint() -> None:
        """Save a checkpoint of ``step`` (every process takes part; process 0 writes). A second stop signal
        lets it finish (:meth:`StopRequest.shielded`)."""
        with stop.shielded():
            save_checkpoint_now()

    def save_checkpoint_now() -> None:
        nonlocal last_saved
        flush_loss()  # the saved loss sum must hold every step its count does (CUDA flushes lazily)
        # a non-finite gradient in a step whose loss was finite (unclipped: no norm was looked at) leaves
        # non-finite weights that no loss has shown yet: never written over the last good checkpoint
        nets = [raw_model] + ([ema.module] if ema is not None else [])
        local = [getattr(p, "to_local", p.detach)().detach() for net in nets for p in net.parameters()]
        bad = float(torch.stack([~torch.isfinite(t).all() for t in local]).any())
        total_loss, total_skipped, bad, stops = all_reduce_sum(
            env, [loss_sum, skipped_total, bad, float(stop.requested)])
        agree_on_stop(stops)
        if bad:
            raise FloatingPointError(
                f"the weights are not finite after step {step} (a non-finite gradient"
                f"{'' if config.grad_clip > 0 else '; grad_clip is off'}): the run stops without saving "
                f"them; {_kept_checkpoint(last_saved)}; lower lr ({config.lr:g})"
            )
        if fsdp:  # gathered from all processes onto process 0: the same full-model checkpoint as DDP writes
            model_state, optimizer_state = full_state_dicts(model, optimizer)
        if not main:
            last_saved = step  # (process 0 writes it: the others' messages name it too)
            return
        if not fsdp:
            model_state, optimizer_state = raw_model.state_dict(), optimizer.state_dict()
        state = {"fingerprint": fingerprint, "loss_sum": total_loss, "loss_count": loss_count,
                 "skipped_images": int(total_skipped), "epoch": step // steps_per_epoch,
                 "config": dataclasses.asdict(config)}
        opt_state: dict[str, Any] = {"optimizer": optimizer_state}
        if ema is not None:
            opt_state["ema"] = ema.module.state_dict()
        save_checkpoint(out, step, model_state, opt_state, state, keep_last=config.keep_last,
                        metadata={"architecture": config.model, **normalisation_metadata(mean_t, std_t)})
        last_saved = step

    last_metrics: dict[str, Any] = {}
    pending = torch.zeros((), dtype=torch.float64, device=device)  # losses not yet added to loss_sum
    pending_norm = torch.zeros((), dtype=torch.float64, device=device)  # their steps' gradient norms, summed
    pending_count = 0
    last_saved: int | None = step if resume else None  # the newest checkpoint this run may rely on
    check_each_step = _flush_losses_every_step(device)
    # SIGINT/SIGTERM (from here until train_vision returns): stop after the step in progress, with a
    # checkpoint. Several processes must stop at the same step: each one's request travels with the
    # all-reduces the loop makes anyway (flush_loss: every step on the CPU, every log_every steps on a GPU;
    # checkpoints; epoch ends), and stop_agreed, set from their sums only, is the same on every process
    stop = handlers.enter_context(StopRequest())
    stop_agreed = False
    interrupted = False
    # Corrupt images (PIL pipeline) leave micro-batches short. With one micro-batch per step the loss is the
    # mean over its readable images already; with several (processes x accumulation steps) each image's loss
    # is weighted by 1 / micro and the gradient rescaled to the mean over the step's readable images, as one
    # step on the whole global batch gives (a mean per micro-batch weighed the images of short ones more).
    micro = config.batch_size // (env.world_size * config.grad_accum_steps)
    weigh_by_images = batches is not None and env.world_size * config.grad_accum_steps > 1
    model.train()
    bar = None
    epoch_start = time.perf_counter()

    def agree_on_stop(requests: float) -> None:
        """Note the sum of the processes' stop requests, from an all-reduce that every process made."""
        nonlocal stop_agreed
        stop_agreed = stop_agreed or requests > 0

    def flush_loss(shown: torch.Tensor | None = None) -> float | None:
        """Add the pending losses to ``loss_sum`` after checking them (and their gradient norms); return the
        value of ``shown`` (a loss to log), read back with them. No read-back where nothing is pending and
        nothing is shown (a checkpoint or an epoch's end right after a logged step)."""
        nonlocal loss_sum, pending, pending_norm, pending_count
        if not pending_count and shown is None:
            return None
        reads = [pending, pending_norm] + ([shown.to(pending.dtype)] if shown is not None else [])
        value, norm, *rest = torch.stack(reads).tolist()  # (one host read-back)
        mine = bool(pending_count) and not (np.isfinite(value) and np.isfinite(norm))
        bad = mine
        if env.distributed and pending_count:  # (every process flushes at the same steps) all stop together:
            bads, stops = all_reduce_sum(env, [float(mine), float(stop.requested)])  # one alone would leave
            bad = bads > 0  # the others waiting
            agree_on_stop(stops)
        if bad:
            # read back every step on the CPU (the step is exact), every log_every steps on a GPU
            where = f"at step {step}" if pending_count == 1 else f"in steps {step - pending_count + 1}-{step}"
            if not mine:
                raise FloatingPointError(
                    f"another process's training loss or gradient norm was not finite {where}: the run stops "
                    f"without saving; {_kept_checkpoint(last_saved)}; lower lr ({config.lr:g})"
                )
            what = f"loss {value:g}" + (f", gradient norm {norm:g}" if config.grad_clip > 0 else "")
            advice = f"lower lr ({config.lr:g})" + ("" if config.grad_clip > 0 else " or enable grad_clip")
            raise FloatingPointError(
                f"the training loss or gradient norm was not finite {where} ({what}): the run stops without "
                f"saving; {_kept_checkpoint(last_saved)}; {advice}"
            )
        loss_sum += value
        pending = torch.zeros_like(pending)
        pending_norm = torch.zeros_like(pending_norm)
        pending_count = 0
        return rest[0] if rest else None

    while step < stop_at:
        epoch, i = divmod(step, steps_per_epoch)
        if bar is None:
            epoch_start = time.perf_counter()
            # (a tqdm bar on a terminal; in a log file, a line per log interval instead of its redraws)
            bar = progress_bar(min(steps_per_epoch, stop_at - epoch * steps_per_epoch), initial=i,
                               desc=f"epoch {epoch + 1}/{config.epochs}", enabled=config.progress and main,
                               leave=False)
        sseed = step_seed(config.seed, step)
        scheduler.step_update(step)
        optimizer.zero_grad(set_to_none=True)
        if batches is None:
            global_idx = plan.global_batch(step)
            if config.augment:
                gen = torch.Generator().manual_seed(sseed)
                aug = _shift_flip_params(len(global_idx), gen, 2, config.hflip)
        step_loss = torch.zeros((), device=device)
        step_images = 0  # readable images of this process's micro-batches (corrupt ones are skipped)
        for m in range(config.grad_accum_steps):
            if batches is None:
                pos = plan.positions(m)
                images = data.train_tensors.images[global_idx[pos]]
                if config.augment:
                    images = _shift_flip(images, *(a[pos] for a in aug), 2)
                x = _normalize(images.to(device, non_blocking=True), mean, std)
                y = data.train_tensors.labels[global_idx[pos]].to(device, non_blocking=True)
            else:
                x, y, skipped = next(batches)
                skipped_total += skipped
                epoch_read += len(y)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # by the micro-batch's place in the global batch (chunk m x processes + rank), not by rank and
            # micro-step apart: 2 processes draw as 1 process with 2 accumulation steps (a resume may switch)
            _seed_all(_micro_seed(sseed, 0, m * env.world_size + env.rank))
            if mixup_fn is not None and len(y) % 2:  # a skipped corrupt image left an odd batch
                x, y = x[:-1], y[:-1]
            sync = m == config.grad_accum_steps - 1 or not env.distributed  # reduce gradients now?
            if fsdp:
                model.set_requires_gradient_sync(sync)
                ctx = contextlib.nullcontext()
            else:
                ctx = contextlib.nullcontext() if sync else model.no_sync()
            try:
                with ctx:
                    if len(y) == 0:  # every image of this micro-batch was corrupt: a zero-weight stand-in
                        with _autocast(device, config.precision):  # keeps DDP processes in step
                            dummy = torch.zeros(1, *model_input_size(raw_model), device=device)
                            loss = model(dummy).sum() * 0.0
                    else:
                        if mixup_fn is not None:
                            x, y = mixup_fn(x, y)
                        if erasing is not None:
                            x = erasing(x)
                        with _autocast(device, config.precision):
                            loss = criterion(model(x), y)
                    if weigh_by_images and len(y) != micro:  # each image weighs as one of a full micro-batch
                        loss = loss * (len(y) / micro)
                    (loss / config.grad_accum_steps if config.grad_accum_steps > 1 else loss).backward()
            except torch.OutOfMemoryError as err:
                raise torch.OutOfMemoryError(_oom_message(err, step, len(y), config, env)) from err
            step_loss += loss.detach() / config.grad_accum_steps
            step_images += len(y)
        if weigh_by_images:  # the gradient is the sum over the step's images / batch_size: make it their mean
            local = micro * config.grad_accum_steps
            if 0 < step_images != local:
                step_loss *= local / step_images
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if env.distributed:  # counted on the device and scaled by a tensor: no host sync each step
                total = torch.full((), float(step_images), dtype=torch.float32, device=device)
                torch.distributed.all_reduce(total)
                torch._foreach_mul_(grads, config.batch_size / total.clamp(min=1.0))  # x 1.0 if none skipped
            elif 0 < step_images != config.batch_size:
                torch._foreach_mul_(grads, config.batch_size / step_images)
        if config.grad_clip > 0:  # (a NaN norm scales every gradient to NaN: stopped at the next read-back)
            norm = nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip).detach()
            pending_norm += norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # (FSDP: a DTensor)
        optimizer.step()
        step += 1
        if ema is not None:
            ema.update(raw_model, step=step)
        pending += step_loss
        pending_count += 1
        loss_count += 1
        bar.update(1)
        logging = step % config.log_every == 0
        shown = flush_loss(step_loss if logging else None) if check_each_step or logging else None
        if logging:  # (shown: step_loss, read back with the pending losses)
            lr = optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{shown:.3f}", lr=f"{lr:.2e}")
            if writer is not None:
                writer.add_scalar("train/loss", shown, step)
                writer.add_scalar("train/lr", lr, step)
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step % steps_per_epoch:
            checkpoint()
        if step % steps_per_epoch == 0 or step == stop_at:
            bar.close()
            bar = None
        if step % steps_per_epoch == 0:  # epoch finished
            flush_loss()
            total_loss, total_skipped, total_read, stops = all_reduce_sum(
                env, [loss_sum, skipped_total, epoch_read, float(stop.requested)])
            agree_on_stop(stops)
            if batches is not None and total_read == 0:  # (a loss of 0 over no image: a "trained" model)
                raise ConfigError(
                    f"every training image read in epoch {step // steps_per_epoch} (since its start, or "
                    f"since the resume) was unreadable ({int(total_skipped)} skipped as corrupt): check "
                    f"--data-root and the files' permissions, or run with --strict-images to stop at the "
                    f"first one with its error"
                )
            if not fsdp:  # FSDP processes hold different shards, no replicas to compare
                assert_in_sync(env, raw_model)
            test = run_eval(model)
            if not np.isfinite(test["loss"]):  # finite weights whose outputs overflow: not a model to keep
                raise FloatingPointError(
                    f"the test loss is {test['loss']} after epoch {step // steps_per_epoch} (step {step}; "
                    f"the model's outputs are not finite): the run stops without saving; "
                    f"{_kept_checkpoint(last_saved)}; lower lr ({config.lr:g})"
                )
            last_metrics = {
                "epoch": step // steps_per_epoch, "step": step,
                "train_loss": total_loss / max(loss_count * env.world_size, 1),
                "test_accuracy": test["accuracy"], "test_loss": test["loss"], "test_top5": test["top5"],
                "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": time.perf_counter() - epoch_start,
            }
            if ema is not None:
                ema_test = run_eval(ema.module)
                last_metrics.update(ema_test_accuracy=ema_test["accuracy"], ema_test_loss=ema_test["loss"],
                                    ema_test_top5=ema_test["top5"])
            if config.uses_pil:
                last_metrics["skipped_images"] = int(total_skipped) + test.get("skipped_images", 0)
            if main:
                append_line(metrics_path, json.dumps(last_metrics))  # (whole, or not at all)
                if writer is not None:
                    for key in ("train_loss", "test_accuracy", "test_loss", "test_top5", "ema_test_accuracy"):
                        if key in last_metrics:
                            writer.add_scalar(f"epoch/{key}", last_metrics[key], step)
                    writer.flush()
                extra = f"  ema_acc {last_metrics['ema_test_accuracy']:.4f}" if ema is not None else ""
                if last_metrics.get("skipped_images"):
                    extra += f"  skipped {last_metrics['skipped_images']} corrupt images"
                m_ = last_metrics
                print(
                    f"epoch {m_['epoch']}/{config.epochs}  train_loss {m_['train_loss']:.4f}  "
                    f"test_acc {test['accuracy']:.4f}  test_loss {test['loss']:.4f}{extra}  "
                    f"({m_['epoch_seconds']:.0f}s)",
                    flush=True,
                )
            loss_sum, loss_count, skipped_total, epoch_read = 0.0, 0, 0, 0
        if step % steps_per_epoch == 0 or step == stop_at:
            checkpoint()
        # a stop signal: the step is done; save it (unless just saved) and stop. One process reads its own
        # flag each step (free); several act on stop_agreed (the same on all; no collective of its own)
        if (stop_agreed if env.distributed else stop.requested) and step < stop_at:
            if last_saved != step:
                checkpoint()
            interrupted = True
            break
    if bar is not None:
        bar.close()
    if interrupted:
        barrier(env)  # no process ends (torchrun would then SIGTERM the rest) before process 0 has saved
        if writer is not None:
            writer.close()
        if main:
            epoch, i = divmod(step, steps_per_epoch)
            where = f"{i}/{steps_per_epoch} steps into epoch {epoch + 1}" if i else f"after epoch {epoch}"
            sys.stderr.write(f"[gmlp] stopped at step {step}/{total_steps} ({where}) with a checkpoint; "
                             f"--resume continues the run\n")  # (one write: no other line splits it)
            sys.stderr.flush()
        raise KeyboardInterrupt
    final_state = full_model_state_dict(model) if fsdp else None  # every process takes part
    if main:
        for net in (raw_model, ema.module if ema is not None else None):  # record the run's normalisation
            if net is not None and isinstance(getattr(net, "pretrained_cfg", None), dict):
                net.pretrained_cfg = {**net.pretrained_cfg, "mean": mean_t, "std": std_t}
        with stop.shielded():  # (a second signal now: the file is written first)
            save_model(raw_model, out / "model.safetensors", state_dict=final_state)
            if ema is not None:
                save_model(ema.module, out / "model_ema.safetensors")
        if writer is not None:
            writer.close()
        if config.plot and metrics_path.exists() and metrics_path.read_text().strip():
            try:
                from ..viz import plot_metrics

                plot_metrics(metrics_path, out / "metrics.png")
            except ImportError as err:  # matplotlib missing: the run itself succeeded
                if not (err.name or "").startswith("matplotlib"):  # (not one of gmlp's own imports)
                    raise
                print(f"note: no metrics.png ({err})", file=sys.stderr)
    if not last_metrics and main and metrics_path.exists():  # resumed at the end: the run's last record
        from ..utils.io import read_jsonl_records

        records = read_jsonl_records(metrics_path)  # (a line cut short by a kill: skipped, with a warning)
        last_metrics = records[-1][1] if records else {}
    if last_metrics.get("step") != step:  # stopped mid-epoch: the last evaluation is of an earlier step
        last_metrics = {}
    # a signal in the last step, the final evaluation or save: the run is complete, and its caller stops too
    # (a notebook cell training one model after another does not go on to the next). Every process hears it
    # (one collective, after process 0's save: none ends, and torchrun tears the rest down, before that)
    if all_reduce_max(env, float(stop.requested)) > 0:
        if main:  # (one write: a line another process's output cannot split)
            sys.stderr.write("[gmlp] stopped at the end of the run; its outputs are complete\n")
            sys.stderr.flush()
        raise KeyboardInterrupt
    return {**last_metrics, "step": step, "params": params}
