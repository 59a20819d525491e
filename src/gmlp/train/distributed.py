"""Multi-process training helpers: process-group set-up from ``torchrun`` variables, reductions, sync check.

``torchrun --nproc_per_node=N -m gmlp train ...`` (or ``accelerate launch``) sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them and starts a
``gloo`` (CPU) or ``nccl`` (CUDA) process group. Without them everything runs in one process.

Two ways to spread a model over the processes (``gmlp train --strategy``): ``ddp`` (every process holds the
whole model, gradients are all-reduced; the caller wraps the model in ``DistributedDataParallel``) and
``fsdp`` (:func:`shard_model`: FSDP2 ``fully_shard``, every process holds 1/N of each parameter, gradient
and optimizer state). With FSDP, :func:`full_state_dicts` gathers the whole (unsharded) model and optimizer
state on process 0 for checkpoints, and :func:`load_full_optimizer_state` shards a full optimizer state back.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import run_lock
from .recipe import ConfigError

__all__ = [
    "STRATEGIES",
    "AccelerateSettings",
    "DistEnv",
    "accelerate_settings",
    "all_reduce_max",
    "all_reduce_sum",
    "assert_in_sync",
    "barrier",
    "env_int",
    "fsdp_units",
    "full_model_state_dict",
    "full_state_dicts",
    "holding_output",
    "init_distributed",
    "launcher_ranks",
    "load_full_optimizer_state",
    "shard_model",
    "shutdown",
]

STRATEGIES = ("ddp", "fsdp")


@dataclass
class DistEnv:
    """Where this process stands: ``rank`` of ``world_size`` processes, its device, whether it started
    the process group (and so must destroy it), and the caller's current CUDA device (``prior_cuda_device``,
    which :func:`shutdown` makes current again; None where :func:`init_distributed` did not change it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False
    prior_cuda_device: int | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for, but CUDA is not available")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def env_int(name: str, default: int, least: int) -> int:
    """The launcher's integer variable ``name`` (``default`` when unset or blank), at least ``least``.

    Raises:
        ConfigError: (a ``ValueError``) the value is not an integer >= ``least`` (the message names the
            variable).
    """
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    value = int(raw) if re.fullmatch(r"\s*[+-]?[0-9]+\s*", raw) else None
    if value is None or value < least:
        raise ConfigError(f"environment variable {name} must be an integer >= {least}, got {raw!r}")
    return value


def _env_set(name: str) -> bool:
    return bool(os.environ.get(name, "").strip())


def launcher_ranks(*, need_port: bool = True) -> tuple[int, int, int]:
    """``(world_size, rank, local_rank)`` from the variables ``torchrun`` / ``accelerate launch`` set, checked
    for what a process group cannot start with, before it is joined (a process that joined with them waited
    for the others for good, or failed deep inside ``torch.distributed``).

    ``need_port``: ``MASTER_PORT`` is required with ``MASTER_ADDR`` (``torch.distributed``'s ``env://``;
    accelerate defaults it to 29500).

    Raises:
        ConfigError: (a ``ValueError``) ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` or ``LOCAL_WORLD_SIZE`` is
            not an integer; ``RANK`` is missing (with ``WORLD_SIZE`` > 1) or not below ``WORLD_SIZE``;
            ``LOCAL_RANK`` is not below ``LOCAL_WORLD_SIZE``, or that is above ``WORLD_SIZE``;
            ``MASTER_ADDR`` (or ``MASTER_PORT``) is missing with ``WORLD_SIZE`` > 1.
    """
    world = env_int("WORLD_SIZE", 1, least=1)
    rank = env_int("RANK", 0, least=0)
    local_rank = env_int("LOCAL_RANK", 0, least=0)
    local_world = env_int("LOCAL_WORLD_SIZE", 0, least=1)  # (0: not set)
    if world <= 1:
        return 1, 0, local_rank
    if not _env_set("RANK"):  # every process would take rank 0
        raise ConfigError(f"environment variable WORLD_SIZE is {world}, but RANK is not set (torchrun sets "
                          "both)")
    if rank >= world:
        raise ConfigError(f"environment variable RANK must be below WORLD_SIZE ({world}), got {rank}")
    if local_world and local_world > world:
        raise ConfigError(f"environment variable LOCAL_WORLD_SIZE must be at most WORLD_SIZE ({world}), got "
                          f"{local_world}")
    if local_world and local_rank >= local_world:
        raise ConfigError(f"environment variable LOCAL_RANK must be below LOCAL_WORLD_SIZE ({local_world}), "
                          f"got {local_rank}")
    # (a group the caller started already, with a tcp:// or file:// init_method, needs no address)
    names = () if dist.is_available() and dist.is_initialized() else ("MASTER_ADDR", "MASTER_PORT")
    for name in names if need_port else names[:1]:
        if not _env_set(name):
            raise ConfigError(
                f"environment variable WORLD_SIZE is {world}, but {name} is not set: the processes cannot "
                f"find process 0 (torchrun and accelerate launch set it)"
            )
    return world, rank, local_rank


