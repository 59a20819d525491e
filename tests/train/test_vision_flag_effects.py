"""No flag of ``gmlp train`` or of the vision tools is silently ignored (twenty-third session audit).

Every flag either changes what runs, or is refused with a one-line usage error naming it; a flag beats the
recipe's value of its setting; the saved ``config.json`` is the resolved configuration that ran. Each test
marked "(failed before)" failed on the code before its fix.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import timm.data  # noqa: F401  (loaded once here, not inside the first test that checks an auto_augment policy)
import yaml

from gmlp.cli import build_parser, main
from gmlp.cli import vision as cli_vision
from gmlp.train.recipe import RECIPE_DIR, ConfigError, RecipeError, load_recipe, setting_types
from gmlp.train.vision_config import VisionTrainConfig

TINY = dict(model="gmlp_micro4_28", dataset="digits", batch_size=32, epochs=1, train_subset=32,
            test_subset=32, warmup_steps=1, augment=False, progress=False, threads=1, workers=0,
            tensorboard=False, plot=False)
FOLDER = dict(dataset="imagefolder", data_root="/data/x")  # the PIL pipeline (never read by validate)


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture, *parts: str) -> str:
    """``gmlp ARGV`` exits with status 2 and one ``gmlp COMMAND: error: ...`` line holding ``parts``."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gmlp {argv[0]}: error: ") and "\n" not in err, err
    for part in parts:
        assert part in err, err
    return err


# --- recipes and flags: every setting ----------------------------------------------------------------------


