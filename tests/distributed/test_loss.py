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


def _units_worker():
    initialize_parallel()  # DP = 2
    rank = torch.distributed.get_rank()
    token_losses = torch.rand(2, 8, generator=torch.Generator().manual_seed(rank), dtype=torch.float64).requires_grad_()
    # Row 0 packs documents A (3 tokens) and B (5); row 1 holds C (6) and 2 tokens of no
    # document, so its second unit slot is padding. On rank 1, B's tokens are all masked out.
    unit_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, -1, -1]])
    mask = torch.ones(2, 8)
    mask[1, 6:] = 0
    if rank == 1:
        mask[0, 3:] = 0
    packed_fn = ReweightedLoss(ReweightSchedule("linupper", 0.5), num_domains=2, units_per_row=2)
    with HostReadRecorder() as detector:
        packed = packed_fn(mask, torch.tensor([[0, 1], [1, 0]]), token_losses, unit_ids=unit_ids)
    packed[0].backward()
    packed_grad = token_losses.grad.clone()
    token_losses.grad = None

    # The same documents, one per row, the rest of each row masked out.
    def one_row(first, row, length):
        values = token_losses[row, first : first + length]
        return torch.cat([values, values.new_zeros(8 - length)]), torch.cat(
            [mask[row, first : first + length], torch.zeros(8 - length)]
        )

    rows = [one_row(0, 0, 3), one_row(3, 0, 5), one_row(0, 1, 6)]
    separate_fn = ReweightedLoss(ReweightSchedule("linupper", 0.5), num_domains=2)
    separate = separate_fn(
        torch.stack([m for _, m in rows]), torch.tensor([0, 1, 1]), torch.stack([v for v, _ in rows])
    )
    separate[0].backward()
    destroy_parallel()
    return dict(
        host_reads=detector.calls,
        packed=packed,
        packed_grad=packed_grad,
        separate=separate,
        separate_grad=token_losses.grad,
    )


def test_units_inside_rows_weigh_like_separate_rows_and_padding_is_no_sample():
    for result in run_distributed(_units_worker, 2):
        assert result["host_reads"] == []
        packed_loss, _, packed = result["packed"]
        separate_loss, _, separate = result["separate"]
        assert torch.allclose(packed_loss, separate_loss)
        assert torch.allclose(result["packed_grad"], result["separate_grad"])
        # Slots per rank: A, B, C, padding; the padding slots get no weight.
        slots = torch.tensor([True, True, True, False] * 2)
        assert torch.equal(packed["weights"][~slots], torch.zeros(2, dtype=torch.float64))
        assert torch.allclose(packed["weights"][slots], separate["weights"])
        # Rank 1's B is invalid (1 of 6 samples); the 2 padding slots of 8 are counted apart.
        assert math.isclose(packed["invalid_fraction"].item(), 1 / 6)
        assert math.isclose(separate["invalid_fraction"].item(), 1 / 6)
        assert math.isclose(packed["padding_fraction"].item(), 2 / 8)
        for key in ("lm_loss", "weighted_loss", "ess", "domain_weight_share", "domain_sample_share"):
            assert torch.allclose(packed[key], separate[key]), key


def test_several_units_per_row_need_unit_ids():
    loss_fn = ReweightedLoss(ReweightSchedule("uniform", 1.0), units_per_row=2)
    with pytest.raises(ValueError, match="units_per_row=2 needs unit_ids"):
        loss_fn(torch.ones(1, 4), None, torch.zeros(1, 4))
