"""The step-keyed data order (:mod:`gmlp.data.sampling`): a permutation per epoch, sharded per step."""

from __future__ import annotations

import pytest
import torch

from gmlp.data.sampling import StepBatches, epoch_order


@pytest.mark.parametrize("seed", [0, 12345, -7, 2**63, 2**64 - 1])
def test_epoch_order_is_a_seeded_permutation_for_every_valid_seed(seed: int) -> None:
    """torch's generators take seeds in [-2**63, 2**64); ``seed + 104729 * epoch`` left that range for a
    seed near 2**64, and the run stopped with 'Overflow when unpacking long long' at the first epoch's end.
    Orders of seeds that worked are unchanged (torch reads a negative seed modulo 2**64 too)."""
    orders = [epoch_order(50, seed, epoch) for epoch in range(3)]
    for epoch, order in enumerate(orders):
        assert sorted(order.tolist()) == list(range(50))
        assert torch.equal(order, epoch_order(50, seed, epoch))  # deterministic
        old = seed + 104_729 * epoch
        if -(2**63) <= old < 2**64:
            assert torch.equal(order, torch.randperm(50, generator=torch.Generator().manual_seed(old)))
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])


@pytest.mark.parametrize(("n", "batch", "world", "accum"), [(23, 4, 2, 1), (40, 12, 3, 2), (9, 9, 1, 3)])
def test_each_epoch_shares_out_distinct_samples_and_drops_only_the_tail(
    n: int, batch: int, world: int, accum: int
) -> None:
    """Over all processes, every step's micro-batches make up its global batch; an epoch's steps take
    distinct samples, the first ``steps x batch`` of that epoch's permutation (the rest is dropped)."""
    steps = n // batch
    plans = [StepBatches(n, batch, 5, 0, 2 * steps, rank=r, world_size=world, accum_steps=accum)
             for r in range(world)]
    per_rank = [list(p) for p in plans]
    assert all(len(micro) == len(p) == 2 * steps * accum for micro, p in zip(per_rank, plans, strict=True))
    for epoch in range(2):
        taken = [i for r in range(world)
                 for mb in per_rank[r][epoch * steps * accum:(epoch + 1) * steps * accum] for i, _ in mb]
        assert len(taken) == len(set(taken)) == steps * batch
        assert sorted(taken) == sorted(epoch_order(n, 5, epoch)[: steps * batch].tolist())
