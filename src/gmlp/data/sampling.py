"""Deterministic, resumable, sharded batch order for training.

The data order of epoch ``e`` is a permutation seeded by ``(seed, e)``; optimizer step ``s`` consumes the
``batch_size`` samples at positions ``[i * batch_size, (i + 1) * batch_size)`` of its epoch's order
(``i = s mod steps_per_epoch``; the incomplete last batch is dropped). That global batch is cut into
``world_size * accum_steps`` equal micro-batches: micro-step ``m`` of process ``rank`` takes chunk
``m * world_size + rank``. Every process computes the same order from the seed alone, so no sampler state is
needed to resume, and each sample is seen exactly once per epoch across all processes (the sharding
:class:`torch.utils.data.DistributedSampler` does, but keyed to the step instead of the epoch).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["StepBatches", "epoch_order", "sample_seed", "step_seed"]

_MASK = 2**63


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of ``range(n)`` used in ``epoch`` (0-based)."""
    # modulo 2**64, the generator's seed range (it takes a negative seed modulo 2**64 too): a seed near
    # 2**64 stopped the run with an overflow at the first epoch boundary; every other order is unchanged
    return torch.randperm(n, generator=torch.Generator().manual_seed((seed + 104_729 * epoch) % 2**64))


def step_seed(seed: int, step: int) -> int:
    """The seed of every random choice made in optimizer step ``step`` (0-based)."""
    return (seed * 1_000_003 + step * 7_919 + 17) % _MASK


def sample_seed(seed: int, step: int, position: int) -> int:
    """The seed of the augmentation of the sample at ``position`` of step ``step``'s global batch."""
    mixed = step_seed(seed, step) * 6_364_136_223_846_793_005 + position * 1_442_695_040_888_963_407 + 1
    return mixed % _MASK


class StepBatches:
    """The micro-batches of steps ``[start_step, stop_step)`` for one process.

    Iterating yields, per step and per micro-step, a list of ``(sample index, sample seed)`` pairs (usable as
    a DataLoader ``batch_sampler``).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        start_step: int,
        stop_step: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        accum_steps: int = 1,
    ) -> None:
        for name, value in (("world_size", world_size), ("accum_steps", accum_steps)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size - 1}] (world_size {world_size}), got {rank}")
        if batch_size < 1 or batch_size > num_samples:
            raise ValueError(f"batch_size must be in [1, {num_samples}] (the dataset size), got {batch_size}")
        parts = world_size * accum_steps
        if batch_size % parts:
            raise ValueError(
                f"batch_size ({batch_size}, the global batch per optimizer step) must be divisible by "
                f"world_size x grad_accum_steps = {world_size} x {accum_steps} = {parts}"
            )
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.start_step, self.stop_step = start_step, stop_step
        self.rank, self.world_size, self.accum_steps = rank, world_size, accum_steps
        self.micro_batch = batch_size // parts
        self.steps_per_epoch = num_samples // batch_size
        self._cached: tuple[int, torch.Tensor] | None = None

    def order(self, epoch: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, epoch_order(self.num_samples, self.seed, epoch))
        return self._cached[1]

    def global_batch(self, step: int) -> torch.Tensor:
        """Sample indices of step ``step``'s whole global batch."""
        epoch, i = divmod(step, self.steps_per_epoch)
        return self.order(epoch)[i * self.batch_size : (i + 1) * self.batch_size]

    def positions(self, micro: int) -> slice:
        """This process's slice of the global batch in micro-step ``micro``."""
        chunk = micro * self.world_size + self.rank
        return slice(chunk * self.micro_batch, (chunk + 1) * self.micro_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.stop_step):
            batch = self.global_batch(step)
            for micro in range(self.accum_steps):
                pos = self.positions(micro)
                yield [
                    (int(idx), sample_seed(self.seed, step, p))
                    for p, idx in zip(range(pos.start, pos.stop), batch[pos].tolist(), strict=True)
                ]

    def __len__(self) -> int:
        return max(0, self.stop_step - self.start_step) * self.accum_steps
