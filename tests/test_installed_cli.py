"""The installed command line: ``gmlp --help`` loads no torch, and the recipes ship as package data.

``gmlp`` builds every sub-command's parser (``gmlp train``'s one flag per setting included) from torch-free
modules, so ``gmlp --help`` and ``gmlp CMD --help`` answer in a fraction of a second instead of importing
torch first. ``gmlp train --config NAME`` finds a recipe shipped in the package (``src/gmlp/recipes``, the
one copy in the repository), from any folder; a path to a file always wins.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gmlp import cli
from gmlp.cli import main
from gmlp.cli import vision as cli_vision
from gmlp.train.recipe import RECIPE_DIR, load_recipe, packaged_recipes, resolve_recipe
from gmlp.train.vision import VisionTrainConfig

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("train", "eval", "info", "export", "compare-vit", "plot-spatial", "plot-metrics", "tokenizer",
            "pretrain", "finetune")
HEAVY = ("torch", "numpy", "safetensors")

# In a fresh interpreter: build the parser and print every command's help; report what got imported.
_HELP_SCRIPT = textwrap.dedent(
    """
    import contextlib, io, json, sys
    import gmlp.cli
    gmlp.cli.build_parser()
    out = {"after_build_parser": [m for m in HEAVY if m in sys.modules], "help": {}}
    for argv in [["--help"]] + [[c, "--help"] for c in COMMANDS]:
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.suppress(SystemExit):
            gmlp.cli.main(argv)
        out["help"][" ".join(argv)] = stdout.getvalue()
    out["after_help"] = [m for m in HEAVY if m in sys.modules]
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def fresh_help() -> dict:
    """:data:`_HELP_SCRIPT`'s result (one subprocess: a fraction of a second without torch)."""
    script = f"HEAVY = {HEAVY!r}\nCOMMANDS = {COMMANDS!r}\n{_HELP_SCRIPT}"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "COLUMNS": "100"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_building_the_parser_imports_no_torch() -> None:
    """The brief's check, verbatim: ``gmlp.cli.build_parser()`` in a fresh interpreter loads no torch."""
    code = "import gmlp.cli, sys; gmlp.cli.build_parser(); print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "False"


def test_every_help_answers_without_torch_numpy_or_safetensors(fresh_help: dict) -> None:
    assert fresh_help["after_build_parser"] == []
    assert fresh_help["after_help"] == [], "a --help imported " + ", ".join(fresh_help["after_help"])
    for argv, text in fresh_help["help"].items():
        assert text.startswith("usage: gmlp"), argv


