"""Input validation shared by the layers: clear errors instead of shape errors from deep inside."""

from __future__ import annotations

import math
import numbers
import operator
from typing import NoReturn

import torch
from torch import nn

from ._inplace import plain_call

__all__ = [
    "NotScriptable",
    "as_int",
    "autocast_enabled",
    "capturing",
    "check_devices",
    "check_input_dtype",
    "check_flag",
    "check_parameter_devices",
    "check_int",
    "check_mask",
    "check_number",
    "check_tokens",
    "host_checks_enabled",
]


class NotScriptable:
    """A module mixin: ``torch.jit.script`` of the module (or of a model holding it; TorchScript calls
    ``__prepare_scriptable__`` on every submodule first) is refused at once with what to use instead. gmlp's
    layers check their inputs in Python that TorchScript cannot compile, and its own error named a ``try``
    deep inside a layer."""

    def __prepare_scriptable__(self) -> NoReturn:
        """Raises ``NotImplementedError``, naming ``torch.jit.trace``, ``torch.export`` and ONNX export."""
        raise NotImplementedError(
            f"torch.jit.script cannot compile {type(self).__name__} (gmlp's layers use Python that "
            f"TorchScript does not support); use torch.jit.trace(model, example_inputs), "
            f"torch.export.export or gmlp.export.export_onnx, or torch.compile for speed"
        )


def capturing(t: torch.Tensor) -> bool:
    """True while a CUDA graph is being captured on the current stream of ``t``'s device (CUDA only; never
    while torch.compile traces, which has its own CUDA graphs and must not see this host query)."""
    return not torch.compiler.is_compiling() and t.is_cuda and torch.cuda.is_current_stream_capturing()


def host_checks_enabled(t: torch.Tensor) -> bool:
    """Whether a check that reads tensor values back to the host may run on ``t``: not while torch.compile
    traces (it would break the graph), nor while a CUDA graph is captured (a host sync aborts the capture),
    nor while ``torch.jit.trace`` (or ``torch.onnx.export(dynamo=False)``) records (the trace would keep the
    branch its example took: a trace made with an unpadded mask ignored padding)."""
    return not torch.compiler.is_compiling() and not torch.jit.is_tracing() and not capturing(t)


def autocast_enabled(t: torch.Tensor) -> bool:
    """Whether autocast is on for ``t``'s device type (False for a device autocast does not know, such as
    ``meta``, where ``torch.is_autocast_enabled`` raises)."""
    try:
        return torch.is_autocast_enabled(t.device.type)
    except RuntimeError:
        return False


