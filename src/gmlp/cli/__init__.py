"""The ``gmlp`` command line: argument parsing and dispatch only; the work lives in :mod:`gmlp.train`.

Each sub-module of this package registers its sub-commands through ``register(subparsers)`` and sets a
``func`` default that takes the parsed ``argparse.Namespace``. A :class:`gmlp.train.recipe.ConfigError`
(a setting the command cannot run with), a missing input file, a :class:`gmlp.data.text.TextDataError` (an
unusable corpus), a :class:`gmlp.utils.io.CheckpointError` (a checkpoint that is truncated, corrupt, or
whose keys or shapes do not fit the model) or a :class:`gmlp.data.folders.CorruptImageError` (an image that
``--strict-images`` stops at) is printed as ``gmlp COMMAND: error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Sequence

from ..train.recipe import ConfigError
from ..utils.io import CheckpointError

__all__ = ["build_parser", "main"]

# Modules registering sub-commands, in help order.
_COMMAND_MODULES = ("gmlp.cli.vision", "gmlp.cli.tools", "gmlp.cli.text")


def build_parser() -> argparse.ArgumentParser:
    """The full ``gmlp`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="gmlp", description="gMLP / aMLP models, training pipelines and tools (Pay Attention to MLPs)."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in _COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gmlp`` console script; with no argument it prints the help (exit status 2)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # argparse would print only "the following arguments are required: COMMAND"
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ConfigError, FileNotFoundError) as err:  # a bad setting or a missing input file (a recipe, a
        # corpus, a checkpoint): a usage error, as argparse reports its own (no traceback)
        print(f"gmlp {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # an unusable corpus (gmlp.data.text, imported only by the text commands), or
        # a checkpoint that is unreadable or does not fit the model (gmlp.utils.io.CheckpointError)
        # or an image that --strict-images stops at (gmlp.data.folders, imported by the vision commands)
        unusable: tuple[type, ...] = (CheckpointError,)
        for module, name in (("gmlp.data.text", "TextDataError"), ("gmlp.data.folders", "CorruptImageError")):
            if module in sys.modules:
                unusable += (getattr(sys.modules[module], name),)
        if not isinstance(err, unusable):
            raise
        print(f"gmlp {args.command}: error: {_message(err)}", file=sys.stderr)
        return 2
    return int(result or 0)


def _message(err: BaseException) -> str:
    """``err``'s message; for one re-raised from a DataLoader worker (whose message is the worker's whole
    traceback), the original exception's own line."""
    text = str(err)
    if "Original Traceback" in text:  # the last "module.Name: message" line of the worker's traceback
        found = re.findall(rf"^(?:[\w.]+\.)?{type(err).__name__}: (.*)$", text, re.M)
        if found:
            return found[-1]
    return text


if __name__ == "__main__":
    sys.exit(main())
