"""Training recipes: YAML files of settings, checked against a config dataclass.

A recipe file maps setting names (the dataclass's field names, ``lr``, ``batch_size``, ...; dashes are
accepted for underscores) to values. :func:`load_recipe` refuses unknown keys and values of the wrong type
with an error naming the file and the key. :func:`merge_settings` layers the sources: explicit command-line
flags over the file over the dataclass defaults.

The recipes that ship with gmlp (:data:`RECIPE_DIR`: ``fashion_mnist``, ``imagenet_gmlp_{ti,s,b}`` for
``gmlp train``; ``mlm_ablation``, ``mlm_full_base`` for ``gmlp pretrain``; ``glue_sst2``, ``glue_mnli``,
``squad`` for ``gmlp finetune``) are package data: :func:`resolve_recipe` finds one by its bare name
(``gmlp train --config imagenet_gmlp_s``) from an installed package as from a checkout; a path to an existing
file always wins.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "RECIPE_DIR",
    "TEXT_RECIPE_DIR",
    "ConfigError",
    "RecipeError",
    "check_cuda_available",
    "coerce_setting",
    "load_recipe",
    "merge_settings",
    "packaged_recipes",
    "resolve_recipe",
    "setting_types",
]

#: The folder of the recipes that ship with the package (``src/gmlp/recipes``; package data of the wheel).
RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"
#: The folder of the text commands' recipes (``gmlp pretrain`` / ``gmlp finetune --config NAME``).
TEXT_RECIPE_DIR = RECIPE_DIR / "text"


class ConfigError(ValueError):
    """A setting has a value a command cannot run with; the message names the setting. The ``gmlp``
    command line reports it as a usage error (one line, exit status 2) instead of a traceback."""


class RecipeError(ConfigError):
    """A recipe file is unreadable, or holds an unknown key or a value of the wrong type."""


def check_cuda_available(device: str) -> None:
    """Refuse ``--device cuda`` on a machine without a CUDA device (with a :class:`ConfigError`), before a
    command silently falls back to the CPU or fails deep inside."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available; use --device cpu (or auto)")


