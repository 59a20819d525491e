"""The optimizer choice shared by the training commands and the benchmarks."""

from __future__ import annotations

import torch

__all__ = ["fused_adamw"]


def fused_adamw(device: torch.device | str, sharded: bool = False) -> bool:
    """Whether AdamW should run fused (one kernel for the whole update) on ``device``.

    On CUDA, always. On the CPU too (torch >= 2.4 has a fused CPU kernel): there it ran 2.4-2.8x
    faster than the default update (a per-parameter loop on the CPU; benchmarks/RESULTS.md, fifth
    session). ``sharded`` (FSDP's DTensor parameters) keeps the default on the CPU.
    """
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and not sharded)
