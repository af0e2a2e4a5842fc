"""The entry points as a new user runs them: what they print, and nothing else."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO
from helpers.e2e import pretrain_command

# Every warning shows (no PYTHONWARNINGS); OMP_NUM_THREADS set, as torchrun would, spares its notice.
ENV = {**{k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.e2e


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, env=ENV, timeout=300)


def on_demo(demo_dir: Path) -> list[str]:
    return [
        "--set",
        f"data.blend={demo_dir / 'train.blend.json'}",
        f"data.valid_blend={demo_dir / 'valid.blend.json'}",
        f"data.tokenizer_model={demo_dir / 'tokenizer.model'}",
    ]


def test_a_refusal_under_launch_torchrun_is_one_block_from_rank_0(tmp_path, demo_dir):
    torchrun = ["-m", "launch.torchrun", "--standalone", "--nproc-per-node", "3", "-m", "launch.pretrain"]
    result = run(*torchrun, "--config", "configs/demo_cpu.yaml", "--run-dir", str(tmp_path / "run"), *on_demo(demo_dir))
    assert result.returncode == 2
    assert result.stderr == (
        "config error: invalid config:\n  - train.global_batch_size=16 is not divisible by"
        " micro_batch_size*DP = 4*3 = 12: set train.global_batch_size to a multiple of 12 (e.g. 24)\n"
    )
    assert not result.stdout


def test_a_dry_run_under_launch_torchrun_prints_once():
    torchrun = ["-m", "launch.torchrun", "--standalone", "--nproc-per-node", "2", "-m", "launch.pretrain"]
    result = run(*torchrun, "--config", "configs/gpt2-124m.yaml", "--dry-run", "--no-data")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("layout: OK for 2 processes") == 1 and not result.stderr


@pytest.mark.slow
def test_no_library_noise_on_a_resume_nor_in_the_report_and_the_export(tmp_path, demo_dir):
    """stderr is for what matters: Megatron-Core, DeepSpeed, TE/Apex and torch notices are filtered."""
    run_dir = tmp_path / "run"
    for stop in ("train.exit_after=2", "train.exit_after=null"):  # the second start resumes at step 2
        command = pretrain_command(run_dir, demo_dir, "train.steps=4", stop)
        result = run(*command[command.index("launch.pretrain") - 1 :])  # one process, no torchrun: faster
        assert result.returncode == 0 and result.stderr.splitlines() == [], result.stderr
    assert "resuming from" in result.stdout
    report = run("-m", "launch.tools.report", str(run_dir), "--out", str(tmp_path / "report.png"))
    assert report.returncode == 0 and report.stderr.splitlines() == []
    export = run("-m", "launch.tools.export", "--run-dir", str(run_dir), "--out", str(tmp_path / "export"))
    assert export.returncode == 0 and export.stderr.splitlines() == []
    umask = os.umask(0)
    os.umask(umask)
    assert {path.stat().st_mode & 0o777 for path in (tmp_path / "export").iterdir()} == {0o666 & ~umask}