def as_int(value: object) -> int | None:
    """``value`` as a Python int if it is an integer other than a bool (numpy's included), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        return None


def check_int(value: object, name: str, minimum: int = 1) -> int:
    """``value`` as a Python int if it is an integer (numpy's taken, not a bool) of at least ``minimum``,
    else a ValueError naming ``name``."""
    index = as_int(value)
    if index is None or index < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return index


def check_number(
    value: object, name: str, low: float = 0.0, high: float = math.inf, low_open: bool = False,
    high_open: bool = True,
) -> float:
    """``value`` if it is a real number (not a bool) in the interval from ``low`` to ``high`` (each end open
    or closed as given), else a ValueError naming ``name`` and the interval."""
    # numbers.Real: numpy's floats and ints too
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def check_flag(value: object, name: str) -> bool:
    """``value`` if it is a bool, else a TypeError naming ``name`` (a string such as ``"no"`` would be
    truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_tokens(x: torch.Tensor, dim: int, max_len: int | None, name: str = "x") -> None:
    """Check a token-major activation ``(seq, batch, dim)``.

    Raises:
        TypeError: if ``x`` is not a floating-point tensor (integer activations would, for one, cast the
            near-zero token-mixing W to zeros).
        ValueError: if ``x`` is not 3-D, its channel count is not ``dim`` or its length exceeds ``max_len``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 3:
        raise ValueError(
            f"{name} must have shape (seq_len, batch, {dim}) (token-major), got shape {tuple(x.shape)}"
        )
    if x.shape[-1] != dim:
        raise ValueError(f"{name} must have {dim} channels in its last dimension, got shape {tuple(x.shape)}")
    if max_len is not None and x.shape[0] > max_len:
        raise ValueError(
            f"{name} has sequence length {x.shape[0]}, longer than the configured seq_len={max_len}; "
            f"build the layer with a larger seq_len or truncate the input"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name} has sequence length 0; at least one token is needed")


def check_mask(
    mask: torch.Tensor | None, batch: int, seq_len: int, name: str = "mask"
) -> torch.Tensor | None:
    """Validate a per-sample padding mask and return it as a bool tensor of shape ``(batch, seq_len)``.

    ``True`` (or 1) marks a real token, ``False`` (or 0) a padding token, as in Hugging Face's
    ``attention_mask``. Integer and bool tensors are accepted; floats are refused because a float mask is
    ambiguous (additive bias or 0/1 flags).
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape ({batch}, {seq_len}), got {type(mask).__name__}"
        )
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(
            f"{name} must be a bool or integer tensor (1/True = real token, 0/False = padding), "
            f"got dtype {mask.dtype}"
        )
    if tuple(mask.shape) != (batch, seq_len):
        raise ValueError(
            f"{name} must have shape (batch, seq_len) = ({batch}, {seq_len}), got {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        mask = mask != 0
    return mask


def check_devices(
    x: torch.Tensor, name: str, param: object, err: Exception | None, module: str, **others: object
) -> None:
    """For an error path (no per-call cost), or before an op that torch would let through: a ValueError
    naming the argument where ``err``, torch's error (or None), came from a tensor on another device, which
    torch's message does not name: one of the tensors
    ``others`` (by argument name: ``mask``, ``gate_bias``; None or a non-tensor is skipped) on another
    device than ``x`` (called ``name``), or ``x`` on another device than the ``module``'s parameter
    ``param``. Returns otherwise."""
    for other, value in others.items():
        if isinstance(value, torch.Tensor) and value.device != x.device:
            raise ValueError(
                f"{other} is on {value.device} but {name} is on {x.device}: move it "
                f"({other}.to({name}.device))"
            ) from err
    if isinstance(param, torch.Tensor) and param.device != x.device:
        if param.is_meta:  # (.to() cannot give a meta tensor values)
            raise ValueError(
                f"{name} is on {x.device} but the {module}'s parameters are on meta, which holds no values: "
                f"load them (a checkpoint) or materialise and initialise them (to_empty, then init_weights)"
            ) from err
        raise ValueError(
            f"{name} is on {x.device} but the {module}'s parameters are on {param.device}: move the input "
            f"({name}.to({str(param.device)!r})) or the {module} (.to({str(x.device)!r}))"
        ) from err


def check_parameter_devices(
    x: torch.Tensor, name: str, module: nn.Module, err: Exception | None, owner: str
) -> None:
    """For an error path: a ValueError naming the parameter of ``module`` (by its dotted name) that is on
    another device than ``x``, where torch's error ``err`` (``"Tensor on device meta is not on the expected
    device cpu!"``) names none; for a parameter on ``meta`` (a model built on the meta device whose
    checkpoint did not fill it) it says so. Submodules that are not called plainly (a hook, e.g.
    accelerate's offloading, or an instance ``forward``) place their own parameters at call time and are
    skipped with everything below them. Returns otherwise."""
    stack = [("", module)]
    while stack:
        prefix, sub = stack.pop()
        if not plain_call(sub, type(sub)):
            continue
        for pname, param in sub.named_parameters(prefix=prefix.rstrip("."), recurse=False):
            if param.device != x.device:
                empty = " (a parameter on meta holds no values: load or initialise it)" * param.is_meta
                raise ValueError(
                    f"{name} is on {x.device} but the {owner}'s parameter {pname} is on {param.device}"
                    f"{empty}: put the input and all the {owner}'s parameters on one device"
                ) from err
        stack.extend((f"{prefix}{child}.", m) for child, m in reversed(list(sub.named_children())))


def check_input_dtype(
    x: torch.Tensor, weight: object, err: Exception, plain: bool, *, name: str = "x", owner: str = "module"
) -> None:
    """For an error path: a TypeError naming the input ``name`` (and ``owner``, whose parameters it met) where
    torch's error ``err`` came from ``x``'s dtype differing from ``weight``'s outside autocast (torch names
    neither). Only for a ``plain`` (unwrapped) first layer: a wrapped one decides its own dtypes; meta inputs
    are left to torch (shape inference takes the pair). Returns otherwise."""
    if (
        not isinstance(weight, torch.Tensor) or x.dtype == weight.dtype or x.is_meta or autocast_enabled(x)
        or not plain
    ):  # fmt: skip
        return
    verb = "have" if name.endswith("s") else "has"
    raise TypeError(
        f"{name} {verb} dtype {x.dtype} but the {owner}'s parameters are {weight.dtype}: convert the "
        f"{'input' if name == 'x' else name} (x.to({weight.dtype})) or the {owner} (.to({x.dtype})), or run "
        f"under torch.autocast"
    ) from err
