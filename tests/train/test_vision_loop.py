"""Details of the vision training loop against timm's semantics: the LR schedule per optimizer update,
evaluation sums over uneven batches, and timm models inside gmlp's tools (drop-path schedule, size-agnostic
models, the shapes ``gmlp eval`` / ``gmlp export`` read from a timm model's weights)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gmlp.data.images import load_image_dataset
from gmlp.models.loading import save_model
from gmlp.train.recipe import ConfigError
from gmlp.train.vision import VisionTrainConfig, build_model, evaluate, model_input_size, train_vision
from gmlp.train.vision_tools import checkpoint_shapes, evaluate_checkpoint

VIT = "timm:vit_tiny_patch16_224"
SMALL_VIT = {"patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2}
DIGITS = dict(dataset="digits", batch_size=32, epochs=1, warmup_steps=1, progress=False, train_subset=64,
              test_subset=32, threads=1, tensorboard=False, plot=False)


# --- timm models: drop-path schedule ---------------------------------------------------------------------


def test_a_gmlp_drop_path_schedule_for_a_timm_model_is_a_usage_error_before_anything_is_written(
    tmp_path: Path,
) -> None:
    """timm models take no drop_path_schedule: 'linear' reached timm's constructor (a TypeError traceback
    after the data was read and the output folder made)."""
    out = tmp_path / "run"
    cfg = VisionTrainConfig(model=VIT, model_kwargs=SMALL_VIT, drop_path_rate=0.1,
                            drop_path_schedule="linear", output=str(out), **DIGITS)
    with pytest.raises(ConfigError, match="drop_path_schedule 'linear' is a setting of the gmlp models"):
        train_vision(cfg)
    assert not out.exists()
    with pytest.raises(ConfigError, match="timm model 'vit_tiny_patch16_224' does not take"):
        build_model(VIT, drop_path_schedule="linear", **SMALL_VIT)


def test_a_timm_vit_spreads_the_drop_path_rate_by_its_own_rule() -> None:
    """The default 'uniform' is not passed to a timm model: timm's ViT grows the rate linearly with depth
    (as the docs say), whatever gmlp's schedule setting."""
    model = build_model(VIT, drop_path_rate=0.3, drop_path_schedule="uniform", **{**SMALL_VIT, "depth": 4})
    rates = [float(getattr(b.drop_path1, "drop_prob", 0.0)) for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])


# --- timm models that take no img_size / drop_path_rate ----------------------------------------------------


def test_size_agnostic_timm_models_build_at_the_data_s_size_and_train_on_in_memory_images(
    tmp_path: Path,
) -> None:
    """A convolutional timm model takes no img_size (and some no drop_path_rate): gmlp train passes both for
    every model, so `gmlp train --model timm:resnet10t --dataset digits` failed with a TypeError."""
    net = build_model("timm:resnet10t", num_classes=10, img_size=(8, 8), in_chans=1, drop_path_rate=0.0,
                      drop_rate=0.0)
    assert model_input_size(net) == (1, 8, 8)  # recorded in pretrained_cfg for the transforms
    with torch.device("meta"):  # (no init work)
        net = build_model("timm:densenet121", num_classes=3, drop_path_rate=0.0, drop_rate=0.0)
        assert net.classifier.out_features == 3
        with pytest.raises(ConfigError, match="drop_path_rate 0.1: timm model 'densenet121' takes no"):
            build_model("timm:densenet121", num_classes=3, drop_path_rate=0.1)
    result = train_vision(VisionTrainConfig(model="timm:resnet10t", output=str(tmp_path / "run"), **DIGITS))
    assert result["step"] == 2 and 0.0 <= result["test_accuracy"] <= 1.0
    evaluated = evaluate_checkpoint(tmp_path / "run", subset=32, workers=0)
    assert evaluated["loss"] == pytest.approx(result["test_loss"], rel=1e-5)


# --- checkpoint_shapes of timm models -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("img_size", "vit_kwargs"),
    [
        ((12, 12), {}),
        ((8, 8), {"class_token": False, "global_pool": "avg"}),
        ((16, 16), {"reg_tokens": 2, "no_embed_class": True}),
        ((12, 12), {"reg_tokens": 3}),
        ((12, 8), {}),  # a rectangular grid: the size is not knowable from the tokens
    ],
)
@pytest.mark.parametrize("num_classes", [7, 0])
def test_checkpoint_shapes_reads_a_timm_vit(tmp_path: Path, img_size: tuple[int, int], vit_kwargs: dict,
                                            num_classes: int) -> None:
    """Channels from the patch embedding, classes from the head (0 without one), the image size from the
    position embedding (with or without class/register tokens in it): `gmlp eval` / `gmlp export` of a
    compare-vit ViT need no flags. (It returned {} for every timm layout.)"""
    net = build_model(VIT, num_classes=num_classes, img_size=img_size, in_chans=1, **SMALL_VIT, **vit_kwargs)
    save_model(net, tmp_path / "w.safetensors")
    shapes = checkpoint_shapes(tmp_path / "w.safetensors")
    expected = {"in_chans": 1, "num_classes": num_classes}
    if img_size[0] == img_size[1]:
        expected["img_size"] = img_size
    assert shapes == expected


