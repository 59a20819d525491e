"""Recipe files: the shipped recipes, flag > file > default precedence, clear errors for bad files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from gmlp.cli import main
from gmlp.train.recipe import RECIPE_DIR, ConfigError, RecipeError, load_recipe, merge_settings
from gmlp.train.vision import VisionTrainConfig

RECIPES = RECIPE_DIR


def test_fashion_mnist_recipe_equals_the_defaults() -> None:
    assert (
        VisionTrainConfig(**load_recipe(RECIPES / "fashion_mnist.yaml", VisionTrainConfig))
        == VisionTrainConfig()
    )


@pytest.mark.parametrize(
    ("size", "model", "drop_path"),
    [("ti", "gmlp_ti16_224", 0.0), ("s", "gmlp_s16_224", 0.05), ("b", "gmlp_b16_224", 0.2)],
)
def test_imagenet_recipes_hold_the_paper_settings(size: str, model: str, drop_path: float) -> None:
    settings = load_recipe(RECIPES / f"imagenet_gmlp_{size}.yaml", VisionTrainConfig)
    cfg = VisionTrainConfig(**{**settings, "data_root": "/data/imagenet"})
    cfg.validate()
    paper = dict(
        model=model,
        dataset="imagefolder",
        epochs=300,
        batch_size=4096,
        lr=1e-3,
        warmup_steps=10_000,
        betas=(0.9, 0.999),
        eps=1e-6,
        weight_decay=0.05,
        grad_clip=1.0,
        mixup=0.8,
        cutmix=1.0,
        mixup_switch_prob=0.5,
        mixup_prob=1.0,
        label_smoothing=0.1,
        reprob=0.0,
        ema=False,
        drop_rate=0.0,
        drop_path_rate=drop_path,
        auto_augment="rand-m9-mstd0.5-inc1",
        img_size=224,
    )
    assert {k: getattr(cfg, k) for k in paper} == paper


def _printed(capsys: pytest.CaptureFixture, argv: list[str]) -> dict:
    assert main(argv) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_flag_beats_file_beats_default(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 1e-2\nepochs: 3\nbetas: [0.8, 0.9]\nmodel-kwargs: {depth: 2}\n")
    got = _printed(
        capsys, ["train", "--config", str(recipe), "--epochs", "1", "--no-augment", "--print-config"]
    )
    assert got["lr"] == 0.01 and got["epochs"] == 1 and got["augment"] is False
    assert got["betas"] == [0.8, 0.9] and got["model_kwargs"] == {"depth": 2}
    assert got["batch_size"] == VisionTrainConfig().batch_size
    got = _printed(
        capsys, ["train", "--print-config", "--mean", "0.5", "--model-kwargs", 'depth=3,variant="sgu"']
    )
    assert got["mean"] == [0.5] and got["model_kwargs"] == {"depth": 3, "variant": "sgu"}
    assert (
        dataclasses.asdict(VisionTrainConfig())["lr"] == _printed(capsys, ["train", "--print-config"])["lr"]
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lrr: 0.1\n", "unknown key 'lrr' \\(did you mean 'lr'\\?\\)"),
        ("batch_size: big\n", "batch_size.*must be int, got str"),
        ("batch_size: 3.5\n", "batch_size.*must be int"),
        ("augment: 1\n", "augment.*must be bool"),
        ("betas: [0.9]\n", "betas.*list of 2"),
        ("lr: [1]\n", "'lr' must be float"),
        ("- lr\n", "must be a mapping"),
        ("lr: [\n", "not valid YAML"),
    ],
)
def test_bad_recipe_files_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe, VisionTrainConfig)


def test_missing_recipe_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a missing input file is a one-line usage error of the command line (it was a traceback)
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "gmlp train: error: recipe file not found" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="recipe file not found"):  # the Python API still raises
        load_recipe(tmp_path / "nope.yaml", VisionTrainConfig)


@pytest.mark.parametrize(
    ("text", "message"),
    [("grad_clip: nan", r"key 'grad_clip' must be a number, got 'nan' \(not a number\)"),
     ("grad_clip: .nan", r"key 'grad_clip' must be a number, got nan \(not a number\)"),
     ("mean: [0.5, .nan, 0.5]", r"key 'mean' must be list of float or null, got list \[0.5, nan, 0.5\]")],
)  # fmt: skip
def test_recipe_refuses_nan(tmp_path: Path, text: str, message: str) -> None:
    # grad_clip NaN passed VisionTrainConfig.validate (NaN < 0 is False); `grad_clip > 0` turned clipping off
    path = tmp_path / "r.yaml"
    path.write_text(text + "\n")
    with pytest.raises(RecipeError, match=message):
        load_recipe(path, VisionTrainConfig)


def test_flag_nan_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="'grad_clip' must be a number, got nan"):
        merge_settings(VisionTrainConfig, {}, {"grad_clip": float("nan")})
    assert merge_settings(VisionTrainConfig, {}, {"grad_clip": "1e-1"}).grad_clip == 0.1


def test_recipe_refuses_a_setting_given_twice(tmp_path: Path) -> None:
    # batch_size and batch-size are the same setting: the later one silently won
    path = tmp_path / "r.yaml"
    path.write_text("batch_size: 64\nbatch-size: 32\n")
    message = "key 'batch-size' sets 'batch_size', already set by key 'batch_size'"
    with pytest.raises(RecipeError, match=message):
        load_recipe(path, VisionTrainConfig)


@pytest.mark.parametrize("name", ["grad_clip", "mixup", "cutmix", "weight_decay", "warmup_lr", "ema_decay"])
def test_config_built_in_python_refuses_nan(name: str) -> None:
    # NaN < 0 is False: built directly (no recipe, no flag), a NaN grad_clip turned clipping silently off
    with pytest.raises(ConfigError, match=rf"{name} must be"):
        VisionTrainConfig(**{name: float("nan")}).validate()
    with pytest.raises(ConfigError, match=r"std must be > 0"):
        VisionTrainConfig(mean=(0.5,), std=(float("nan"),)).validate()


def test_digits_with_a_data_root_is_a_usage_error(tmp_path: Path) -> None:
    # the data root was silently ignored: scikit-learn's bundled digits trained instead
    with pytest.raises(ConfigError, match=r"dataset 'digits' takes no data_root \(--data-root\)"):
        VisionTrainConfig(dataset="digits", data_root=str(tmp_path)).validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_device_cuda_without_cuda_is_a_usage_error() -> None:
    with pytest.raises(ConfigError, match=r"device cuda \(--device\): no CUDA device is available"):
        VisionTrainConfig(device="cuda").validate()


def test_a_flag_of_an_optional_setting_unsets_the_recipe_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--auto-augment none` turns off a recipe's RandAugment (it was refused as "not a timm policy"), and
    any optional setting reads none/null as None; other values keep their type checks."""
    recipe = RECIPE_DIR / "imagenet_gmlp_s.yaml"
    argv = ["train", "--config", str(recipe), "--data-root", str(tmp_path), "--print-config"]
    assert main([*argv, "--auto-augment", "none", "--max-steps", "NULL", "--warmup-lr", "None"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["auto_augment"] is None and printed["max_steps"] is None and printed["warmup_lr"] is None
    assert main(argv) == 0
    assert yaml.safe_load(capsys.readouterr().out)["auto_augment"] == "rand-m9-mstd0.5-inc1"
    with pytest.raises(SystemExit):
        main([*argv, "--max-steps", "many"])
    assert "argument --max-steps: invalid int value: 'many'" in capsys.readouterr().err
