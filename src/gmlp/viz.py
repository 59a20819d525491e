"""Plots: the learned spatial weights W (the paper's figures) and training curves.

Works on any checkpoint holding ``...blocks.N.sgu.proj.weight``: a vision ``model.safetensors``, a training
checkpoint directory, or a transformers ``save_pretrained`` directory of a text model.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from .utils.io import CheckpointError, atomic_write, load_state_dict_file, read_jsonl_records

__all__ = ["spatial_weights", "spatial_locality", "plot_spatial", "plot_metrics"]

_KEY = re.compile(r"(?:.*\.)?blocks\.(\d+)\.sgu\.proj\.weight")


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.is_dir() and not (path / "model.safetensors").is_file() and (path / "checkpoints").is_dir():
        from .train.checkpoint import latest_checkpoint

        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"no checkpoint in {str(path)!r}")
        path = latest
    return load_state_dict_file(path)


def _is_text(state: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict is a text model's: the transformers models keep their blocks under ``gmlp.``."""
    return any(key.startswith("gmlp.") for key in state)


def _model_config(path: Path) -> dict | None:
    """The transformers ``config.json`` (one with a ``model_type``) beside the weights at ``path`` (in the
    folder of a ``save_pretrained`` directory or weights file, or in the run folder of a
    ``checkpoints/step-N``), else None (a vision run's ``config.json`` holds training settings instead)."""
    folder = path if path.is_dir() else path.parent
    for candidate in (folder, folder.parent.parent if folder.parent.name == "checkpoints" else None):
        if candidate is not None and (candidate / "config.json").is_file():
            try:
                config = json.loads((candidate / "config.json").read_text())
            except (OSError, ValueError):
                return None
            return config if isinstance(config, dict) and "model_type" in config else None
    return None


def _is_causal(path: Path) -> bool:
    """Whether the text model at ``path`` is causal, from its transformers ``config.json``
    (:func:`_model_config`); a bare ``GMLPModel``'s keys lack the ``gmlp.`` prefix, so only this tells."""
    config = _model_config(path)
    return config is not None and config.get("causal") is True


def _spatial_from_state(
    state: dict[str, torch.Tensor], source: Path, causal: bool = False
) -> dict[int, torch.Tensor]:
    out: dict[int, torch.Tensor] = {}
    for key, value in state.items():
        m = _KEY.fullmatch(key)
        if not m:
            continue
        w = value.float()
        if w.dim() == 1 or (w.dim() == 2 and w.shape[0] != w.shape[1]):  # Toeplitz: (2n-1,) or (heads, 2n-1)
            w = w if w.dim() == 1 else w[0]
            n = (w.shape[0] + 1) // 2
            pos = torch.arange(n)
            w = w[pos[:, None] - pos[None, :] + n - 1]
        elif w.dim() == 3:
            w = w[0]
        if causal:  # the model uses only the lower triangle (as TokenProjection.matrix())
            w = w.tril()
        out[int(m.group(1))] = w
    if not out:
        raise CheckpointError(
            f"{str(source)!r} holds no spatial gating weights (no '...blocks.N.sgu.proj.weight')"
        )
    return dict(sorted(out.items()))


def spatial_weights(path: str | Path) -> dict[int, torch.Tensor]:
    """The dense token-mixing matrices ``{layer: W (n, n)}`` of a checkpoint (Toeplitz weights expanded;
    with several heads, the first head; for a causal text model, masked to the lower triangle it uses)."""
    path = Path(path)
    state, _ = _read(path)
    return _spatial_from_state(state, path, causal=_is_causal(path))