def test_help_is_the_same_with_torch_loaded(fresh_help: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parity: each help printed by the torch-free parser equals the one printed in this interpreter (where
    torch and gmlp.train.vision are loaded): the lazy imports change no flag, default or text."""
    import gmlp.train.vision  # noqa: F401  (loaded, as a command would have it)

    monkeypatch.setenv("COLUMNS", "100")
    for argv, text in fresh_help["help"].items():
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.suppress(SystemExit):
            main(argv.split())
        assert stdout.getvalue() == text, argv


def test_the_settings_class_is_re_exported_unchanged() -> None:
    """``gmlp.train.vision.VisionTrainConfig`` is the torch-free module's class, and ``gmlp train`` has a
    flag for each of its fields."""
    from gmlp.train import vision, vision_config

    assert vision.VisionTrainConfig is vision_config.VisionTrainConfig
    assert vision.TENSOR_DATASETS is vision_config.TENSOR_DATASETS
    args = cli.build_parser().parse_args(["train", "--epochs", "3"])
    assert cli_vision._train_config(args) == VisionTrainConfig(epochs=3)
    flags = {a.dest for a in cli.build_parser()._subparsers._group_actions[0].choices["train"]._actions}
    assert {f.name for f in dataclasses.fields(VisionTrainConfig)} <= flags


def test_a_checkpoint_error_is_still_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``main`` looks CheckpointError up only once gmlp.utils.io is imported (as whatever raises it has)."""
    from gmlp.utils.io import CheckpointError

    def broken(args: object) -> int:
        raise CheckpointError("model.safetensors is truncated")

    monkeypatch.setattr(cli_vision, "_info", broken)
    assert main(["info"]) == 2
    assert capsys.readouterr().err == "gmlp info: error: model.safetensors is truncated\n"

    def other(args: object) -> int:
        raise ValueError("a bug, not a usage error")

    monkeypatch.setattr(cli_vision, "_info", other)
    with pytest.raises(ValueError, match="a bug"):
        main(["info"])


# --- recipes as package data ------------------------------------------------------------------------------


def test_recipes_are_package_data_kept_in_one_copy() -> None:
    """The recipes live in the package (the wheel's ``gmlp/recipes``, named by pyproject's package-data), in
    one copy (no second ``recipes/`` folder at the top of the repository)."""
    tomllib = pytest.importorskip("tomllib")
    import gmlp

    assert RECIPE_DIR.parent == Path(gmlp.__file__).resolve().parent
    assert set(packaged_recipes()) == {"fashion_mnist", "imagenet_gmlp_b", "imagenet_gmlp_s",
                                       "imagenet_gmlp_ti"}
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setuptools["package-data"]["gmlp"]
    shipped = {p for pattern in patterns for p in RECIPE_DIR.parent.glob(pattern)}
    assert set(packaged_recipes().values()) <= shipped
    assert not (ROOT / "recipes").exists()


@pytest.mark.parametrize("name", sorted(packaged_recipes()))
def test_a_bare_name_reads_the_packaged_recipe_from_any_folder(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parity: ``NAME`` and ``NAME.yaml`` give the settings of the packaged file, from a folder that holds no
    ``recipes/`` (as for an installed package)."""
    monkeypatch.chdir(tmp_path)
    expected = load_recipe(RECIPE_DIR / f"{name}.yaml", VisionTrainConfig)
    assert expected  # the file holds settings
    for given in (name, f"{name}.yaml"):
        assert resolve_recipe(given) == RECIPE_DIR / f"{name}.yaml"
        assert load_recipe(given, VisionTrainConfig) == expected


def test_print_config_with_a_bare_name_outside_the_repository(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("yaml")
    monkeypatch.chdir(tmp_path)
    common = ["train", "--data-root", str(tmp_path), "--print-config"]
    assert main([*common, "--config", str(RECIPE_DIR / "imagenet_gmlp_s.yaml")]) == 0
    by_path = capsys.readouterr().out
    assert main([*common, "--config", "imagenet_gmlp_s"]) == 0
    assert capsys.readouterr().out == by_path
    assert "model: gmlp_s16_224" in by_path and "drop_path_rate: 0.05" in by_path


def test_a_path_wins_over_a_packaged_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for given in ("imagenet_gmlp_s", "imagenet_gmlp_s.yaml"):
        (tmp_path / given).write_text("epochs: 3\n")
        assert resolve_recipe(given) == Path(given)
        assert load_recipe(given, VisionTrainConfig) == {"epochs": 3}
        (tmp_path / given).unlink()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("imagenet_gmlp_x", "recipe file not found: 'imagenet_gmlp_x', and no packaged recipe has that name "
                            "(did you mean 'imagenet_gmlp_s'?); packaged recipes: "),
        ("no_such_recipe", "recipe file not found: 'no_such_recipe', and no packaged recipe has that name; "
                           "packaged recipes: "),
        ("sub/none.yaml", "recipe file not found: 'sub/none.yaml' (or give a packaged recipe by name: "),
    ],
)
def test_an_unknown_name_lists_the_packaged_recipes(
    given: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A usage error (one line, exit status 2) naming what was given and every packaged recipe; the Python
    API still raises FileNotFoundError."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", given]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gmlp train: error: {expected}") and err.count("\n") == 1, err
    assert all(name in err for name in packaged_recipes())
    with pytest.raises(FileNotFoundError, match="recipe file not found"):
        resolve_recipe(given)


def test_the_help_names_the_packaged_recipes(fresh_help: dict) -> None:
    for command in ("train --help", "compare-vit --help"):
        text = " ".join(fresh_help["help"][command].split())
        assert all(name in text for name in packaged_recipes()), command
