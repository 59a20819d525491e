"""The vision user journey as the docs tell it (docs/vision_training.md, README "Training"): what a user who
follows them runs into. Each test pins down a mismatch found by following them: settings that passed the
checks and then failed (or were silently dropped) when the run started, a run removed by ``--overwrite``
before the new one was refused, and ``gmlp eval`` of runs that trained and evaluated fine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gmlp.train.recipe import ConfigError
from gmlp.train.vision import VisionTrainConfig, pil_transforms, train_vision
from gmlp.train.vision_tools import evaluate_checkpoint

TINY = dict(model="gmlp_micro4_28", dataset="digits", batch_size=32, epochs=1, train_subset=64,
            test_subset=64, warmup_steps=1, progress=False, threads=1, workers=0, tensorboard=False,
            plot=False)


# --- settings that --print-config accepted and the run then failed on, or silently dropped ---------------


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ("randaugment", "not a valid timm policy"),  # passed the prefix check, then a bare AssertionError
        ("rand-m9-z3", "Unknown RandAugment config section"),
        ("rand-m9x", "not a valid timm policy"),
        ("v01", "Unknown AA policy"),
        ("augmixx", "not a valid timm policy"),
        ("rand-mx", "'mx' hold no value"),  # timm skipped it: RandAugment ran at its default magnitude
        ("original-mstd", "'mstd' hold no value"),
        ("bogus", "not a timm policy"),
    ],
)
def test_an_auto_augment_policy_timm_cannot_run_is_a_usage_error(policy: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        VisionTrainConfig(**{**TINY, "auto_augment": policy}).validate()


@pytest.mark.parametrize(
    "policy",
    ["rand-m9-mstd0.5-inc1", "rand-n2-m7", "original", "v0r", "original-mstd0.5", "augmix-m5-w4-d2", "3a"],
)
def test_every_accepted_auto_augment_policy_builds_timms_transform(policy: str) -> None:
    """Parity with timm: what validate() accepts, ``create_transform`` builds, and the policy is in it."""
    import gmlp

    config = VisionTrainConfig(**{**TINY, "auto_augment": policy})
    config.validate()
    train_tf, _ = pil_transforms(gmlp.create_model("gmlp_micro4_28"), config, (0.5,), (0.5,))
    names = [type(t).__name__ for t in train_tf.transforms]
    assert any(n in ("RandAugment", "AutoAugment", "AugMixAugment") for n in names), names


def test_no_augment_with_an_auto_augment_policy_is_refused() -> None:
    """timm's transform without augmentation (``no_aug``) never runs the policy: `--no-augment --auto-augment
    rand-m9` trained without RandAugment, and without a word."""
    with pytest.raises(ConfigError, match=r"auto_augment 'rand-m9' with augment=False \(--no-augment\)"):
        VisionTrainConfig(**{**TINY, "auto_augment": "rand-m9", "augment": False}).validate()
    VisionTrainConfig(**{**TINY, "augment": False}).validate()  # --no-augment alone: fine


def test_train_interpolation_is_checked_before_the_run() -> None:
    """An unknown interpolation was a KeyError inside timm once the run had written its folder."""
    with pytest.raises(ConfigError, match=r"train_interpolation must be one of bicubic, .* got 'cubic'"):
        VisionTrainConfig(**{**TINY, "auto_augment": "rand-m9", "train_interpolation": "cubic"}).validate()
    VisionTrainConfig(**{**TINY, "auto_augment": "rand-m9", "train_interpolation": "random"}).validate()


# --- --overwrite --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("journey") / "run"
    train_vision(VisionTrainConfig(**TINY, output=str(out)))
    return out


def _listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"img_size": 28}, "the digits images are 8x8 tensors"),
        ({"model_kwargs": {"num_classes": 3}}, "the dataset sets these"),
        ({"mean": (0.1, 0.2)}, "--mean has 2 values"),
        ({"model_kwargs": {"foo": 1}}, "unexpected argument foo=1"),  # a TypeError traceback before
        ({"model_kwargs": {"depth": 0}}, "depth must be an int >= 1, got 0"),
    ],
)
def test_overwrite_leaves_the_old_run_when_the_new_one_is_refused(
    finished_run: Path, override: dict, message: str
) -> None:
    """"Refused when the run starts, before it writes anything": with --overwrite the old run's files were
    removed first, then the new run was refused, so a typo cost the previous run."""
    before = _listing(finished_run)
    assert "model.safetensors" in before and "checkpoints/latest.json" in before
    with pytest.raises(ConfigError, match=message):
        train_vision(VisionTrainConfig(**{**TINY, **override}, output=str(finished_run), overwrite=True))
    assert _listing(finished_run) == before


# --- gmlp eval ----------------------------------------------------------------------------------------------


def test_eval_refuses_a_head_that_does_not_fit_the_dataset_as_a_usage_error(finished_run: Path,
                                                                              tmp_path: Path) -> None:
    """As `gmlp export` does: a ConfigError (one line, status 2), where eval raised a plain ValueError."""
    from PIL import Image

    for c in range(3):
        (tmp_path / "val" / f"c{c}").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "val" / f"c{c}" / "0.png")
    with pytest.raises(ConfigError, match="checkpoint head has 10 classes, the model 3"):
        evaluate_checkpoint(finished_run / "model.safetensors", model="gmlp_micro4_28", dataset="imagefolder",
                            data_root=str(tmp_path), workers=0)


def test_eval_of_an_hf_run_whose_validation_split_lacks_the_highest_integer_label(tmp_path: Path) -> None:
    """Integer labels without a ClassLabel: training numbers the validation split by the training classes,
    gmlp eval gave it one class per label it holds, so a split without the highest label built a model with
    one class too few and refused the run's own checkpoint."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    rng = np.random.default_rng(0)

    def split(labels: list[int]) -> object:
        images = []
        for i, y in enumerate(labels):
            path = tmp_path / "png" / f"{len(labels)}_{i}.png"
            path.parent.mkdir(exist_ok=True)
            arr = np.clip(rng.normal(60 + 60 * y, 20, (8, 8)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(path)
            images.append(str(path))
        features = datasets.Features({"img": datasets.Image(), "target": datasets.Value("int64")})
        return datasets.Dataset.from_dict({"img": images, "target": labels}, features=features)

    root = tmp_path / "hf"
    datasets.DatasetDict({"train": split([0, 1, 2] * 6), "test": split([0, 1] * 4)}).save_to_disk(str(root))
    out = tmp_path / "run"
    config = VisionTrainConfig(**{**TINY, "dataset": "hf", "data_root": str(root), "label_key": "target",
                                  "img_size": 8, "batch_size": 6, "train_subset": None, "test_subset": None,
                                  "eval_batch_size": 4, "lr": 0.05}, output=str(out))
    train_vision(config)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    result = evaluate_checkpoint(out, workers=0)
    assert result["count"] == 8 and result["split"] == "test"
    assert result["top1"] == pytest.approx(last["test_accuracy"])
    assert result["loss"] == pytest.approx(last["test_loss"], rel=1e-5)
    assert torch.isfinite(torch.tensor(result["loss"]))


# --- RandAugment under the installed Pillow ----------------------------------------------------------------


@pytest.mark.parametrize("chans", [1, 3])
def test_posterize_at_every_magnitude_runs_and_keeps_the_top_bits(chans: int) -> None:
    """The paper recipe's RandAugment (``rand-m9-mstd0.5-inc1``) keeps 4 - int(magnitude * 0.4) bits: 0 at
    magnitude 10, which its noise reaches on ~2% of draws. Pillow >= 12 refuses 0 bits (a ValueError that
    stopped the run within its first steps); older Pillow, and TF's RandAugment, give a black image. Checked
    at every magnitude against the bit mask ``value & ~(2 ** (8 - bits) - 1)``."""
    from PIL import Image

    import gmlp

    config = VisionTrainConfig(**{**TINY, "auto_augment": "rand-m9-mstd0.5-inc1"})
    model = gmlp.create_model("gmlp_micro4_28", in_chans=chans)
    train_tf, _ = pil_transforms(model, config, (0.5,) * chans, (0.5,) * chans)
    rand_augment = next(t for t in train_tf.transforms if type(t).__name__ == "RandAugment")
    op = next(o for o in rand_augment.ops if o.name == "PosterizeIncreasing")
    op.prob, op.magnitude_std = 1.0, 0.0
    arr = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if chans == 1 else arr, "L" if chans == 1 else "RGB")
    for magnitude in range(11):
        op.magnitude = magnitude
        bits = 4 - int(magnitude / 10 * 4)
        expected = np.asarray(img) & (~(2 ** (8 - bits) - 1) & 0xFF)
        got = op(img)
        assert got.mode == img.mode and got.size == img.size
        np.testing.assert_array_equal(np.asarray(got), expected, err_msg=f"magnitude {magnitude}")