def _grid_distances(grid: tuple[int, int]) -> torch.Tensor:
    """Euclidean distances between the cells of an ``h x w`` patch grid, ``(h*w, h*w)``, row-major."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1).double()
    return torch.cdist(pos, pos)


def spatial_locality(
    path: str | Path, grid: tuple[int, int] | None = None
) -> tuple[dict[int, float], float]:
    """How local the learned token mixing of a vision checkpoint is.

    For each layer: the mean, over output tokens ``i``, of the ``|W[i, j]|``-weighted mean grid distance
    between ``i`` and its inputs ``j`` (0 = each token mixes only itself; the value for uniform weights is
    returned alongside as the no-locality reference). Returns ``({layer: distance}, uniform_distance)``.

    Args:
        path: checkpoint file or directory (as :func:`plot_spatial`).
        grid: the ``(h, w)`` patch grid; default: the checkpoint's metadata, else a square.
    """
    path = Path(path)
    state, metadata = _read(path)
    weights = _spatial_from_state(state, path)
    n = next(iter(weights.values())).shape[0]
    grid = grid if grid is not None else _grid(path, metadata, n, state)
    if grid is None or grid[0] * grid[1] != n:
        raise ValueError(f"grid must be (h, w) with h * w = {n} tokens, got {grid}")
    dist = _grid_distances(grid)
    out = {}
    for layer, w in weights.items():
        a = w.double().abs()
        out[layer] = float(((a * dist).sum(1) / a.sum(1).clamp_min(1e-30)).mean())
    return out, float(dist.mean())


def _grid(
    path: Path, metadata: dict[str, str], n: int, state: dict[str, torch.Tensor]
) -> tuple[int, int] | None:
    """The patch grid of a vision checkpoint (from its metadata, else a square), None for text models."""
    if _is_text(state):
        return None  # a text model's keys start with "gmlp." (vision models': "blocks.")
    if "grid_size" in metadata:
        h, w = (int(v) for v in metadata["grid_size"].split(","))
        return h, w
    if _model_config(path) is not None:
        return None  # a transformers (text) model, e.g. a bare GMLPModel (keys without "gmlp.")
    side = math.isqrt(n)
    return (side, side) if side * side == n else None


def plot_spatial(
    path: str | Path,
    output: str | Path,
    layers: list[int] | None = None,
    rows: int | None = None,
    text: bool | None = None,
) -> Path:
    """Draw rows of the learned W of chosen layers to a PNG.

    Vision (``text=False``; the default when the token count is a square grid and the checkpoint is not a
    text model: its keys do not start with ``gmlp.`` and it is not a transformers directory): each shown row
    (one output token, spread over the grid) is reshaped to the patch grid, as in the paper's Figure 3.
    Text: each row is drawn as a 1-D filter over the relative position ``j - i``, as in the paper's MLM
    figure (for a causal model, only the ``j <= i`` it uses).

    Args:
        path: checkpoint file or directory.
        output: image file to write, atomically: PNG, or the format its suffix names (``.pdf``, ``.svg``, ...;
            ``.png`` is appended to a name without one).
        layers: block indices to draw (default: up to 6 spread over the depth).
        rows: rows (output tokens) per layer, spread evenly over the tokens (default: 6, or every token of
            a W with fewer; more than W's tokens is refused).
        text: force the text (True) or vision (False) layout.

    Returns:
        The path written.
    """
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        raise ValueError(f"rows must be an int >= 1, got {rows!r}")
    if layers is not None and not layers:
        raise ValueError("layers is empty: give at least one block index (or None for a spread)")
    _image_path(output)  # a bad file name before any work
    path = Path(path)
    state, metadata = _read(path)
    causal = _is_causal(path)
    weights = _spatial_from_state(state, path, causal=causal)
    available = list(weights)
    if layers is None:
        step = max(1, len(available) // 6)
        layers = available[::step][:6]
    bad = [i for i in layers if i not in weights]
    if bad:
        raise ValueError(f"layers {bad} not in the checkpoint; it has blocks {available[0]}..{available[-1]}")
    n = weights[layers[0]].shape[0]
    grid = None if text else _grid(path, metadata, n, state)
    if text is False and grid is None:
        text_model = _is_text(state) or _model_config(path) is not None
        why = "the checkpoint is a text model" if text_model else f"{n} tokens do not form a square grid"
        raise ValueError(f"{why}; pass text=True (gmlp plot-spatial --kind text)")
    if rows is None:
        rows = min(6, n)
    elif rows > n:  # (linspace repeated tokens)
        raise ValueError(f"rows must be <= {n}, the output tokens of W; got {rows}")
    token_rows = torch.linspace(0, n - 1, rows).round().long().tolist()
    if grid is not None:
        fig, axes = _figure(1.6 * rows, 1.6 * len(layers), len(layers), rows)
        for r, layer in enumerate(layers):
            for c, i in enumerate(token_rows):
                ax = axes[r][c]
                img = weights[layer][i].reshape(grid).numpy()
                lim = float(abs(img).max()) or 1.0
                ax.imshow(img, cmap="RdBu_r", vmin=-lim, vmax=lim)
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    ax.set_ylabel(f"layer {layer}")
                if r == 0:
                    ax.set_title(f"token {i}", fontsize=8)
        fig.suptitle("Rows of the learned spatial weights W, reshaped to the patch grid")
    else:
        fig, axes = _figure(8, 1.8 * len(layers), len(layers), 1)
        for r, layer in enumerate(layers):
            ax = axes[r][0]
            for i in token_rows:
                used = i + 1 if causal else n  # a causal model mixes only tokens j <= i
                ax.plot((torch.arange(used) - i).numpy(), weights[layer][i, :used].numpy(), lw=0.8,
                        label=f"row {i}")
            ax.axvline(0, color="grey", lw=0.5)
            ax.set_ylabel(f"layer {layer}")
        axes[-1][0].set_xlabel("relative position j - i")
        axes[0][0].legend(fontsize=6, ncol=min(rows, 6))
        fig.suptitle("Rows of the learned spatial weights W as 1-D filters" + (" (causal)" if causal else ""))
    return _save_figure(fig, output)


def _image_path(output: str | Path) -> tuple[Path, str]:
    """``(path, format)`` of a plot file: the format from the suffix (``.png``, ``.pdf``, ``.svg``, ...), and
    ``.png`` appended to a name without one (as matplotlib does), so the path returned is the file written.

    Raises:
        ValueError: ``output`` is a directory, or its suffix is no image format matplotlib writes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    output = Path(output)
    if output.is_dir():
        raise ValueError(f"output {str(output)!r} is a directory; give an image file name")
    if not output.suffix:
        output = output.with_name(output.name + ".png")
    fmt = output.suffix[1:].lower()
    formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
    if fmt not in formats:
        raise ValueError(
            f"output {str(output)!r}: {output.suffix!r} is not an image format; use a file name ending in "
            f"{', '.join('.' + f for f in sorted(formats))}"
        )
    return output, fmt


def _figure(width: float, height: float, nrows: int, ncols: int, **kwargs: Any) -> tuple[Any, Any]:
    """``(figure, 2-D array of axes)``: a figure of its own on an Agg canvas, outside ``matplotlib.pyplot``.

    pyplot would need ``matplotlib.use("Agg")``, which switches the caller's backend (a notebook's inline
    one, an interactive window's) for the rest of the process, and it would register the figure with
    pyplot's figure manager, shared with the caller.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kwargs)


def _save_figure(fig: Any, output: str | Path) -> Path:
    """Write ``fig`` atomically (a half-written plot never replaces the previous one); returns the path
    written (see :func:`_image_path`)."""
    path, fmt = _image_path(output)
    fig.tight_layout()
    with atomic_write(path) as tmp:  # a temporary name: the format is given, not read from the suffix
        fig.savefig(tmp, dpi=120, format=fmt)
    return path


def plot_metrics(metrics: str | Path, output: str | Path) -> Path:
    """Plot every numeric series of a ``metrics.jsonl`` file (or of a run folder's) to a PNG, one panel per
    metric.

    Records are grouped by their ``"split"`` (the text runs' ``train``/``validation``/``test``; the vision
    runs' records have none), and each metric of each split is its own line (e.g. ``validation loss``), drawn
    against ``step``, or ``epoch`` where that split's records have no step. A line that is not a JSON record
    (the last one of a killed run may be cut short) is skipped with a warning. ``output`` is written
    atomically, as in :func:`plot_spatial`; returns the path written.

    Raises:
        FileNotFoundError: a folder without a ``metrics.jsonl``.
        ValueError: no records, no numeric metric, or an ``output`` suffix that is no image format.
    """
    metrics = Path(metrics)
    if metrics.is_dir():
        if not (metrics / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"{str(metrics)!r} is a folder without a metrics.jsonl")
        metrics = metrics / "metrics.jsonl"
    _image_path(output)  # a bad file name before any work
    records = [record for _, record in read_jsonl_records(metrics, stacklevel=2)]
    if not records:
        raise ValueError(f"{str(metrics)!r} holds no records")
    groups: dict[str | None, list[dict]] = {}
    for record in records:
        groups.setdefault(record.get("split"), []).append(record)

    def numeric(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    # {metric: [(label, x key, xs, ys)]}, in order of first appearance
    panels: dict[str, list[tuple[str, str, list[float], list[float]]]] = {}
    for split, group in groups.items():
        xkey = next((k for k in ("step", "epoch") if all(numeric(r.get(k)) for r in group)), None)
        keys = dict.fromkeys(
            k for r in group for k, v in r.items() if k not in ("step", "epoch") and numeric(v)
        )
        for key in keys:
            points = [
                (r[xkey] if xkey else i, r[key]) for i, r in enumerate(group) if numeric(r.get(key))
            ]
            label = key if split is None else f"{split} {key}"
            panels.setdefault(key, []).append(
                (label, xkey or "record", [x for x, _ in points], [y for _, y in points])
            )
    if not panels:
        raise ValueError(f"{str(metrics)!r} holds no numeric metrics")
    fig, axes = _figure(6, 2 * len(panels), len(panels), 1, sharex=True)
    xkeys: dict[str, None] = {}
    for ax, (key, series) in zip(axes[:, 0], panels.items(), strict=True):
        for label, xkey, xs, ys in series:
            ax.plot(xs, ys, marker="o", ms=3, label=label)
            xkeys[xkey] = None
        ax.set_ylabel(key, fontsize=8)
        if len(series) > 1 or series[0][0] != key:
            ax.legend(fontsize=6)
    axes[-1][0].set_xlabel(" / ".join(xkeys))
    return _save_figure(fig, output)