def _two_values(tp: Any) -> tuple[Any, Any, list[str]]:
    """``(recipe value, flag value, flag words)`` of two different values of a setting of type ``tp``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if tp is bool:
        return True, False, ["--no-{}"]
    if tp is int:
        return 3, 5, ["--{}", "5"]
    if tp is float:
        return 0.25, 0.75, ["--{}", "0.75"]
    if tp is str:
        return "aa", "bb", ["--{}", "bb"]
    if typing.get_origin(tp) is dict:
        return {"a": 1}, {"b": 2}, ["--{}", "b=2"]
    assert typing.get_origin(tp) is tuple, tp
    return [0.1, 0.2], (0.3, 0.4), ["--{}", "0.3", "0.4"]


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(VisionTrainConfig)])
def test_every_setting_has_a_flag_that_beats_the_recipe(name: str, tmp_path: Path) -> None:
    """Property over all settings: a recipe's value applies without the flag; the flag's value wins over
    it (flag > file > default), through the same parser and merge that ``gmlp train`` runs."""
    recipe_value, flag_value, words = _two_values(setting_types(VisionTrainConfig)[name])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({name: recipe_value}))
    flag = [w.format(name.replace("_", "-")) for w in words]
    parser = build_parser()
    as_tuple = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731
    from_file = cli_vision._train_config(parser.parse_args(["train", "--config", str(recipe)]))
    assert as_tuple(getattr(from_file, name)) == as_tuple(recipe_value)
    from_flag = cli_vision._train_config(parser.parse_args(["train", "--config", str(recipe), *flag]))
    assert getattr(from_flag, name) == flag_value


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(VisionTrainConfig)])
def test_a_misspelt_recipe_key_is_refused(name: str, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"{name}x: 1\n")
    with pytest.raises(RecipeError, match=rf"unknown key '{name}x' \(did you mean '{name}'\?\)"):
        load_recipe(recipe, VisionTrainConfig)


# --- gmlp train: settings that another setting switches off (failed before: all were accepted) -------------

#: (settings, the words of the refusal, the setting that gives them an effect)
INERT = [
    ({"ema_decay": 0.99}, "ema_decay=0.99 (--ema-decay): a setting of the weight average", {"ema": True}),
    ({"ema_warmup": True}, "ema_warmup=True (--ema-warmup)", {"ema": True}),
    ({"mixup_prob": 0.5}, "mixup_prob=0.5 (--mixup-prob): a setting of mixup/cutmix", {"cutmix": 1.0}),
    ({"mixup_mode": "pair"}, "mixup_mode='pair'", {"mixup": 0.2}),
    ({"mixup_switch_prob": 0.2}, "mixup_switch_prob=0.2", {"mixup": 0.8, "cutmix": 1.0}),
    ({"mixup_switch_prob": 0.2, "mixup": 0.8}, "the chance of cutmix instead of mixup", {"cutmix": 1.0}),
    ({"mixup_switch_prob": 0.2, "cutmix": 0.8}, "only counts when both are on", {"mixup": 1.0}),
    ({"remode": "const"}, "remode='const' (--remode): a setting of random erasing", {"reprob": 0.25}),
    ({"recount": 3}, "recount=3 (--recount)", {"reprob": 0.25}),
    ({"drop_path_schedule": "linear"}, "drop_path_schedule='linear'", {"drop_path_rate": 0.1}),
    ({"warmup_lr": 1e-4, "warmup_steps": 0}, "warmup_lr=0.0001 (--warmup-lr): the learning rate the warmup",
     {"warmup_steps": 5}),
    ({"hflip": 0.2}, "hflip=0.2 (--hflip): a setting of the training augmentation", {"augment": True}),
    ({**FOLDER, "hflip": 0.9}, "hflip=0.9", {"augment": True}),
    ({**FOLDER, "crop_scale": (0.5, 1.0)}, "crop_scale=(0.5, 1.0) (--crop-scale)", {"augment": True}),
    ({**FOLDER, "color_jitter": 0.1}, "color_jitter=0.1", {"augment": True}),
    ({**FOLDER, "train_interpolation": "random"}, "train_interpolation='random'", {"augment": True}),
    ({"augment": True, "auto_augment": "rand-m9-mstd0.5", "color_jitter": 0.1},
     "timm turns colour jitter off when auto_augment is set", {"auto_augment": "3a"}),
]


@pytest.mark.parametrize(("settings", "message", "enabled"), INERT, ids=[str(c[0]) for c in INERT])
def test_a_setting_switched_off_by_another_is_refused(settings: dict, message: str, enabled: dict) -> None:
    """Each was accepted and did nothing (failed before); with the setting that uses it, it is accepted."""
    with pytest.raises(ConfigError, match=None) as err:
        VisionTrainConfig(**{**TINY, **settings}).validate()
    assert message in str(err.value), err.value
    VisionTrainConfig(**{**TINY, **settings, **enabled}).validate()


@pytest.mark.parametrize(
    "settings",
    [{"hflip": 0.0}, {**FOLDER, "color_jitter": 0.0, "hflip": 0.0},
     {"augment": True, "auto_augment": "rand-m9", "color_jitter": 0.0}, {"ema_decay": 0.9998},
     {"mixup_switch_prob": 0.5, "mixup": 0.8}, {"drop_path_schedule": "uniform"}, {"warmup_steps": 0}],
)
def test_a_value_that_matches_what_runs_is_accepted(settings: dict) -> None:
    """The default, or 0 (off) for a part that is off anyway: nothing the run ignores."""
    VisionTrainConfig(**{**TINY, **settings}).validate()


def test_the_refused_settings_really_change_nothing() -> None:
    """Why they are refused: timm's train transform without augmentation, or with RandAugment, is the same
    whatever hflip / crop_scale / color_jitter say."""
    from gmlp.train.vision import build_model, pil_transforms

    model = build_model("gmlp_micro4_28", img_size=12, in_chans=3)
    mean = std = (0.5, 0.5, 0.5)

    def train_tf(**settings: Any) -> str:
        config = VisionTrainConfig(**{**TINY, **FOLDER, **settings})  # (not validated: they are refused)
        return repr(pil_transforms(model, config, mean, std)[0])

    plain = train_tf()
    assert train_tf(hflip=0.9, crop_scale=(0.5, 1.0), color_jitter=0.1) == plain
    policy = {"augment": True, "auto_augment": "rand-m9-mstd0.5"}
    assert train_tf(**policy, color_jitter=0.1) == train_tf(**policy)
    assert train_tf(augment=True, color_jitter=0.1) != train_tf(augment=True)  # with augmentation it counts


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
@pytest.mark.parametrize(
    "off",
    [["--no-ema"], ["--mixup", "0", "--cutmix", "0"], ["--mixup", "0"], ["--reprob", "0"],
     ["--drop-path-rate", "0"], ["--auto-augment", "none"], ["--auto-augment", "none", "--no-augment"],
     ["--warmup-steps", "0"]],
)
def test_a_flag_that_turns_a_recipe_feature_off_is_accepted(
    recipe: str, off: list[str], capsys: pytest.CaptureFixture
) -> None:
    """The new refusals leave the packaged recipes usable with each feature turned off by one flag (the
    recipes give the dependent settings at their defaults)."""
    assert main(["train", "--config", recipe, "--data-root", "/data", *off, "--print-config"]) == 0
    capsys.readouterr()


def test_a_recipe_setting_a_flag_switches_off_is_moot(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The imagenet recipes' warmup_lr with --warmup-steps 0 was refused as if the user had set it: a recipe's
    setting of a part a flag switches off goes back to its default. The same setting given as a flag, or a
    recipe that contradicts itself, is still refused."""
    argv = ["train", "--config", "imagenet_gmlp_s", "--data-root", "/data", "--warmup-steps", "0"]
    assert main([*argv, "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["warmup_lr"] is None
    _usage_error([*argv, "--warmup-lr", "1e-5", "--print-config"], capsys, "warmup_lr=1e-05", "warmup_steps")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"warmup_steps": 0, "warmup_lr": 1e-6}))
    _usage_error(["train", "--config", str(recipe), "--lr", "0.01", "--print-config"], capsys,
                 "warmup_lr=1e-06", "warmup_steps is 0")