# --- accelerate launch's settings --------------------------------------------------------------------------

_TRUE = ("1", "true", "yes", "y", "t", "on")
_FALSE = ("0", "false", "no", "n", "f", "off", "")
_PRECISIONS = ("no", "fp16", "bf16", "fp8")
#: the variables of accelerate's engines that gmlp does not use: (variable, accelerate launch's flag)
_UNSUPPORTED_ENGINES = (
    ("ACCELERATE_USE_FSDP", "--use_fsdp"),
    ("ACCELERATE_USE_DEEPSPEED", "--use_deepspeed"),
    ("ACCELERATE_USE_MEGATRON_LM", "--use_megatron_lm"),
)


def _env_flag(name: str) -> bool:
    raw = os.environ.get(name, "")
    if raw.strip().lower() in _TRUE:
        return True
    if raw.strip().lower() in _FALSE:
        return False
    raise ConfigError(f"environment variable {name} must be true or false, got {raw!r}")


@dataclass(frozen=True)
class AccelerateSettings:
    """What ``accelerate launch`` (its flags or its config file) asked for, through the ``ACCELERATE_*``
    variables it sets. ``None``: not set. ``accelerate launch`` always sets ``mixed_precision`` (``"no"``
    unless told otherwise), ``dynamo_backend`` (``"NO"``), ``dynamo_mode`` (``"default"``) and ``use_cpu``."""

    mixed_precision: str | None = None  # no, fp16, bf16 or fp8
    dynamo_backend: str | None = None  # upper case (INDUCTOR, ...); None also for NO
    dynamo_mode: str | None = None
    dynamo_options: tuple[str, ...] = ()  # the ACCELERATE_DYNAMO_USE_* variables set to true
    use_cpu: bool = False
    grad_accum: int | None = None
    engines: tuple[tuple[str, str], ...] = ()  # (variable, launch flag) of FSDP / DeepSpeed / Megatron-LM

    def precision_text(self) -> str:
        return f"ACCELERATE_MIXED_PRECISION={self.mixed_precision}"

    def dynamo_text(self) -> str:
        return f"ACCELERATE_DYNAMO_BACKEND={(self.dynamo_backend or 'no').lower()}"


def accelerate_settings() -> AccelerateSettings:
    """The ``ACCELERATE_*`` variables that change how a model trains, read as accelerate reads them.

    Raises:
        ConfigError: one of them has a value accelerate cannot read (naming it).
    """
    raw = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    if raw and raw not in _PRECISIONS:
        raise ConfigError(f"environment variable ACCELERATE_MIXED_PRECISION must be one of "
                          f"{', '.join(_PRECISIONS)}, got {os.environ['ACCELERATE_MIXED_PRECISION']!r}")
    backend = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "").strip().upper()
    mode = os.environ.get("ACCELERATE_DYNAMO_MODE", "").strip()
    options: tuple[str, ...] = ()
    if backend not in ("", "NO"):
        names = [f"ACCELERATE_DYNAMO_USE_{n}" for n in ("FULLGRAPH", "DYNAMIC", "REGIONAL_COMPILATION")]
        options = tuple(name for name in names if _env_flag(name))
    accum = env_int("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", 0, least=1)
    return AccelerateSettings(
        mixed_precision=raw or None,
        dynamo_backend=None if backend in ("", "NO") else backend,
        dynamo_mode=mode or None,
        dynamo_options=options,
        use_cpu=_env_flag("ACCELERATE_USE_CPU"),
        grad_accum=accum or None,
        engines=tuple((name, flag) for name, flag in _UNSUPPORTED_ENGINES if _env_flag(name)),
    )


def _refuse_engines(settings: AccelerateSettings, command: str, instead: str) -> None:
    if settings.engines:
        name, flag = settings.engines[0]
        raise ConfigError(
            f"environment variable {name} is {os.environ[name]!r} (accelerate launch {flag}, or its config "
            f"file): {command} cannot train through that engine{instead}; launch without it"
        )


