"""``gmlp pretrain`` / ``gmlp finetune --config RECIPE``: YAML recipes of the text commands.

The rules are ``gmlp train``'s: a flag given on the command line wins over the recipe's value, which wins
over the built-in default; unknown keys, values of the wrong type and keys of another command are refused
naming the file and the key. The packaged recipes (``src/gmlp/recipes/text``) are the paper's language
settings (PAPER.md section 5) and must build valid configs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from gmlp.cli import build_parser, main
from gmlp.cli import text as cli_text
from gmlp.train.recipe import RECIPE_DIR, TEXT_RECIPE_DIR, RecipeError, packaged_recipes
from gmlp.train.text import FinetuneConfig, PretrainConfig

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = {"pretrain": PretrainConfig, "finetune": FinetuneConfig}


def _config(argv: list[str]) -> Any:
    """The config ``gmlp ARGV`` would run with (flags over the recipe over the defaults)."""
    args = build_parser().parse_args(argv)
    cfg, _, _ = cli_text._text_config(COMMANDS[argv[0]], args, f"gmlp {argv[0]}")
    return cfg


def _recipe(tmp_path: Path, settings: dict[str, Any], name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(settings))
    return path


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str], *parts: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    for part in parts:
        assert part in err, err
    return err


# --- precedence: flag > file > default ---------------------------------------------------------------------

# (command, setting, a recipe value, a flag value as argv words and as read): values other than the default
_SETTINGS = [
    ("pretrain", "lr", 3e-4, ["--lr", "2e-4"], 2e-4),
    ("pretrain", "steps", 7, ["--steps", "9"], 9),
    ("pretrain", "corpus", ["books"], ["--corpus", "a.txt", "b.txt"], ["a.txt", "b.txt"]),
    ("pretrain", "sparse_prediction", False, ["--sparse-prediction"], True),
    ("pretrain", "cache_tokens", False, ["--token-cache", "cachedir"], True),
    ("pretrain", "clip_grad", 0.5, ["--clip-grad", "0"], None),
    ("finetune", "epochs", 5.0, ["--epochs", "2"], 2.0),
    ("finetune", "dropout", 0.2, ["--dropout", "0.3"], 0.3),
    ("finetune", "task", "qa", ["--task", "classification"], "classification"),
    ("finetune", "tokenizer_kind", "unigram", ["--tokenizer-kind", "wordpiece"], "wordpiece"),
]


@pytest.mark.parametrize(("command", "name", "in_file", "flag", "from_flag"), _SETTINGS)
def test_a_flag_wins_over_the_recipe_which_wins_over_the_default(
    command: str, name: str, in_file: Any, flag: list[str], from_flag: Any, tmp_path: Path
) -> None:
    default = getattr(COMMANDS[command](), name)
    recipe = str(_recipe(tmp_path, {name: in_file}))
    assert getattr(_config([command]), name) == default
    assert getattr(_config([command, "--config", recipe]), name) == in_file
    assert getattr(_config([command, "--config", recipe, *flag]), name) == from_flag
    assert getattr(_config([command, *flag]), name) == from_flag


@pytest.mark.parametrize("command", COMMANDS)
def test_a_flag_given_at_its_default_value_still_wins(command: str, tmp_path: Path) -> None:
    """A flag left out and a flag given at its built-in default are told apart (argparse's defaults would
    hide it): ``--lr`` at the default overrides the recipe's ``lr``."""
    cls = COMMANDS[command]
    default = cls().lr
    recipe = str(_recipe(tmp_path, {"lr": default * 3, "seed": 5}))
    cfg = _config([command, "--config", recipe, "--lr", str(default)])
    assert (cfg.lr, cfg.seed) == (default, 5)


@pytest.mark.parametrize("command", COMMANDS)
def test_no_flag_no_recipe_gives_the_dataclass_defaults(command: str) -> None:
    """Every built-in default of the command line is the config dataclass's (the flags default to "not
    given"), and the namespace gets each resolved value back."""
    cls = COMMANDS[command]
    args = build_parser().parse_args([command])
    cfg, file_settings, flags = cli_text._text_config(cls, args, f"gmlp {command}")
    assert cfg == cls() and file_settings == {} and flags == {}
    assert all(getattr(args, name) == getattr(cfg, name) for name in vars(cfg) if name != "recipe")