def setting_types(config_cls: type) -> dict[str, Any]:
    """``{field name: resolved type annotation}`` of a config dataclass."""
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} " + "/".join(_type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}" if typing.get_args(tp) else "list"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def coerce_setting(name: str, value: Any, tp: Any) -> Any:
    """``value`` checked against (and minimally converted to) type ``tp``; ValueError names ``name``.

    Conversions: an int is accepted for a float; a list of the right length for a tuple; a non-empty list
    for a list (``corpus: [books]``; a bare string is refused, not read as a list of characters). A bool is
    never accepted for a number, and a number never for a string (YAML ``1e-3`` without a dot reads as a
    string, so ``lr: 1e-3`` is accepted for a float). NaN is never accepted for a float (``nan``,
    ``.nan``): every comparison with it is false, so a check such as ``grad_clip > 0`` would silently read it
    as "off".
    Nor is an infinity (``inf``, ``.inf``, ``-inf``): it passes range checks such as ``lr > 0`` and the run
    then fails later with a NaN loss (no setting of a training config means anything at infinity).
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return coerce_setting(name, value, option)
            except ValueError as err:
                errors.append(err)
        raise ValueError(f"{name!r} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None:
            if math.isnan(number):
                raise ValueError(f"{name!r} must be a number, got {value!r} (not a number)")
            if math.isinf(number):
                raise ValueError(f"{name!r} must be a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis and isinstance(value, (list, tuple)) and value:
            return tuple(coerce_setting(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value))
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            pairs = enumerate(zip(value, args, strict=True))
            return tuple(coerce_setting(f"{name}[{i}]", v, a) for i, (v, a) in pairs)
    elif origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (list, tuple)) and value:
            return [coerce_setting(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
    else:  # pragma: no cover - a field type this checker does not know
        return value
    raise ValueError(f"{name!r} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")


def packaged_recipes(recipe_dir: Path = RECIPE_DIR) -> dict[str, Path]:
    """The recipes that ship with gmlp, sorted by name: ``{name: file}`` (``imagenet_gmlp_s`` ->
    ``.../recipes/imagenet_gmlp_s.yaml``); ``recipe_dir``: :data:`RECIPE_DIR` (``gmlp train``) or
    :data:`TEXT_RECIPE_DIR` (``gmlp pretrain`` / ``gmlp finetune``)."""
    if not recipe_dir.is_dir():
        return {}
    return {p.stem: p for p in sorted(recipe_dir.glob("*.yaml")) if p.is_file()}


def resolve_recipe(config: str | Path, recipe_dir: Path = RECIPE_DIR) -> Path:
    """The recipe file that ``config`` (``--config``) names.

    A path to an existing file wins; else a bare name (no folder: ``imagenet_gmlp_s`` or
    ``imagenet_gmlp_s.yaml``) names a packaged recipe of ``recipe_dir`` (:func:`packaged_recipes`).

    Raises:
        FileNotFoundError: neither; the message lists the packaged recipes' names.
    """
    path = Path(config)
    if path.is_file():
        return path
    text = str(config)
    recipes = packaged_recipes(recipe_dir)
    names = ", ".join(recipes) or "none"
    if text and Path(text).name == text and text not in (".", ".."):  # a bare name
        name = text.removesuffix(".yaml")
        if name in recipes:
            return recipes[name]
        close = difflib.get_close_matches(name, list(recipes), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise FileNotFoundError(
            f"recipe file not found: {text!r}, and no packaged recipe has that name{hint}; packaged "
            f"recipes: {names}"
        )
    raise FileNotFoundError(
        f"recipe file not found: {str(path)!r} (or give a packaged recipe by name: {names})"
    )


#: The most values (scalars, lists, mappings and their keys) a recipe may hold, a YAML alias counted at each
#: place it is used: a few lines of nested aliases (``&a [1, 1, ...]``, ``&b [*a, *a, ...]``, ...) make a
#: structure of billions of values that copying the settings (``dataclasses.asdict``, ``config.json``)
#: would spend minutes and all memory on; no real recipe comes near this.
_MAX_RECIPE_VALUES = 100_000


def _check_recipe_size(raw: Any, path: Path) -> None:
    """Refuse a recipe that expands to more than ``_MAX_RECIPE_VALUES`` values (or holds itself, through
    a recursive alias), counted without recursion and stopping at the limit."""
    stack, count = [raw], 0
    while stack:
        node = stack.pop()
        count += 1
        if count > _MAX_RECIPE_VALUES:
            raise RecipeError(
                f"{path}: the recipe holds more than {_MAX_RECIPE_VALUES:,} values (counting each use of a "
                f"YAML alias), or a structure that contains itself; a recipe is a short mapping of settings"
            )
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


def load_recipe(
    path: str | Path,
    config_cls: type,
    *,
    command: str | None = None,
    others: Mapping[str, type] | None = None,
    not_settings: Mapping[str, str] | None = None,
    recipe_dir: Path = RECIPE_DIR,
) -> dict[str, Any]:
    """Read a YAML recipe and check it against ``config_cls``; returns ``{field: value}``.

    ``path`` is a file, or the bare name of a packaged recipe of ``recipe_dir`` (``imagenet_gmlp_s``): see
    :func:`resolve_recipe`.

    ``command`` (``gmlp pretrain``) and ``others`` (``{"gmlp finetune": FinetuneConfig, ...}``) make the
    error for a key of another command's config name that command; ``not_settings`` maps fields of
    ``config_cls`` that a recipe may not set (``resume``: a decision of each command line) to the reason.

    Raises:
        FileNotFoundError: no such file, nor a packaged recipe of that name.
        RecipeError: not YAML, not a mapping, an unknown key, a setting given twice (``batch_size`` and
            ``batch-size``), or a value of the wrong type; nested too deeply for the YAML parser, or more
            than 100,000 values (YAML aliases expanded).
    """
    import yaml

    path = resolve_recipe(path, recipe_dir)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from err
    except RecursionError as err:  # (PyYAML's composer recurses once per level of nesting)
        raise RecipeError(f"{path}: nested too deeply to read (thousands of levels); a recipe is a short "
                          f"mapping of settings") from err
    _check_recipe_size(raw, path)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of setting: value, got {type(raw).__name__}")
    not_settings = not_settings or {}
    types_ = {n: t for n, t in setting_types(config_cls).items() if n not in not_settings}
    out: dict[str, Any] = {}
    given_as: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name in given_as:  # batch_size and batch-size: one would silently replace the other
            raise RecipeError(f"{path}: key {key!r} sets {name!r}, already set by key {given_as[name]!r}")
        given_as[name] = key
        if name in not_settings:
            raise RecipeError(f"{path}: key {key!r} is not a recipe setting: {not_settings[name]}")
        if name not in types_:
            known = ", ".join(sorted(types_))
            elsewhere = [cmd for cmd, cls in (others or {}).items() if name in setting_types(cls)]
            if elsewhere:
                raise RecipeError(
                    f"{path}: key {key!r} is a setting of {' and '.join(elsewhere)}, not of "
                    f"{command or config_cls.__name__}; known keys: {known}"
                )
            close = difflib.get_close_matches(name, list(types_), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"{path}: unknown key {key!r}{hint}; known keys: {known}")
        try:
            out[name] = coerce_setting(name, value, types_[name])
        except ValueError as err:
            raise RecipeError(f"{path}: key {err}") from err
    return out


def merge_settings(config_cls: type, file_settings: dict[str, Any], flags: dict[str, Any]) -> Any:
    """A ``config_cls`` from its defaults, overridden by ``file_settings``, overridden by ``flags``.

    Raises:
        ConfigError: a flag's value is not of its setting's type (``--grad-clip nan``), naming the setting.
    """
    types_ = setting_types(config_cls)
    merged = {**file_settings}
    for name, value in flags.items():
        if name in types_:
            try:
                merged[name] = coerce_setting(name, value, types_[name])
            except ValueError as err:
                raise ConfigError(str(err)) from err
    return config_cls(**merged)