def _warn_unread_accelerate_settings(
    settings: AccelerateSettings, device: torch.device, flags: Mapping[str, Any]
) -> None:
    """``gmlp train`` runs its own loop, not accelerate's: what ``accelerate launch`` was told that it does
    not read, named with the ``gmlp train`` flag that sets it (a warning: the flags decide), unless the run
    does the same anyway: on its ``device`` (the one picked, not ``auto``), with its ``flags``
    (``precision``, ``compile``, ``grad_accum_steps``). ``--precision auto`` is bf16 on a CUDA device that
    has it (the warning that ``ACCELERATE_MIXED_PRECISION=bf16`` was ignored was false there)."""
    unread = []
    precision = flags.get("precision")
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        precision = "bf16"
    if settings.mixed_precision not in (None, "no", precision):
        unread.append((settings.precision_text(), "--precision"))
    compiled = settings.dynamo_backend == "INDUCTOR" and flags.get("compile")
    if settings.dynamo_backend is not None and not compiled:
        unread.append((settings.dynamo_text(), "--compile"))
    if settings.use_cpu and device.type != "cpu":
        unread.append(("ACCELERATE_USE_CPU=true", "--device cpu"))
    if settings.grad_accum is not None and settings.grad_accum != flags.get("grad_accum_steps"):
        unread.append((f"ACCELERATE_GRADIENT_ACCUMULATION_STEPS={settings.grad_accum}", "--grad-accum-steps"))
    for text, flag in unread:
        print(f"warning: gmlp train does not read accelerate launch's settings: {text} is ignored; {flag} "
              f"sets it", file=sys.stderr, flush=True)


def init_distributed(device: str = "auto", flags: Mapping[str, Any] | None = None) -> DistEnv:
    """Read the launcher's environment and join (or start) the process group; single process otherwise.

    ``accelerate launch``'s settings (``ACCELERATE_*``) are not read: one that asks for something (mixed
    precision, compilation, the CPU, accumulation) that the run's own ``device`` and ``flags``
    (``precision``, ``compile``, ``grad_accum_steps``: the ``gmlp train`` settings) do not is named in a
    warning on process 0, with the ``gmlp train`` flag that sets it; FSDP, DeepSpeed or Megatron-LM through
    accelerate is refused.

    Raises:
        ConfigError: (a ``ValueError``) a launcher variable :func:`launcher_ranks` refuses; an
            ``ACCELERATE_*`` variable that accelerate cannot read, or that asks for FSDP, DeepSpeed or
            Megatron-LM.
    """
    world, rank, local_rank = launcher_ranks()
    settings = accelerate_settings()
    _refuse_engines(settings, "gmlp train", " (--strategy fsdp shards the model with FSDP2)")
    dev = _pick_device(device, local_rank)
    if rank == 0:
        _warn_unread_accelerate_settings(settings, dev, flags or {})
    prior = None
    if dev.type == "cuda":
        prior = torch.cuda.current_device()
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistEnv(device=dev, prior_cuda_device=prior if prior != dev.index else None)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                device_id=dev if dev.type == "cuda" else None)
        owns = True
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev,
                   owns_group=owns, prior_cuda_device=prior if prior != dev.index else None)


def shutdown(env: DistEnv) -> None:
    """Destroy the process group if :func:`init_distributed` created it, and make the CUDA device that was
    current before :func:`init_distributed` current again (a run called from the user's own process leaves
    ``torch.cuda.current_device()`` as it found it).

    Objects that still hold the group (a DistributedDataParallel reducer or FSDP state kept alive by a
    reference cycle) are collected first: otherwise they die during interpreter shutdown, and a gloo worker
    thread destroyed then aborts the process ("terminate called without an active exception", SIGABRT)
    after the run itself has finished.
    """
    if env.owns_group and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
    if env.prior_cuda_device is not None:
        torch.cuda.set_device(env.prior_cuda_device)


