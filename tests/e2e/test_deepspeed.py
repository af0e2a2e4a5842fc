"""`torchrun -m launch.pretrain --config configs/demo_cpu_deepspeed.yaml` logs the Megatron engine's
rows with the same losses at ZeRO-1, 2 and 3, and stops and resumes exactly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from helpers.e2e import pretrain, rows

STAGES = (2, 3)


DEEPSPEED = "configs/demo_cpu_deepspeed.yaml"


def small(cache_dir: Path) -> tuple[str, ...]:
    """Six steps, Megatron's sample indices shared by every run."""
    return (f"data.cache_dir={cache_dir}", "train.steps=6")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")  # Megatron's sample indices, built once for all runs


@pytest.fixture(scope="module", params=[2, pytest.param(3, marks=pytest.mark.slow)], ids=lambda stage: f"zero{stage}")
def deepspeed_run(request, tmp_path_factory, demo_dir, cache_dir):
    """(ZeRO stage, run directory) of an uninterrupted run."""
    run_dir = tmp_path_factory.mktemp(f"zero{request.param}")
    pretrain(run_dir, demo_dir, *small(cache_dir), f"deepspeed.zero_stage={request.param}", config=DEEPSPEED)
    return request.param, run_dir


@pytest.fixture(scope="module")
def megatron_run(tmp_path_factory, demo_dir, cache_dir):
    run_dir = tmp_path_factory.mktemp("megatron")
    pretrain(run_dir, demo_dir, *small(cache_dir))
    return run_dir


def test_deepspeed_run_logs_the_megatron_rows_and_trains_alike(deepspeed_run, megatron_run):
    _, run_dir = deepspeed_run
    for kind, loss in (("train", "loss"), ("valid", "valid_loss")):
        ours, theirs = rows(run_dir, kind), rows(megatron_run, kind)
        assert [r["step"] for r in ours] == [r["step"] for r in theirs] == ([2, 4, 6] if kind == "train" else [4, 6])
        for row, expected in zip(ours, theirs):
            assert set(row) == set(expected)
            assert math.isfinite(row[loss])
            assert row[loss] == pytest.approx(expected[loss], rel=1e-5)  # the same steps, up to reduction order
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000006"]


@pytest.mark.slow
def test_stop_and_resume_continues_exactly(tmp_path, demo_dir, cache_dir, deepspeed_run):
    stage, unbroken = deepspeed_run
    pretrain(
        tmp_path, demo_dir, *small(cache_dir), f"deepspeed.zero_stage={stage}", "train.exit_after=4", config=DEEPSPEED
    )
    assert [r["step"] for r in rows(tmp_path, "train")] == [2, 4]
    result = pretrain(tmp_path, demo_dir, *small(cache_dir), f"deepspeed.zero_stage={stage}", config=DEEPSPEED)
    assert "resuming from" in result.stdout and "step_00000004" in result.stdout
    for kind, keys in (
        ("train", ("step", "loss", "weighted_loss", "lr", "grad_norm")),
        ("valid", ("step", "valid_loss")),
    ):
        expected = [[r[k] for k in keys] for r in rows(unbroken, kind)]
        assert [[r[k] for k in keys] for r in rows(tmp_path, kind)] == expected
