"""A small study end to end: real runs of every arm and seed, and the summary they give."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers.e2e import REPO

from launch.metrics import read_metrics
from launch.tools.study.cli import main


def no_subprocess(*args, **kwargs):
    raise AssertionError(f"no run should start, got {args}")


@pytest.mark.slow
def test_small_study_end_to_end(tmp_path, demo_dir, monkeypatch):
    """2 arms x 2 seeds of a tiny model: runs, pairing, summary and a rerun that trains nothing."""
    monkeypatch.chdir(REPO)
    tiny = [
        "model.num_layers=2", "model.hidden_size=64", "model.seq_length=64", "train.steps=8",
        "train.global_batch_size=8", "train.micro_batch_size=2", "train.log_interval=2", "train.eval_interval=4",
        "train.eval_iters=1", "checkpoint.interval=4", "optim.warmup_steps=2", "reweight.warmup_steps=2",
    ]  # fmt: skip
    argv = ["--data", str(demo_dir), "--out", str(tmp_path), "--seeds", "2", "--set", *tiny]
    argv += ["--arm", "uniform", "--arm", "linupper:0.5"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    uniform, linupper = summary["arms"]
    first_loss = {}
    for arm in summary["arms"]:
        for seed, run_dir in zip((1, 2), arm["runs"]):
            metrics = read_metrics(Path(run_dir))
            final = [r for r in metrics if r["kind"] == "valid"][-1]
            assert final["step"] == 8
            assert arm["held_out"]["code"]["per_seed"][seed - 1] == final["valid_loss_per_domain"]["code"]
            first_loss[arm["name"], seed] = metrics[0]["loss"]
    # Paired: within a seed both arms start alike (uniform warm-up); seeds differ.
    assert first_loss["uniform", 1] == first_loss["linupper-r0.5", 1]
    assert first_loss["uniform", 1] != first_loss["uniform", 2]
    assert uniform["weights"]["ess"]["mean"] == pytest.approx(1.0)
    assert linupper["weights"]["ess"]["mean"] < 1.0
    assert len(linupper["natural_mixture"]["diff_ci95"]) == 2
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    assert main(argv) == 0  # everything finished: reused, summarised again
