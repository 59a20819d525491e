"""The settings of ``gmlp train`` (:class:`VisionTrainConfig`), apart from the training code.

This module imports no torch (nor anything beyond the standard library and :mod:`gmlp.train.recipe`), so
that the ``gmlp`` command line can build its ``--flag`` per setting (and print ``gmlp train --help``)
without loading torch; :meth:`VisionTrainConfig.validate` imports what it checks against when it runs.
:mod:`gmlp.train.vision` re-exports everything here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .recipe import ConfigError

__all__ = ["PIL_DATASETS", "PRECISIONS", "TENSOR_DATASETS", "VisionTrainConfig"]

TENSOR_DATASETS = ("fashion_mnist", "digits")
PIL_DATASETS = ("imagefolder", "hf")
PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 autocast on a CUDA GPU that has it, else fp32
#: Model constructor arguments that are settings of their own (a model_kwargs value would be overridden).
_OWN_SETTINGS = ("drop_path_rate", "drop_path_schedule", "drop_rate")


def _as_tuple(value: Any) -> Any:
    """Lists as tuples (recipes and config.json give lists where the dataclass defaults are tuples)."""
    return tuple(value) if isinstance(value, list) else value


@dataclass
class VisionTrainConfig:
    """Settings of ``gmlp train``; the defaults reach >= 89% Fashion-MNIST test accuracy on 2 CPU cores.

    Every field is a ``--flag`` of ``gmlp train`` and a key of a recipe file (``src/gmlp/recipes/*.yaml``).
    """

    model: str = "gmlp_nano4_28"
    dataset: str = "fashion_mnist"
    data_root: str | None = None
    output: str = "runs/fashion_mnist"
    epochs: int = 6
    batch_size: int = 128
    lr: float = 2e-3
    min_lr: float = 1e-5
    warmup_steps: int = 200
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    grad_clip: float = 1.0
    label_smoothing: float = 0.1
    drop_path_rate: float = 0.0
    augment: bool = True
    seed: int = 0
    train_subset: int | None = None
    test_subset: int | None = None
    eval_batch_size: int = 500
    checkpoint_every: int = 0
    keep_last: int = 2
    max_steps: int | None = None
    threads: int | None = None
    progress: bool = True
    # -- model ------------------------------------------------------------------------------------------
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    drop_path_schedule: str = "uniform"
    drop_rate: float = 0.0
    img_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # -- data (PIL pipeline) ------------------------------------------------------------------------------
    train_split: str | None = None
    val_split: str | None = None
    image_key: str | None = None
    label_key: str | None = None
    workers: int = 4
    strict_images: bool = False
    # -- augmentation ---------------------------------------------------------------------------------------
    auto_augment: str | None = None
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    color_jitter: float = 0.4
    train_interpolation: str | None = None
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1
    # -- optimisation ----------------------------------------------------------------------------------------
    grad_accum_steps: int = 1
    warmup_lr: float | None = None
    ema: bool = False
    ema_decay: float = 0.9998
    ema_warmup: bool = False
    # -- hardware and logging -------------------------------------------------------------------------------
    strategy: str = "ddp"
    grad_checkpointing: bool = False
    compile: bool = False
    device: str = "auto"
    precision: str = "auto"
    log_every: int = 10
    tensorboard: bool | None = None
    plot: bool = True
    overwrite: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        import torch

        from ..models import list_models
        from .distributed import STRATEGIES
        from .vision import _check_auto_augment, _timm_schedule_error

        if self.model.startswith("timm:"):
            import timm

            if not timm.is_model(self.model[5:]):
                raise ConfigError(f"model: unknown timm model {self.model[5:]!r}")
        elif self.model not in list_models():
            raise ConfigError(
                f"model: unknown model {self.model!r}; known models: {', '.join(list_models())} "
                f"(or timm:NAME for a timm model)"
            )
        if self.dataset not in TENSOR_DATASETS + PIL_DATASETS:
            known = ", ".join(TENSOR_DATASETS + PIL_DATASETS)
            raise ConfigError(f"unknown dataset {self.dataset!r}; expected one of {known}")
        if self.dataset in PIL_DATASETS and not self.data_root:
            what = "the folder with train/ and val/" if self.dataset == "imagefolder" else "a hub name/path"
            raise ConfigError(f"dataset {self.dataset!r} needs data_root (--data-root): {what}")
        if self.dataset == "digits" and self.data_root:  # scikit-learn's bundled copy: nothing to read there
            raise ConfigError(f"dataset 'digits' takes no data_root (--data-root), got {self.data_root!r}")
        positive = ("epochs", "batch_size", "eval_batch_size", "keep_last", "grad_accum_steps", "log_every",
                    "recount")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "eps", "ema_decay"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("min_lr", "weight_decay", "grad_clip", "warmup_steps", "checkpoint_every", "workers",
                     "mixup", "cutmix", "color_jitter"):
            if not getattr(self, name) >= 0:  # written so that NaN fails too
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("label_smoothing", "drop_path_rate", "drop_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("hflip", "mixup_prob", "mixup_switch_prob", "reprob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:  # (0 wrote an untrained model, no checkpoint)
            raise ConfigError(f"max_steps must be >= 1 (None: the whole schedule), got {self.max_steps}")
        if not self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be < 1, got {self.ema_decay}")
        interpolations = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming", "random")
        if self.train_interpolation is not None and self.train_interpolation not in interpolations:
            raise ConfigError(
                f"train_interpolation must be one of {', '.join(interpolations)} (or unset: the model's), "
                f"got {self.train_interpolation!r}"
            )
        choices = {"drop_path_schedule": ("uniform", "linear"), "mixup_mode": ("batch", "pair", "elem"),
                   "remode": ("const", "rand", "pixel"), "device": ("auto", "cpu", "cuda"),
                   "precision": PRECISIONS, "strategy": STRATEGIES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.model.startswith("timm:") and self.drop_path_schedule != "uniform":
            raise _timm_schedule_error(self.model, self.drop_path_schedule)
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device cuda (--device): no CUDA device is available; use cpu (or auto)")
        if self.ema and self.strategy == "fsdp":
            raise ConfigError(
                "ema=True is not supported with strategy='fsdp' (the EMA copy would be a second, unsharded "
                "model on every process); use strategy='ddp' or turn ema off"
            )
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"crop_scale must be 0 < min <= max <= 1, got {self.crop_scale}")
        if self.auto_augment is not None:
            _check_auto_augment(self.auto_augment)
            if not self.augment:
                raise ConfigError(
                    f"auto_augment {self.auto_augment!r} with augment=False (--no-augment): timm's transform "
                    f"without augmentation never runs the policy; drop --no-augment, or unset auto_augment "
                    f"(--auto-augment none)"
                )
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ConfigError(f"mean and std need the same length, got {self.mean} and {self.std}")
        if self.std is not None and any(not s > 0 for s in self.std):
            raise ConfigError(f"std must be > 0, got {self.std}")
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.warmup_lr is not None and not self.warmup_lr >= 0:
            raise ConfigError(f"warmup_lr must be >= 0, got {self.warmup_lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas must both be in [0, 1), got {self.betas}")
        for name in ("threads", "img_size", "train_subset", "test_subset"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 (or unset), got {value}")
        for name in _OWN_SETTINGS:  # build_model gets the setting's value, not model_kwargs'
            if name in self.model_kwargs and self.model_kwargs[name] != getattr(self, name):
                raise ConfigError(
                    f"model_kwargs {name}={self.model_kwargs[name]!r}: {name} is a setting of its own "
                    f"(--{name.replace('_', '-')}, now {getattr(self, name)!r}), which the model is built "
                    f"with; set it there and leave it out of model_kwargs"
                )
        self._check_unused_settings()
        self._check_inert_settings()

    def _check_inert_settings(self) -> None:
        """Refuse a setting that another setting leaves without effect (it would be silently ignored):
        :meth:`inert_settings`, the first group of them."""
        inert = self.inert_settings()
        if inert:
            why = inert[0][1]
            found = [f"{n}={getattr(self, n)!r} (--{n.replace('_', '-')})" for n, w in inert if w == why]
            raise ConfigError(f"{', '.join(found)}: {why}")

    def inert_settings(self) -> list[tuple[str, str]]:
        """``(setting, why)`` for each setting that another setting leaves without effect: a value other
        than its default (or, where one exists, the value that matches what runs: 0 = off) for a part of
        the run that is switched off."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        out: list[tuple[str, str]] = []

        def check(names: tuple[str, ...], why: str, off: dict[str, Any] | None = None) -> None:
            out.extend((n, why) for n in names
                       if _as_tuple(getattr(self, n)) != _as_tuple(defaults[n])
                       and not (off and n in off and getattr(self, n) == off[n]))

        if not self.ema:
            check(("ema_decay", "ema_warmup"),
                  "a setting of the weight average (EMA), which ema=False does not keep; turn it on (--ema), "
                  "or leave this at its default")
        if self.mixup == self.cutmix == 0:
            check(("mixup_prob", "mixup_switch_prob", "mixup_mode"),
                  "a setting of mixup/cutmix, which mixup=0 and cutmix=0 turn off; set --mixup and/or "
                  "--cutmix above 0, or leave this at its default")
        elif (self.mixup > 0) != (self.cutmix > 0):
            check(("mixup_switch_prob",),
                  f"the chance of cutmix instead of mixup, which only counts when both are on (mixup="
                  f"{self.mixup}, cutmix={self.cutmix}); leave it at its default")
        if self.reprob == 0:
            check(("remode", "recount"),
                  "a setting of random erasing, which reprob=0 turns off; set --reprob above 0, or leave "
                  "this at its default")
        if self.drop_path_rate == 0:
            check(("drop_path_schedule",),
                  "how drop_path_rate is spread over the blocks, and drop_path_rate is 0 (no stochastic "
                  "depth); set --drop-path-rate above 0, or leave this at its default")
        if self.warmup_steps == 0:
            check(("warmup_lr",), "the learning rate the warmup starts from, and warmup_steps is 0 (no "
                  "warmup); set --warmup-steps above 0, or unset warmup_lr (--warmup-lr none)")
        if not self.augment:
            why = ("a setting of the training augmentation, which augment=False (--no-augment) turns off; "
                   "drop --no-augment, or leave this at its default")
            check(("hflip",), why, off={"hflip": 0.0})
            if self.uses_pil:  # (the in-memory pipeline refuses these already, augment or not)
                check(("crop_scale", "color_jitter"), why, off={"color_jitter": 0.0})
                if self.train_interpolation == "random":  # timm's transform without augmentation: bilinear
                    out.append(("train_interpolation", why))
        elif self.auto_augment is not None and "3a" not in self.auto_augment:
            check(("color_jitter",),
                  f"timm turns colour jitter off when auto_augment is set ({self.auto_augment!r}; only the "
                  f"'3a' policy keeps it); leave color_jitter at its default, or unset auto_augment "
                  f"(--auto-augment none)", off={"color_jitter": 0.0})
        return out

    def _check_unused_settings(self) -> None:
        """Refuse settings this run's data pipeline never reads (they would be silently ignored)."""
        keys: tuple[str, ...] = ()
        if self.dataset in TENSOR_DATASETS:  # read from their files, not by split name or column
            keys = ("train_split", "val_split", "image_key", "label_key")
        elif self.dataset == "imagefolder":
            keys = ("image_key", "label_key")
        unused = [n for n in keys if getattr(self, n) is not None]
        if unused:
            what = ", ".join(f"{n}={getattr(self, n)!r}" for n in unused)
            raise ConfigError(f"{what}: dataset {self.dataset!r} does not use this setting; leave it unset")
        if self.uses_pil:
            return
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        unused = [n for n in ("crop_scale", "color_jitter", "train_interpolation")
                  if _as_tuple(getattr(self, n)) != _as_tuple(defaults[n])]
        if unused:
            what = ", ".join(f"{n}={getattr(self, n)!r}" for n in unused)
            raise ConfigError(
                f"{what}: a setting of timm's transforms, which the {self.dataset} in-memory pipeline does "
                f"not run (it shifts images by up to 2 pixels and flips them, --hflip); add --auto-augment "
                f"to train through timm's transforms, or leave it unset"
            )

    @property
    def uses_pil(self) -> bool:
        """Whether this run reads images through PIL + timm transforms (else: in-memory tensors)."""
        return self.dataset in PIL_DATASETS or self.auto_augment is not None