def test_checkpoint_shapes_reads_the_layers_a_timm_architecture_names(tmp_path: Path) -> None:
    """Models other than ViTs: the first convolution and classifier their pretrained_cfg names."""
    net = build_model("timm:resnet10t", num_classes=5, in_chans=1)
    save_model(net, tmp_path / "w.safetensors")
    assert checkpoint_shapes(tmp_path / "w.safetensors") == {"in_chans": 1, "num_classes": 5}


def _tree(root: Path) -> Path:
    """train/ and val/ with 2 classes of 12x12 colour images (3 and 2 per class)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for c in range(2):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_eval_of_bare_timm_vit_weights_takes_the_size_from_the_weights(tmp_path: Path) -> None:
    """A ViT trained at --img-size 16, evaluated from its weights file alone: the model was built at timm's
    default 224 (a pos_embed shape mismatch) unless --img-size was given again."""
    root = _tree(tmp_path / "imgs")
    net = build_model(VIT, num_classes=2, img_size=16, **SMALL_VIT)
    save_model(net, tmp_path / "w.safetensors")
    result = evaluate_checkpoint(tmp_path / "w.safetensors", model=VIT, model_kwargs=SMALL_VIT,
                                 dataset="imagefolder", data_root=str(root), workers=0, device="cpu")
    assert result["count"] == 4 and result["split"] == "val"
    assert result["top5"] == 1.0  # top-k over all classes when there are fewer than 5 (as timm's accuracy)


# --- the schedule and the evaluation sums -------------------------------------------------------------------


def test_lr_schedule_per_optimizer_update_matches_timm_s_warmup_and_cosine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lr of each optimizer update (not micro-step) is timm's CosineLRScheduler value for that update:
    linear warmup from warmup_lr over warmup_steps, then cosine over the whole run (warmup included, timm's
    warmup_prefix=False) towards min_lr."""
    from gmlp.utils.state import import_timm_optim

    timm_optim = import_timm_optim()  # (a plain first `import timm.optim` changes torch.compile's config)
    real = timm_optim.create_optimizer_v2
    seen: list[list[float]] = []

    def recording(*args, **kwargs):
        opt = real(*args, **kwargs)
        step = opt.step

        def recorded_step(*a, **k):
            seen.append([g["lr"] for g in opt.param_groups])
            return step(*a, **k)

        opt.step = recorded_step
        return opt

    monkeypatch.setattr(timm_optim, "create_optimizer_v2", recording)
    lr, min_lr, warmup_lr, warmup = 1e-2, 1e-4, 1e-3, 3
    cfg = VisionTrainConfig(model="gmlp_micro4_28", output=str(tmp_path / "run"), grad_accum_steps=2,
                            **{**DIGITS, "epochs": 2, "train_subset": 128, "warmup_steps": warmup, "lr": lr,
                               "min_lr": min_lr, "warmup_lr": warmup_lr})
    train_vision(cfg)
    total = 2 * 128 // 32
    assert len(seen) == total  # one scheduler value per update, not per micro-batch
    for t, lrs in enumerate(seen):
        if t < warmup:
            expected = warmup_lr + t * (lr - warmup_lr) / warmup
        else:
            expected = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / total))
        assert lrs == pytest.approx([expected] * len(lrs), rel=1e-12), t


def test_evaluation_sums_over_batches_of_any_size() -> None:
    """Top-1, top-5 and the mean loss do not depend on the evaluation batch size (an uneven last batch
    counts by its images, not as one batch)."""
    data = load_image_dataset("digits", "test").subset(37)
    torch.manual_seed(0)
    model = build_model("gmlp_micro4_28", num_classes=10, img_size=(8, 8), in_chans=1)
    whole = evaluate(model, data, batch_size=1000)
    for batch in (1, 5, 36):
        part = evaluate(model, data, batch_size=batch)
        assert part["count"] == whole["count"] == 37
        assert part["accuracy"] == whole["accuracy"] and part["top5"] == whole["top5"]
        assert part["loss"] == pytest.approx(whole["loss"], rel=1e-5)