def test_dashes_and_underscores_both_name_a_setting(tmp_path: Path) -> None:
    recipe = str(_recipe(tmp_path, {"grad-accum": 4, "batch_size": 8}))
    cfg = _config(["pretrain", "--config", recipe])
    assert (cfg.grad_accum, cfg.batch_size) == (4, 8)


# --- refusals: unknown keys, wrong types, another command's keys -------------------------------------------


@pytest.mark.parametrize(
    ("command", "settings", "parts"),
    [
        ("pretrain", {"lr": 1e-4, "learning_rate": 1e-4}, ["unknown key 'learning_rate'", "known keys: "]),
        ("pretrain", {"stpes": 3}, ["unknown key 'stpes'", "did you mean 'steps'"]),
        ("pretrain", {"steps": "many"}, ["key 'steps' must be int, got str 'many'"]),
        ("pretrain", {"steps": 2.5}, ["key 'steps' must be int, got float 2.5"]),
        ("pretrain", {"lr": True}, ["key 'lr' must be float, got bool True"]),
        ("pretrain", {"lr": float("nan")}, ["key 'lr' must be a number"]),
        ("pretrain", {"corpus": "books"}, ["key 'corpus' must be list of str, got str 'books'"]),
        ("pretrain", {"corpus": ["books", 3]}, ["key 'corpus[1]' must be str, got int 3"]),
        ("pretrain", {"epochs": 3},
         ["key 'epochs' is a setting of gmlp finetune and gmlp train, not of gmlp pretrain"]),
        ("pretrain", {"mixup": 0.8}, ["key 'mixup' is a setting of gmlp train, not of gmlp pretrain"]),
        ("finetune", {"mlm_probability": 0.2},
         ["key 'mlm_probability' is a setting of gmlp pretrain, not of gmlp finetune"]),
        ("finetune", {"corpus": ["books"]},
         ["key 'corpus' is a setting of gmlp pretrain, not of gmlp finetune"]),
        ("finetune", {"resume": True}, ["key 'resume' is not a recipe setting", "give it as a flag"]),
        ("pretrain", {"recipe": "other.yaml"}, ["key 'recipe' is not a recipe setting"]),
    ],
)
def test_a_bad_key_or_value_is_refused_naming_the_file_and_the_key(
    command: str, settings: dict, parts: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _recipe(tmp_path, settings)
    with pytest.raises(RecipeError) as info:
        _config([command, "--config", str(recipe)])
    assert str(info.value).startswith(f"{recipe}: "), info.value
    assert all(part in str(info.value) for part in parts), info.value
    _usage_error([command, "--config", str(recipe)], capsys, f"gmlp {command}: error: {recipe}: ", *parts)


def test_the_known_keys_listed_are_the_commands_recipe_settings(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, {"epochs": 3})
    with pytest.raises(RecipeError) as info:
        _config(["pretrain", "--config", str(recipe)])
    known = set(str(info.value).split("known keys: ")[1].split(", "))
    assert known == set(vars(PretrainConfig())) - {"resume", "recipe"}


def test_an_unknown_recipe_name_lists_the_text_recipes(capsys: pytest.CaptureFixture[str]) -> None:
    err = _usage_error(["pretrain", "--config", "mlm_ablaton"], capsys, "did you mean 'mlm_ablation'")
    assert all(name in err for name in packaged_recipes(TEXT_RECIPE_DIR))
    assert "imagenet_gmlp_s" not in err  # gmlp train's recipes are not the text commands'


def test_a_bad_value_from_the_recipe_names_the_recipe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Validation errors name the flag; where the recipe gave the value, they say so (the flag was not
    given); the same value as a flag is reported as before."""
    recipe = _recipe(tmp_path, {"lr": 0})
    _usage_error(["pretrain", "--config", str(recipe), "--print-config"], capsys,
                 "--lr must be > 0 and finite, got 0.0", f"(set by the recipe {recipe.resolve()}: lr: 0.0)")
    err = _usage_error(["pretrain", "--config", str(recipe), "--lr", "-1", "--print-config"], capsys, "--lr")
    assert "set by the recipe" not in err


# --- the packaged recipes: the paper's settings -----------------------------------------------------------

# the documented values of each packaged text recipe (PAPER.md section 5; docs/text_training.md)
_PAPER = {
    "mlm_ablation": ("pretrain", {
        "preset": "gmlp-ablation", "seq_len": 128, "steps": 125_000, "lr": 7e-4, "warmup": 10_000,
        "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-6, "weight_decay": 0.01, "dropout": 0.0,
        "mlm_probability": 0.15, "vocab_size": 32000, "model_vocab_size": 32000, "tokenizer_kind": "unigram",
    }, 2048),
    "mlm_full_base": ("pretrain", {
        "preset": "gmlp-base", "seq_len": 512, "steps": 1_000_000, "lr": 1e-4, "warmup": 10_000,
        "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-6, "weight_decay": 0.01, "dropout": 0.0,
        "mlm_probability": 0.15, "vocab_size": 32000, "model_vocab_size": 32000, "tokenizer_kind": "unigram",
    }, 256),
    "glue_sst2": ("finetune", {
        "task": "classification", "data": "hf:glue:sst2", "seq_len": 128, "lr": 2e-5, "epochs": 5.0,
        "warmup": 0.1, "dropout": 0.1, "steps": None,
    }, 32),
    "glue_mnli": ("finetune", {
        "task": "classification", "data": "hf:glue:mnli", "text_column": "premise",
        "text_pair_column": "hypothesis", "seq_len": 128, "lr": 2e-5, "epochs": 5.0, "warmup": 0.1,
        "dropout": 0.1,
    }, 32),
    "squad": ("finetune", {
        "task": "qa", "data": "hf:squad", "seq_len": 512, "lr": 5e-5, "steps": 8000, "dropout": 0.1,
    }, 32),
}


def test_every_packaged_text_recipe_is_checked_here() -> None:
    assert set(packaged_recipes(TEXT_RECIPE_DIR)) == set(_PAPER)
    assert not set(packaged_recipes(TEXT_RECIPE_DIR)) & set(packaged_recipes(RECIPE_DIR))


@pytest.fixture
def pretrained(tmp_path: Path) -> Path:
    """A stand-in for a pretrained folder (what validation reads of it: its config.json)."""
    folder = tmp_path / "final"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gmlp", "max_position_embeddings": 512}))
    return folder


@pytest.mark.parametrize("name", sorted(_PAPER))
def test_a_packaged_recipe_builds_a_valid_config_with_the_papers_values(
    name: str, pretrained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    command, expected, global_batch = _PAPER[name]
    monkeypatch.chdir(tmp_path)
    argv = [command, "--config", name]
    cfg = _config(argv)
    got = {key: getattr(cfg, key) for key in expected}
    assert got == expected
    assert cfg.batch_size * cfg.grad_accum == global_batch
    assert cfg.recipe == str(TEXT_RECIPE_DIR / f"{name}.yaml")
    if command == "finetune":  # the pretrained model of mlm_full_base; here a stand-in
        assert cfg.model == "runs/mlm_full_base/final"
        cfg = _config([*argv, "--model", str(pretrained)])
    cfg.validate()
    # and through the command line, by name and by path alike
    by_name = cli_text._run_text(COMMANDS[command], build_parser().parse_args(
        [*argv, "--model", str(pretrained)] if command == "finetune" else argv), f"gmlp {command}")
    assert by_name == cfg


def test_a_flag_naming_the_data_another_way_replaces_the_recipes(pretrained: Path) -> None:
    """``--train-file`` over a recipe's ``data`` (or ``--data`` over its files) is not refused as "both
    given": the recipe's value is moot; given both as flags they are still refused."""
    base = ["finetune", "--config", "squad", "--model", str(pretrained)]
    cfg = _config([*base, "--train-file", "train.json"])
    assert (cfg.data, cfg.train_file) == (None, "train.json")
    with pytest.raises(Exception, match="--data and --train-file"):
        _config([*base, "--train-file", "train.json", "--data", "hf:squad"]).validate()


def test_print_config_prints_the_resolved_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _recipe(tmp_path, {"steps": 7, "lr": 3e-4, "corpus": ["books"]})
    assert main(["pretrain", "--config", str(recipe), "--lr", "2e-4", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["steps"], printed["lr"], printed["corpus"]) == (7, 2e-4, ["books"])
    assert printed["recipe"] == str(recipe.resolve())
    assert main(["finetune", "--print-config"]) == 0  # without a recipe too
    assert yaml.safe_load(capsys.readouterr().out)["recipe"] is None


# --- resume ---------------------------------------------------------------------------------------------


def test_a_recipes_overwrite_is_refused_with_resume(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = _recipe(tmp_path, {"overwrite": True})
    assert _config(["pretrain", "--config", str(recipe)]).overwrite is True
    _usage_error(["pretrain", "--config", str(recipe), "--resume", "--output", str(tmp_path / "run"),
                  "--print-config"], capsys, "--resume continues the run", "overwrite: true")


# --- a run from a recipe records what it ran with ----------------------------------------------------------


def _tiny_settings(corpus: Path) -> dict[str, Any]:
    return {"corpus": [str(corpus)], "steps": 2, "layers": 1, "hidden": 16, "ffn": 32, "seq_len": 16,
            "vocab_size": 40, "batch_size": 2, "eval_batches": 1, "progress": False, "device": "cpu",
            "cache_tokens": False, "lr": 1e-3, "seed": 3}


def _flags(settings: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if value is False:
            argv.append("--no-" + flag[2:] if name != "cache_tokens" else "--no-token-cache")
        elif isinstance(value, list):
            argv += [flag, *value]
        else:
            argv += [flag, str(value)]
    return argv


def _options(run: Path) -> dict[str, Any]:
    tag = json.loads((run / "checkpoints" / "latest.json").read_text())["tag"]
    return json.loads((run / "checkpoints" / tag / "state.json").read_text())["options"]


def test_a_run_from_a_recipe_records_the_same_options_as_the_same_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tiny pretrain from a YAML and one from the same settings as flags: the same resolved options in the
    checkpoint's state.json (the options the run was made with), the recipe file recorded with them; a
    resume without --config says that the run was started with one."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"document {i} has some words and more words {i % 3}" for i in range(12)))
    settings = _tiny_settings(corpus)
    recipe = _recipe(tmp_path, {**settings, "output": str(tmp_path / "ignored")})
    from_file, from_flags = tmp_path / "file", tmp_path / "flags"
    assert main(["pretrain", "--config", str(recipe), "--output", str(from_file)]) == 0
    assert main(["pretrain", *_flags(settings), "--output", str(from_flags)]) == 0
    capsys.readouterr()
    a, b = _options(from_file), _options(from_flags)
    assert a.pop("recipe") == str(recipe.resolve()) and b.pop("recipe") is None
    assert {**a, "output": None} == {**b, "output": None}
    assert a["corpus"] == [str(corpus)] and a["steps"] == 2 and a["lr"] == 1e-3
    assert not (tmp_path / "ignored").exists()
    # a resume takes its settings from the command line: without --config it says so
    assert main(["pretrain", *_flags(settings), "--output", str(from_file), "--resume", "--steps", "2"]) == 0
    assert "was started with --config" in capsys.readouterr().err


# --- packaging ------------------------------------------------------------------------------------------


def test_the_text_recipes_are_package_data() -> None:
    """The wheel ships them: pyproject's package-data names ``recipes/text/*.yaml``."""
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setuptools["package-data"]["gmlp"]
    shipped = {p for pattern in patterns for p in RECIPE_DIR.parent.glob(pattern)}
    assert set(packaged_recipes(TEXT_RECIPE_DIR).values()) <= shipped


def test_the_help_names_the_text_recipes() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in COMMANDS:
        text = " ".join(sub.choices[command].format_help().split())
        assert all(name in text for name in packaged_recipes(TEXT_RECIPE_DIR)), command
        assert "==SUPPRESS==" not in text
