"""``gmlp plot-spatial`` and ``gmlp plot-metrics``: plots from checkpoints and metric logs (parsing only)."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

from .vision import _positive_int

__all__ = ["register"]


def _layers(text: str) -> list[int]:
    try:
        layers = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"--layers must be comma-separated block indices, got {text!r}"
        ) from err
    if not layers or min(layers) < 0:
        raise argparse.ArgumentTypeError(f"--layers must be block indices >= 0, got {text!r}")
    return layers


def _require_path(what: str, path: str) -> None:
    """A missing input path as a usage error (``gmlp COMMAND: error: ...``), not a traceback."""
    from ..train.recipe import ConfigError

    if not Path(path).exists():
        raise ConfigError(f"{what} not found: {path!r}")


@contextlib.contextmanager
def _usage_errors() -> Iterator[None]:
    """The plot functions' ``ValueError`` (a bad layer, output name or metrics file, an unreadable
    checkpoint) and an output path that cannot be written, as usage errors rather than tracebacks."""
    from ..train.recipe import ConfigError

    try:
        yield
    except ConfigError:
        raise
    except (ValueError, IsADirectoryError, NotADirectoryError, PermissionError) as err:
        raise ConfigError(str(err)) from err


def _plot_spatial(args: argparse.Namespace) -> int:
    from ..viz import plot_spatial, spatial_locality

    _require_path("checkpoint", args.checkpoint)
    text = {"auto": None, "text": True, "vision": False}[args.kind]
    with _usage_errors():
        out = plot_spatial(args.checkpoint, args.output, layers=args.layers, rows=args.rows, text=text)
    print(f"wrote {out}")
    if text is not True:
        try:
            distance, uniform = spatial_locality(args.checkpoint)
        except ValueError:  # not a patch grid (a text model): no 2-D locality
            return 0
        print(f"|W|-weighted mean grid distance per layer (uniform weights: {uniform:.2f}): "
              + ", ".join(f"{layer}: {d:.2f}" for layer, d in distance.items()))
    return 0


def _plot_metrics(args: argparse.Namespace) -> int:
    from ..viz import plot_metrics

    _require_path("metrics", args.metrics)
    with _usage_errors():
        out = plot_metrics(args.metrics, args.output)
    print(f"wrote {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``plot-spatial`` and ``plot-metrics``."""
    p = sub.add_parser("plot-spatial", help="draw the learned spatial weights W of a checkpoint to a PNG")
    p.add_argument(
        "checkpoint", help="model.safetensors, a run or checkpoint directory, or a save_pretrained dir"
    )
    p.add_argument("--output", "-o", default="spatial_weights.png",
                   help="image to write (PNG; .pdf, .svg, ... by suffix)")
    p.add_argument(
        "--layers", type=_layers, default=None, help="comma-separated block indices (default: spread)"
    )
    p.add_argument("--rows", type=_positive_int, default=None,
                   help="rows (output tokens) of W per layer (default: 6, or all of a smaller W)")
    p.add_argument(
        "--kind",
        choices=("auto", "vision", "text"),
        default="auto",
        help="vision: rows as patch-grid images; text: rows as 1-D filters",
    )
    p.set_defaults(func=_plot_spatial)

    m = sub.add_parser(
        "plot-metrics", help="plot the curves of a metrics.jsonl file (or run folder) to a PNG"
    )
    m.add_argument("metrics", help="metrics.jsonl of a training run, or the run folder holding it")
    m.add_argument("--output", "-o", default="metrics.png",
                   help="image to write (PNG; .pdf, .svg, ... by suffix)")
    m.set_defaults(func=_plot_metrics)
