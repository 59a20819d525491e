"""The ``gmlp`` command line: argument parsing and dispatch only; the work lives in :mod:`gmlp.train`.

Each sub-module of this package registers its sub-commands through ``register(subparsers)`` and sets a
``func`` default that takes the parsed ``argparse.Namespace``. A :class:`gmlp.train.recipe.ConfigError`
(a setting the command cannot run with), a missing input file, a :class:`gmlp.data.text.TextDataError` (an
unusable corpus), a :class:`gmlp.utils.io.CheckpointError` (a checkpoint that is truncated, corrupt, or
whose keys or shapes do not fit the model) or a :class:`gmlp.data.folders.CorruptImageError` (an image that
``--strict-images`` stops at) is printed as ``gmlp COMMAND: error: ...`` with exit status 2. So is a missing
optional package (one of :data:`OPTIONAL_PACKAGES`: ``timm``, ``transformers``, ``yaml``, ``onnx``, ...), with
the ``pip install "gmlp[EXTRA]"`` that installs it, instead of a ``ModuleNotFoundError`` traceback.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Sequence

from ..train.recipe import ConfigError  # torch-free: building the parser (``gmlp --help``) loads no torch

__all__ = ["OPTIONAL_PACKAGES", "build_parser", "main", "missing_optional_package"]

# Modules registering sub-commands, in help order.
_COMMAND_MODULES = ("gmlp.cli.vision", "gmlp.cli.tools", "gmlp.cli.text")

#: Top-level modules that commands import but the base install (torch, numpy, safetensors, tqdm) lacks:
#: module name -> (the pip package that provides it, the extra of ``gmlp`` that installs it).
OPTIONAL_PACKAGES: dict[str, tuple[str, str]] = {
    "timm": ("timm", "train"),
    "transformers": ("transformers", "train"),
    "tokenizers": ("tokenizers", "train"),
    "accelerate": ("accelerate", "train"),
    "datasets": ("datasets", "train"),
    "huggingface_hub": ("huggingface-hub", "train"),
    "matplotlib": ("matplotlib", "train"),
    "yaml": ("pyyaml", "train"),
    "rdata": ("rdata", "train"),
    "torchvision": ("torchvision", "train"),
    "tensorboard": ("tensorboard", "train"),
    "PIL": ("pillow", "train"),
    "sklearn": ("scikit-learn", "train"),
    "onnx": ("onnx", "export"),
    "onnxscript": ("onnxscript", "export"),
    "onnxruntime": ("onnxruntime", "export"),
}


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
        # (one write: under PYTHONUNBUFFERED print's text and newline are two, which another process's
        # line sharing the log can split)
        sys.stderr.write("interrupted\n")
        sys.stderr.flush()
        return 130
    except (ConfigError, FileNotFoundError) as err:  # a bad setting or a missing input file (a recipe, a
        # corpus, a checkpoint): a usage error, as argparse reports its own (no traceback)
        print(f"gmlp {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ConnectionError as err:  # a hub source (--data hf:..., --dataset hf) unreachable or offline
        if err.errno is not None:  # an OS error (a broken pipe, a reset socket, a torchrun peer): not that
            raise
        print(f"gmlp {args.command}: error: {_message(err)} (this data source needs the Hugging Face Hub: "
              f"give a local folder or file instead, or go online)", file=sys.stderr)
        return 2
    except ValueError as err:  # an unusable corpus (gmlp.data.text, imported only by the text commands), or
        # a checkpoint that is unreadable or does not fit the model (gmlp.utils.io.CheckpointError)
        # or an image that --strict-images stops at (gmlp.data.folders, imported by the vision commands)
        # (each looked up only if its module was imported: it raised nothing otherwise, and importing
        # gmlp.utils.io here would load torch for every command)
        unusable: tuple[type, ...] = ()
        for module, name in (("gmlp.utils.io", "CheckpointError"), ("gmlp.data.text", "TextDataError"),
                             ("gmlp.data.folders", "CorruptImageError")):
            if module in sys.modules:
                unusable += (getattr(sys.modules[module], name),)
        if not isinstance(err, unusable):
            raise
        print(f"gmlp {args.command}: error: {_message(err)}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # a training run stopped at a non-finite loss (gmlp.train): what and
        # where is in the message, and the last checkpoint is kept (a traceback would say nothing more)
        print(f"gmlp {args.command}: error: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # a missing optional package: which one, and the extra that installs it
        missing = missing_optional_package(err)
        if missing is None:
            raise
        package, extra = OPTIONAL_PACKAGES[missing]
        module = "" if package == missing else f" (module {missing!r})"
        print(f"gmlp {args.command}: error: this needs the {package} package{module}, which is not "
              f'installed: pip install "gmlp[{extra}]"', file=sys.stderr)
        return 2
    return int(result or 0)


def missing_optional_package(err: BaseException) -> str | None:
    """The module of :data:`OPTIONAL_PACKAGES` whose absence caused ``err``, or None.

    That is a ``ModuleNotFoundError`` for the module itself, or for a sub-module of one blocked by ``None`` in
    ``sys.modules`` (not for a sub-module of an installed package:
    that is a version mismatch, not a missing extra), found in ``err`` or along the exceptions it was raised
    from: an ``ImportError``'s cause or context (an import error re-raised with a hint), another exception's
    explicit cause only (``raise RuntimeError(...) from import_error``; an unrelated error raised while an
    optional import's failure was being handled is not one).
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ModuleNotFoundError) and current.name in OPTIONAL_PACKAGES:
            return current.name
        top = (getattr(current, "name", None) or "").partition(".")[0]
        if isinstance(current, ModuleNotFoundError) and top in OPTIONAL_PACKAGES and top in sys.modules \
                and sys.modules[top] is None:  # blocked (None in sys.modules): a sub-module's import names
            return top  # itself ("No module named 'x.y'; 'x' is not a package"), not the package
        current = (current.__cause__ or current.__context__) if isinstance(current, ImportError) else (
            current.__cause__
        )
    return None


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