@contextlib.contextmanager
def holding_output(
    output: str | Path,
    is_main: bool,
    any_refused: Callable[[bool], bool] | None,
    *,
    destroy_group: bool = False,
) -> Iterator[None]:
    """Process 0 (``is_main``) holds the run folder ``output`` (:func:`gmlp.train.checkpoint.run_lock`) while
    the block runs; when it cannot (the folder is in use, a file, or not writable), every process raises, not
    process 0 alone while the others wait for it in a collective.

    ``any_refused(refused)``: whether any process was refused, given whether this one was (a collective that
    every process calls; ``None`` in a single process, where nothing is reduced). Process 0 raises its own
    error (a ConfigError or OSError naming the folder), the others a ConfigError saying that process 0 could
    not take ``output``. ``destroy_group``: when a process was refused, destroy the default process group on
    every process before raising (its errors suppressed); otherwise the caller does (torch 2.11's gloo
    aborted the process at exit, "terminate called without an active exception", with the group still up).

    Raises:
        ConfigError: ``output`` is held by another run, or is (or is under) a file (process 0); process 0
            could not take ``output`` (the other processes).
        OSError: ``output`` cannot be written, naming it (process 0).
    """
    refused: Exception | None = None
    with contextlib.ExitStack() as stack:
        if is_main:
            try:
                stack.enter_context(run_lock(output))
            except (ConfigError, OSError) as err:
                refused = err
        if any_refused is not None and any_refused(refused is not None):
            if destroy_group:  # every process stops here: the group goes first
                with contextlib.suppress(Exception):
                    dist.destroy_process_group()
            if refused is None:
                raise ConfigError(f"process 0 could not take the output folder {output!r} "
                                  f"(its error says why)")
        if refused is not None:
            raise refused
        yield


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(env: DistEnv, values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over all processes (identity in one process)."""
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(env: DistEnv, value: float) -> float:
    """The largest ``value`` over all processes (identity in one process)."""
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def assert_in_sync(env: DistEnv, model: nn.Module, atol: float = 0.0) -> None:
    """Raise RuntimeError if the parameters differ across processes (compares per-tensor sums).

    A sum that is NaN (or infinite) on some processes and not on others is a difference: a NaN compared
    with ``>`` is never larger, so it must not reach the ``atol`` test as NaN."""
    if not env.distributed:
        return
    with torch.no_grad():
        sig = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(env.device)
    gathered = [torch.empty_like(sig) for _ in range(env.world_size)]
    dist.all_gather(gathered, sig)
    ref = gathered[0]
    worst = 0.0
    for g in gathered:
        same = (g == ref) | (g.isnan() & ref.isnan())  # NaN == NaN and inf == inf count as agreeing
        diff = torch.where(same, 0.0, (g - ref).abs().nan_to_num(nan=float("inf")))
        worst = max(worst, diff.max().item())
    if worst > atol:
        raise RuntimeError(f"model replicas diverged across processes (parameter sums differ by {worst:g})")


# --- FSDP (FSDP2, ``torch.distributed.fsdp.fully_shard``) -------------------------------------------------


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The sub-modules sharded (and all-gathered) one at a time: the transformer blocks.

    gMLP blocks (``gmlp.nn.GMLPBlock``) wherever they are; else the entries of a ``model.blocks``
    ``ModuleList``/``Sequential`` (timm's convention: ViT, Mixer, ...); else none (the root module alone is
    sharded, all its parameters gathered at once).
    """
    from ..nn import GMLPBlock

    units = [m for m in model.modules() if isinstance(m, GMLPBlock) and m is not model]
    if units:
        return units
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        return [b for b in blocks if any(True for _ in b.parameters())]
    return []


def shard_model(model: nn.Module, env: DistEnv) -> nn.Module:
    """Shard ``model`` in place over all processes with FSDP2: each of :func:`fsdp_units`, then the root.

    Every process must hold the same full weights on entry; process 0's are broadcast first to make sure
    (as DistributedDataParallel does). Parameters become ``DTensor`` shards (dim 0 split over processes),
    all-gathered around each unit's forward and backward and resharded after them
    (``reshard_after_forward=True``); gradients are reduce-scattered (averaged). Create the optimizer after
    this call: it must see the sharded parameters.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    for unit in fsdp_units(model):
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model


def _full_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict of an FSDP model on process 0, on the CPU; ``{}`` on the others.

    A collective: every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """``(model, optimizer)`` full state dicts of an FSDP model on process 0 (``({}, {})`` elsewhere).

    The optimizer state is keyed by parameter name (``torch.distributed.checkpoint`` format), not by index as
    ``optimizer.state_dict()`` is. A collective: every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model_state = full_model_state_dict(model)
    return model_state, get_optimizer_state_dict(model, optimizer, options=_full_options())


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a :func:`full_state_dicts` optimizer state into the optimizer of a sharded model.

    Every process passes the full state (each reads the checkpoint) and keeps its own shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
