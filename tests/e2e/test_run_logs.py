"""Logs of real runs: the start-up summary, timestamps and no library noise, runs without torchrun,
and a Weights & Biases offline run that records what was logged."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest
from helpers.e2e import REPO, pretrain_command, rows
from helpers.logs import NOISE, STAMP, USER_ENV


def test_two_rank_run_prints_a_summary_timestamped_lines_and_no_library_noise(tmp_path, demo_dir):
    command = pretrain_command(
        tmp_path, demo_dir, "train.steps=2", "optim.warmup_steps=1", "reweight.warmup_steps=1", "train.eval_interval=2"
    )
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=USER_ENV)
    assert result.returncode == 0, result.stderr[-5000:]
    for message in NOISE + ["Falling back", "UserWarning", "FutureWarning", "DeprecationWarning"]:
        assert message not in result.stderr and message not in result.stdout, message
    out = result.stdout.splitlines()
    assert out and all(re.match(STAMP, line) for line in out), out
    text = "\n".join(line[20:] for line in out)
    summary, _, _ = text.partition("step      2/2")
    for expected in (
        "layout: world size 2 = TP 1 x PP 1 x CP 1 x DP 2",
        "batch: global 8",
        "model: gpt2, 2 layers x 64 hidden",
        "parameters: ",
        "memory per GPU: ",
        "reweighting: linupper",
        "data train: ",
        "data: read on the training thread (data.num_workers)",
        "TF32 matmuls: off (no GPU)",
        "starting at step 0 of 2",
    ):
        assert expected in summary, expected
    assert text.count("parameters: ") == 1  # rank 0 only
    assert "problems:" not in summary
    # all that is left on stderr is torchrun's own notice about OMP_NUM_THREADS (from the launcher)
    launcher = re.compile(r"(.*torch/distributed/run\.py:\d+\] )?(\**|Setting OMP_NUM_THREADS .*)\s*")
    assert [line for line in result.stderr.splitlines() if not launcher.fullmatch(line)] == []


def test_run_without_torchrun_is_a_single_process(tmp_path, demo_dir):
    command = pretrain_command(tmp_path, demo_dir, "train.steps=3", "optim.warmup_steps=1", "train.eval_interval=2")
    command = [sys.executable] + command[command.index("-m", 2) :]  # `python -m launch.pretrain ...`
    env = {
        k: v for k, v in USER_ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    result = subprocess.run(command + ["train.exit_after=2"], cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "world size 1 = TP 1 x PP 1 x CP 1 x DP 1" in result.stdout
    assert [r["step"] for r in rows(tmp_path)] == [2]
    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert f"resuming from {tmp_path}/checkpoints/step_00000002 at step 2 of 3" in resumed.stdout


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="pip install -e '.[test]' installs wandb")
def test_wandb_offline_run_records_the_logged_metrics(tmp_path, demo_dir):
    run_dir, wandb_dir = tmp_path / "run", tmp_path / "wandb_dir"
    command = pretrain_command(
        run_dir,
        demo_dir,
        "train.steps=2",
        "optim.warmup_steps=1",
        "reweight.warmup_steps=1",
        "train.eval_interval=2",
        "logging.wandb=true",
        "logging.wandb_project=test",
        nproc=2,
    )
    env = {**USER_ENV, "WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-5000:]
    runs = list((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs  # rank 0 only
    (records,) = runs[0].glob("run-*.wandb")
    data = records.read_bytes()
    for key in (
        "train/loss",
        "train/weight_ess",
        "train/domain_weight_share/code",
        "valid/valid_loss_per_domain/prose",
    ):
        assert key.encode() in data, key
    assert runs[0].name.endswith((run_dir / "wandb_id.txt").read_text().strip())