# --- the saved run config is what ran ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A one-step digits run started from a recipe with flags over it; ``(run dir, printed config)``."""
    tmp = tmp_path_factory.mktemp("run")
    recipe = tmp / "r.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "lr": 0.01, "mean": [0.4], "output": str(tmp / "ignored")}))
    argv = ["train", "--config", str(recipe), "--output", str(tmp / "run"), "--lr", "0.003", "--max-steps",
            "1", "--model-kwargs", "depth=2", "--seed", "7"]
    parser_out = build_parser().parse_args(argv)
    printed = json.loads(json.dumps(dataclasses.asdict(cli_vision._train_config(parser_out))))
    assert main(argv) == 0
    return tmp / "run", printed


def test_the_saved_config_is_the_resolved_one(digits_run: tuple[Path, dict], capsys: pytest.CaptureFixture
                                              ) -> None:
    run, printed = digits_run
    saved = json.loads((run / "config.json").read_text())
    assert saved == printed
    got = (saved["lr"], saved["mean"], saved["model_kwargs"], saved["seed"])
    assert got == (0.003, [0.4], {"depth": 2}, 7)
    capsys.readouterr()


# --- gmlp eval: the in-memory datasets' splits and data root (failed before: a ValueError traceback) --------


def test_eval_refuses_a_split_or_data_root_the_in_memory_data_lacks(
    digits_run: tuple[Path, dict], capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    run = str(digits_run[0])
    _usage_error(["eval", run, "--split", "validation"], capsys, "--split 'validation'",
                 "dataset 'digits' has the splits 'train' and 'test'")
    _usage_error(["eval", run, "--data-root", str(tmp_path)], capsys, "--data-root",
                 "dataset 'digits' is scikit-learn's bundled copy")
    _usage_error(["eval", run, "--dataset", "fashion_mnist", "--split", "val"], capsys,
                 "dataset 'fashion_mnist' has the splits")
    assert main(["eval", run, "--split", "train", "--subset", "8", "--workers", "0"]) == 0
    assert "[train]" in capsys.readouterr().out


# --- gmlp info: flags of one model / of the throughput measurement (failed before: ignored) -----------------


@pytest.fixture
def info_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    from gmlp.train import vision_tools

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(vision_tools, "model_info",
                        lambda name, **kw: calls.append({"name": name, **kw}) or {"summary": "ok"})
    return calls


@pytest.mark.parametrize(
    "flags", [["--img-size", "64"], ["--in-chans", "3"], ["--num-classes", "5"],
              ["--model-kwargs", "depth=2"], ["--throughput"], ["--batch-size", "8"], ["--device", "cpu"]],
)
def test_info_without_a_model_refuses_model_flags(
    flags: list[str], info_calls: list, capsys: pytest.CaptureFixture
) -> None:
    _usage_error(["info", *flags], capsys, flags[0], "no model was named")


@pytest.mark.parametrize("flags", [["--batch-size", "8"], ["--device", "cpu"], ["--device", "auto"]])
def test_info_refuses_throughput_flags_without_throughput(
    flags: list[str], info_calls: list, capsys: pytest.CaptureFixture
) -> None:
    _usage_error(["info", "gmlp_micro4_28", *flags], capsys, " ".join(flags),
                 "a setting of the throughput measurement, which runs only with --throughput")
    assert info_calls == []


def test_info_passes_its_defaults_and_flags_through(info_calls: list, capsys: pytest.CaptureFixture) -> None:
    assert main(["info", "gmlp_micro4_28"]) == 0
    assert main(["info", "gmlp_micro4_28", "--throughput", "--batch-size", "4", "--device", "cpu"]) == 0
    assert [(c["throughput"], c["batch_size"], c["device"]) for c in info_calls] == [
        (False, 32, "auto"), (True, 4, "cpu")]
    capsys.readouterr()


# --- gmlp export --verify without onnxruntime (failed before: the check was skipped without a word) -------


@pytest.fixture
def no_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    import gmlp.export

    calls: list[dict[str, Any]] = []
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime fails, find_spec gives None
    monkeypatch.setattr(gmlp.export, "export_checkpoint",
                        lambda checkpoint, output, **kw: calls.append(kw) or Path(output))
    return calls


def test_export_verify_without_onnxruntime_is_refused(
    no_onnxruntime: list, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    out = str(tmp_path / "m.onnx")
    _usage_error(["export", "ck", "-o", out, "--verify"], capsys, "--verify runs the exported file in "
                 'onnxruntime, which is not installed: pip install "gmlp[export]" (or give --no-verify)')
    assert no_onnxruntime == []  # refused before anything was exported
    assert main(["export", "ck", "-o", out]) == 0
    assert "not verified: onnxruntime is not installed" in capsys.readouterr().out
    assert main(["export", "ck", "-o", out, "--no-verify"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert [c["verify"] for c in no_onnxruntime] == [True, False]


# --- gmlp compare-vit: the recipe's progress (failed before: always on unless --no-progress) ---------------


def test_compare_vit_keeps_the_recipe_progress_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from gmlp.train import compare

    class Reached(Exception):
        pass

    seen: list[bool] = []

    def load_data(config: Any) -> None:  # the runs' settings, as run_comparison built them
        seen.append(config.progress)
        raise Reached

    monkeypatch.setattr(compare, "load_data", load_data)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("progress: false\n")
    for argv in (["--config", str(recipe)], ["--config", str(recipe), "--progress"], [],
                 ["--no-progress"]):
        with pytest.raises(Reached):
            main(["compare-vit", "-o", str(tmp_path / "o"), *argv])
    assert seen == [False, True, True, False]
    with pytest.raises(Reached):  # the Python API too (its progress=True default overrode the recipe)
        compare.run_comparison(tmp_path / "o", config=recipe)
    assert seen[-1] is False
    capsys.readouterr()
