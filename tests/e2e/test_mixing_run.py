"""End to end: `data.mixing=odm` beside `reweight.strategy=linupper` (the runs' default), on the demo corpus."""

from __future__ import annotations

import json

import pytest
from helpers.e2e import pretrain, rows

from launch.weights_log import read_weights

ODM = ("data.mixing=odm", "data.mixing_exploration=0.2")  # a uniform share that lets 8 steps move the mixture
DOMAINS = {"boilerplate", "code", "docs", "licenses", "prose"}


def _mixtures(run_dir) -> list[tuple[int, dict]]:
    return [(r["step"], r["domain_mixture"]) for r in rows(run_dir)]


@pytest.fixture(scope="module")
def odm_run(tmp_path_factory, demo_dir):
    run_dir = tmp_path_factory.mktemp("odm")
    result = pretrain(run_dir, demo_dir, *ODM, "logging.weights_every=4")
    return run_dir, result.stdout


def test_odm_with_linupper_logs_the_moving_mixture_and_both_shares(odm_run):
    run_dir, stdout = odm_run
    train = rows(run_dir)
    assert [r["step"] for r in train] == [2, 4, 6, 8]
    for row in train:
        assert (
            set(row["domain_mixture"]) == set(row["domain_sample_share"]) == set(row["domain_weight_share"]) == DOMAINS
        )
        assert sum(row["domain_mixture"].values()) == pytest.approx(1.0)
        assert min(row["domain_mixture"].values()) >= 0.2 / len(DOMAINS) - 1e-12
    assert train[0]["domain_mixture"] != train[-1]["domain_mixture"]
    assert train[-1]["weight_ess"] < 1.0  # linupper reweights the samples the mixture drew
    assert "data mixing: odm" in stdout and "| mixture boilerplate" in stdout
    state = json.loads((run_dir / "checkpoints/step_00000008/trainer_state.json").read_text())
    assert sum(state["mixing"]["positions"]) == 8 * 8  # every sample of the run, drawn once
    assert state["mixing"]["mixer"]["updates"] == 8
    assert {r["domain"] for r in read_weights(run_dir)} <= DOMAINS  # the weights log finds each sample's domain


@pytest.mark.slow
def test_odm_stopped_and_resumed_matches_the_unbroken_run_exactly(tmp_path, demo_dir, odm_run):
    """Stopped mid-interval of the log (step 3), so the bandit, the positions and the open
    statistics all come from the checkpoint."""
    unbroken, _ = odm_run
    pretrain(tmp_path, demo_dir, *ODM, "logging.weights_every=4", "train.exit_after=3")
    result = pretrain(tmp_path, demo_dir, *ODM, "logging.weights_every=4")
    assert "step_00000003" in result.stdout
    keys = ("step", "loss", "weighted_loss", "lr", "domain_mixture", "domain_sample_share", "domain_weight_share")
    assert [[r[k] for k in keys] for r in rows(tmp_path)] == [[r[k] for k in keys] for r in rows(unbroken)]
    assert [r["valid_loss"] for r in rows(tmp_path, "valid")] == [r["valid_loss"] for r in rows(unbroken, "valid")]
    assert read_weights(tmp_path) == read_weights(unbroken)


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout, nproc",
    [((), 1), (("parallel.pp=2",), 2), (("parallel.tp=2",), 2)],
    ids=["one-process", "pp2", "tp2"],
)
def test_odm_under_another_layout_follows_the_data_parallel_run(tmp_path, demo_dir, odm_run, layout, nproc):
    """One DP rank taking the DP run's global micro-batch (2 x 2 samples) at once: the same
    draws, and the mixture and curve to floating-point order (TP and PP change the order of sums)."""
    unbroken, _ = odm_run
    pretrain(tmp_path, demo_dir, *ODM, "logging.weights_every=4", "train.micro_batch_size=4", *layout, nproc=nproc)
    for (step, mixture), (expected_step, expected) in zip(_mixtures(tmp_path), _mixtures(unbroken), strict=True):
        assert step == expected_step and mixture == pytest.approx(expected, rel=1e-6)
    for row, expected in zip(rows(tmp_path), rows(unbroken), strict=True):
        assert row["domain_sample_share"] == expected["domain_sample_share"]
        assert row["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    # The same samples: the weights log names the same documents.
    documents = [(r["domain"], r["documents"]) for r in read_weights(tmp_path)]
    assert documents == [(r["domain"], r["documents"]) for r in read_weights(unbroken)]
