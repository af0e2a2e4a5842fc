"""The reweighted loss function on its own: no host sync, and bad samples cannot poison a step."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.host_reads import HostReadRecorder
from helpers.multiprocess import run_distributed

from megatron_patches.loss import ReweightedLoss
from megatron_patches.parallel import destroy_parallel, initialize_parallel
from megatron_patches.reweighting import ReweightSchedule

pytestmark = pytest.mark.distributed


def _loss_worker(strategies):
    initialize_parallel()  # DP = 2
    results = {strategy: _run_loss(strategy) for strategy in strategies}
    destroy_parallel()
    return results


def _run_loss(strategy):
    rank = torch.distributed.get_rank()
    g = torch.Generator().manual_seed(rank)
    token_losses = torch.rand(3, 8, generator=g).requires_grad_()
    values = token_losses.detach().clone()
    mask = torch.ones(3, 8)
    if rank == 1:
        values[0, 2] = math.nan  # a NaN token loss
        values[1, :] = math.inf  # an overflowing sample
        mask[2] = 0  # a sample with no loss token
    poisoned = token_losses + (values - token_losses.detach())  # same graph, bad values
    loss_fn = ReweightedLoss(ReweightSchedule(strategy, 0.5), num_domains=2)
    with HostReadRecorder() as detector:
        loss, num_tokens, report = loss_fn(mask, torch.tensor([0, 1, 1]), poisoned)
    loss.backward()
    sanity = HostReadRecorder()
    with sanity:
        loss.item()
    return dict(
        host_reads=detector.calls,
        detector_works=sanity.calls == ["item"],
        loss=loss.detach(),
        grad=token_losses.grad,
        report=report,
    )


def test_reweighted_loss_makes_no_host_sync_and_skips_bad_samples():
    strategies = ("uniform", "linupper")
    by_rank = run_distributed(_loss_worker, 2, strategies)
    for strategy in strategies:
        ranks = [r[strategy] for r in by_rank]
        for result in ranks:
            assert result["detector_works"]
            assert result["host_reads"] == []
            assert torch.isfinite(result["loss"])
            assert torch.isfinite(result["grad"]).all()
            report = result["report"]
            weights = report["weights"]
            # Global batch of 6: rank 1's three samples are NaN, Inf and empty.
            assert torch.equal(weights[3:], torch.zeros(3, dtype=weights.dtype))
            assert torch.allclose(weights.sum(), torch.tensor(1.0, dtype=weights.dtype))
            assert math.isclose(report["invalid_fraction"].item(), 0.5)
            statistics = {k: v for k, v in report.items() if k != "sample_losses"}  # those keep the NaN
            assert all(torch.isfinite(v).all() for v in statistics.values())
        # The weights each rank computed are bit-identical.
        assert torch.equal(ranks[0]["report"]["weights"], ranks[1]["report"]["weights"])
        # Bad samples receive no gradient.
        assert torch.count_nonzero(ranks[1]["grad"]) == 0
