"""ONNX export of vision models (``gmlp export``), with a dynamic batch axis and an onnxruntime check.

The graph takes ``images`` ``(batch, C, H, W)`` float32, already normalised with the model's
``pretrained_cfg`` mean/std, and returns ``logits`` ``(batch, num_classes)``. The image size is fixed (the
spatial weights W are made for one patch grid; export a model built at another size for other inputs).
Needs ``onnx`` and ``onnxscript`` (torch's exporter); the check needs ``onnxruntime``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .nn._checks import as_int
from .utils.io import CheckpointError, atomic_write

__all__ = ["export_checkpoint", "export_onnx", "verify_onnx"]


def export_onnx(model: nn.Module, path: str | Path, input_size: tuple[int, int, int], *,
                opset: int | None = None) -> Path:
    """Write ``model`` (in eval mode) to ``path`` as ONNX with a dynamic batch axis; returns the path.

    The file is written atomically: on any error the file that was at ``path`` (if any) is left as it was.

    Raises:
        ImportError: the exporter's dependencies (``onnx``, ``onnxscript``) are missing.
        ValueError: ``input_size`` is not ``(channels, height, width)``; or ``opset`` is given and the file
            could not be written in it (the exporter falls back to its own opset with only a log message;
            nothing is then written); or the model's parameters are not float32 (``model.half()``: export
            ``model.float()``) or are on the meta device (no weights). A model that refuses images of
            ``input_size`` (a gMLP built for another size) raises its own error, before the exporter runs.
        IsADirectoryError: ``path`` is a directory.
    """
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 1):
        raise ValueError(f"opset must be a positive int, got {opset!r}")
    input_size = _check_input_size(input_size)
    device = _check_exportable(model)
    try:
        import onnx
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"ONNX export needs the onnx and onnxscript packages (pip install onnx onnxscript): {err}"
        ) from err
    path = Path(path)
    was_training = model.training
    model.eval()
    example = torch.randn(2, *input_size, device=device)  # (where the weights are: the graph is the same)
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with torch.no_grad():  # the model's own error for an input it does not take, not the exporter's
            model(example)
        program = torch.onnx.export(
            model, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
            dynamic_shapes=({0: batch},), opset_version=opset, external_data=False, verbose=False,
        )
    finally:
        model.train(was_training)
    # atomically: a failed export (or opset check) leaves the file that was there, not a partial or wrong one
    with atomic_write(path) as tmp:
        program.save(str(tmp))
        if opset is not None:
            imports = onnx.load(str(tmp)).opset_import
            written = next((o.version for o in imports if o.domain in ("", "ai.onnx")), None)
            if written != opset:
                raise ValueError(
                    f"opset {opset}: the exporter could not convert the model to it (it wrote opset "
                    f"{written}); choose another opset or leave it unset"
                )
    return path


def _check_exportable(model: nn.Module) -> torch.device:
    """The device of ``model``'s weights, where the example images go; a ValueError for weights that
    :func:`export_onnx` cannot write into its float32 graph (the model's own error would tell to convert
    the images, which export_onnx makes itself)."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    if any(t.is_meta for t in tensors):
        raise ValueError(
            "the model's parameters are on the meta device (built without weights): load weights or "
            "materialise it (model.to_empty(device='cpu') and init) before export_onnx"
        )
    other = sorted({str(t.dtype) for t in tensors if t.dtype != torch.float32})
    if other:
        raise ValueError(
            f"export_onnx writes a float32 graph (float32 images in, float32 logits out), but the model's "
            f"parameters are {', '.join(other)}: export model.float()"
        )
    return tensors[0].device if tensors else torch.device("cpu")


def _check_input_size(input_size: object) -> tuple[int, int, int]:
    """``input_size`` as a ``(channels, height, width)`` tuple of positive ints, else a ValueError."""
    try:
        size = tuple(input_size)  # type: ignore[arg-type]
    except TypeError:
        size = ()
    ints = tuple(as_int(v) for v in size)  # numpy ints too, as everywhere in the package; not bools
    if len(ints) != 3 or not all(v is not None and v > 0 for v in ints):
        raise ValueError(f"input_size must be (channels, height, width), 3 positive ints; got {input_size!r}")
    return ints  # type: ignore[return-value]


