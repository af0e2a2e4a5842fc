"""The weights of a batch split over data-parallel ranks (real gloo groups of 2 and 4) are those
of the whole batch, bit for bit, for every strategy, with invalid samples on one rank only.
tests/unit/test_reweighting.py holds the method's specification."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from helpers.multiprocess import run_distributed

from megatron_patches.reweighting import (
    STRATEGIES,
    compute_sample_weights,
)

# Every registered strategy: a new one is held to every property below, and to the references
# (which fail, naming it, until it has one).
NAMES = list(STRATEGIES)


def split_cases() -> list[dict]:
    """Batches of 16 samples; the invalid entries sit in the first 4, i.e. on rank 0."""
    g = torch.Generator().manual_seed(1234)
    losses = 1.0 + 8.0 * torch.rand(16, generator=g, dtype=torch.float64)
    broken = losses.clone()
    broken[1], broken[2] = math.nan, math.inf
    masked = torch.ones(16, dtype=torch.bool)
    masked[3] = False
    last_rank_invalid = losses.clone()
    last_rank_invalid[12:] = math.nan
    counts = torch.randint(1, 512, (16,), generator=g)
    cases = []
    for strategy in NAMES:
        for r in (0.4, 1.0):
            cases.append(dict(losses=losses, valid=None, token_counts=None, strategy=strategy, temperature=r))
            cases.append(dict(losses=broken, valid=masked, token_counts=None, strategy=strategy, temperature=r))
        cases.append(dict(losses=broken, valid=masked, token_counts=counts, strategy=strategy, temperature=0.4))
        cases.append(dict(losses=last_rank_invalid, valid=None, token_counts=None, strategy=strategy, temperature=0.4))
        cases.append(dict(losses=broken.float(), valid=masked, token_counts=None, strategy=strategy, temperature=0.4))
    return cases


def weights_for_case(case: dict, rank: int, world_size: int, group) -> torch.Tensor:
    n = case["losses"].shape[0] // world_size
    part = slice(rank * n, (rank + 1) * n)
    return compute_sample_weights(
        case["losses"][part],
        strategy=case["strategy"],
        temperature=case["temperature"],
        valid=None if case["valid"] is None else case["valid"][part],
        token_counts=None if case["token_counts"] is None else case["token_counts"][part],
        group=group,
    )


def split_worker(cases: list[dict]) -> list[torch.Tensor]:
    """One data-parallel rank: its slice of each batch, weights over the whole group."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        return [weights_for_case(case, rank, world_size, dist.group.WORLD) for case in cases]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 4])
def test_split_over_ranks_equals_whole_batch_bit_for_bit(world_size):
    cases = split_cases()
    per_rank = run_distributed(split_worker, world_size, cases)
    for i, case in enumerate(cases):
        whole = weights_for_case(case, 0, 1, None)
        split = torch.cat([per_rank[rank][i] for rank in range(world_size)])
        assert split.dtype == case["losses"].dtype
        assert torch.equal(split, whole), (i, case["strategy"], case["temperature"])
