"""Multi-process training helpers: process-group set-up from ``torchrun`` variables, reductions, sync check.

``torchrun --nproc_per_node=N -m gmlp train ...`` (or ``accelerate launch``) sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them and starts a
``gloo`` (CPU) or ``nccl`` (CUDA) process group. Without them everything runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistEnv", "all_reduce_sum", "assert_in_sync", "barrier", "init_distributed", "shutdown"]


@dataclass
class DistEnv:
    """Where this process stands: ``rank`` of ``world_size`` processes, its device, and whether it started
    the process group (and so must destroy it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

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


def init_distributed(device: str = "auto") -> DistEnv:
    """Read the launcher's environment and join (or start) the process group; single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistEnv(device=dev)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                device_id=dev if dev.type == "cuda" else None)
        owns = True
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev,
                   owns_group=owns)


def shutdown(env: DistEnv) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


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


def assert_in_sync(env: DistEnv, model: nn.Module, atol: float = 0.0) -> None:
    """Raise RuntimeError if the parameters differ across processes (compares per-tensor sums)."""
    if not env.distributed:
        return
    with torch.no_grad():
        sig = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(env.device)
    gathered = [torch.empty_like(sig) for _ in range(env.world_size)]
    dist.all_gather(gathered, sig)
    worst = max((g - gathered[0]).abs().max().item() for g in gathered)
    if worst > atol:
        raise RuntimeError(f"model replicas diverged across processes (parameter sums differ by {worst:g})")