def verify_onnx(model: nn.Module, path: str | Path, input_size: tuple[int, int, int],
                batch_sizes: tuple[int, ...] = (1, 3), atol: float = 1e-4) -> float:
    """Largest |onnxruntime - PyTorch| over random batches of ``batch_sizes``; raises if above ``atol``.

    ``model`` (on the CPU) runs in eval mode; its training mode is restored afterwards."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    was_training = model.training
    model.eval()
    worst = 0.0
    gen = torch.Generator().manual_seed(0)
    try:
        for b in batch_sizes:
            x = torch.randn(b, *input_size, generator=gen)
            with torch.no_grad():
                expected = model(x).float().numpy()
            got = session.run(["logits"], {"images": x.numpy()})[0]
            if got.shape != expected.shape:
                raise RuntimeError(f"ONNX output shape {got.shape} != PyTorch {expected.shape} for batch {b}")
            nan_got, nan_expected = np.isnan(got), np.isnan(expected)
            if (nan_got != nan_expected).any():  # (max() skips a NaN difference: such a graph "verified")
                raise RuntimeError(
                    f"ONNX outputs are NaN at {int((nan_got != nan_expected).sum())} places where PyTorch's "
                    f"are not (or the reverse), batch {b}"
                )
            with np.errstate(invalid="ignore"):
                diff = np.abs(got - expected)
            diff[got == expected] = 0.0  # (an inf in both: inf - inf is NaN, and max() then lost the batch)
            worst = max(worst, float(diff[~nan_got].max(initial=0.0)))
    finally:
        model.train(was_training)
    if worst > atol:
        raise RuntimeError(f"ONNX outputs differ from PyTorch's by {worst:.3g} (> {atol:g})")
    return worst


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    *,
    model: str | None = None,
    img_size: int | None = None,
    in_chans: int | None = None,
    num_classes: int | None = None,
    opset: int | None = None,
    verify: bool = True,
    model_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Load a checkpoint (see :func:`gmlp.train.vision_tools.resolve_checkpoint`) and export it to ONNX.

    Model name, image size, channels and classes come from the arguments, else the run's ``config.json``,
    else the weights. With ``verify`` (and onnxruntime installed) the outputs are compared with PyTorch's
    before the file is put in place: ``output`` is replaced only by a file that passed the check, and any
    failure (of the export, the opset, the check) leaves the file that was there.

    Raises:
        ConfigError: (a ``ValueError``: a usage error of ``gmlp export``) no model name, an unknown one, a
            text model's checkpoint (``gmlp export`` exports vision models), ``output`` a directory or
            under a file, or not writable, model arguments the model refuses, a checkpoint whose head does
            not fit ``num_classes`` (the export would carry a freshly initialised head), or an ``opset``
            the exporter cannot write.
        CheckpointError: the weights are unreadable or do not fit the model.
        RuntimeError: the check found outputs that differ from PyTorch's (nothing is written).
    """
    from .models import list_models
    from .train.recipe import ConfigError
    from .train.vision import model_input_size
    from .train.vision_tools import build_with_own_head, checkpoint_shapes, resolve_checkpoint

    if Path(output).is_dir():
        raise ConfigError(f"output {str(output)!r} is a directory; give an .onnx file name")
    # (before the export's work: the write would fail only at its end, with a traceback)
    folder = next((p for p in Path(output).absolute().parents if p.exists()), None)
    if folder is not None and not folder.is_dir():
        raise ConfigError(
            f"output {str(output)!r} cannot be written: {str(folder)!r} is a file, not a folder"
        )
    weights, run = resolve_checkpoint(checkpoint)
    run = run or {}
    name = model or run.get("model")
    if name is None and _holds_text_model(weights):  # ("pass --model NAME" would lead to a second refusal)
        raise ConfigError(
            f"{str(checkpoint)!r} holds a text model (gmlp.models.text), and gmlp export exports vision "
            f"models; export a text model in Python with torch.onnx.export(model, (input_ids, "
            f"attention_mask), dynamo=True)"
        )
    if name is None:  # a ConfigError (a ValueError): a usage error of `gmlp export`
        raise ConfigError(f"{str(checkpoint)!r} is not a training run: pass --model NAME")
    if name.startswith("timm:"):
        import timm

        if not timm.is_model(name[5:]):
            raise ConfigError(f"unknown timm model {name[5:]!r}")
    elif name not in list_models():
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())} (or timm:NAME)")
    shapes = checkpoint_shapes(weights)  # (timm models too: a compare-vit ViT run exports without flags)
    kwargs = dict(model_kwargs if model_kwargs is not None else (run.get("model_kwargs") or {}))
    explicit = {"img_size": img_size or shapes.get("img_size") or run.get("img_size"),
                "in_chans": in_chans or shapes.get("in_chans"),
                "num_classes": num_classes or shapes.get("num_classes")}
    why = "an exported model needs the checkpoint's own head (leave --num-classes out to take it)"
    try:
        net = build_with_own_head(name, weights, why,
                                  **{**kwargs, **{k: v for k, v in explicit.items() if v is not None}}).eval()
    except CheckpointError:
        raise
    except (ValueError, TypeError) as err:  # a head that does not fit, constructor arguments it refuses
        raise ConfigError(str(err)) from err
    input_size = model_input_size(net)
    if verify:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            verify = False
    # The check runs on the new file before it replaces ``output``: a file that failed it used to be left in
    # place of the previous export (an error, and a wrong model where a good one was).
    try:
        with atomic_write(output) as tmp:
            export_onnx(net, tmp, input_size, opset=opset)
            if verify:
                try:
                    verify_onnx(net, tmp, input_size)
                except RuntimeError as err:
                    raise RuntimeError(f"{err}; {str(output)!r} was not written") from err
    except (ConfigError, CheckpointError):
        raise
    except ValueError as err:  # an opset the exporter cannot write: a usage error, not a traceback
        raise ConfigError(str(err)) from err
    except OSError as err:  # a folder that cannot be written (permissions, a full disk): one line, named
        raise ConfigError(f"cannot write {str(output)!r}: {err}") from err
    return Path(output)


def _holds_text_model(weights: Path) -> bool:
    """Whether ``weights`` is a text model's (:mod:`gmlp.models.text`): its ``config.json`` says
    ``model_type: gmlp``, or its safetensors keys start with ``gmlp.``."""
    config = weights.parent / "config.json"
    try:
        if json.loads(config.read_text()).get("model_type") == "gmlp":
            return True
    except (OSError, ValueError, AttributeError):  # no config, not JSON, not a dict
        pass
    if weights.suffix != ".safetensors":
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            return any(key.startswith("gmlp.") for key in f.keys())  # noqa: SIM118 (not a dict)
    except Exception:  # unreadable: the loader says so, with its own message
        return False
