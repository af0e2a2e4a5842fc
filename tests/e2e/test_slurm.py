"""launch/slurm/pretrain.sbatch on a real one-node Slurm (`bash tests/slurm/start-cluster.sh`, as
.ci/run does): the stop signals Slurm sends, what each leaves behind, and what the job does next."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.e2e import ENV, LONG, REPO, comparable, pretrain_command


def _slurm_answers() -> bool:
    return shutil.which("sbatch") is not None and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(
    not _slurm_answers(), reason="no Slurm here: start one with `bash tests/slurm/start-cluster.sh` (root)"
)
PERIODIC = (*LONG, "checkpoint.interval=5")


def submit(run_dir, demo_dir) -> tuple[str, Path]:
    """The sbatch script as it ships, with only what a machine without GPUs needs added."""
    pretrain_args = pretrain_command(run_dir, demo_dir, *PERIODIC)
    pretrain_args = pretrain_args[pretrain_args.index("launch.pretrain") + 1 :]
    log = run_dir.parent / f"{run_dir.name}.out"
    command = [
        "sbatch",
        "--parsable",
        "--nodes=1",
        "--gpus-per-node=0",
        "--cpus-per-task=2",
        f"--output={log}",
        "launch/slurm/pretrain.sbatch",
        *pretrain_args,
    ]
    env = {**ENV, "GPUS_PER_NODE": "2", "PYTHON": sys.executable}
    job = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.strip()
    return job, log


def job_field(job: str, name: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return next(word.split("=", 1)[1] for word in shown.split() if word.startswith(f"{name}="))


def wait_for(condition, what: str, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def wait_until_saved(log, times: int = 2):
    wait_for(lambda: log.exists() and log.read_text().count("saved checkpoint") >= times, "the periodic checkpoints")


def wait_until_ended(job: str) -> str:
    wait_for(lambda: job_field(job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), f"job {job} to end")
    return job_field(job, "JobState")


def stopped_at(text: str, reason: str) -> int:
    return int(text.rsplit(f"stopping on {reason} at step ", 1)[1].split(";")[0])


@pytest.mark.slow
def test_a_usr1_to_the_batch_shell_saves_requeues_and_the_job_finishes_exactly(tmp_path, demo_dir, unbroken):
    """What --signal=B:USR1@N does ahead of the time limit; `scancel --signal=USR1 --batch` does the same."""
    run_dir = tmp_path / "run"
    job, log = submit(run_dir, demo_dir)
    wait_until_saved(log)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    assert wait_until_ended(job) == "COMPLETED"
    text = log.read_text()
    step = stopped_at(text, "SIGUSR1")
    assert "requeueing job" in text and f"resuming from {run_dir}/checkpoints/step_{step:08d}" in text
    assert job_field(job, "Restarts") == "1" and job_field(job, "ExitCode") == "0:0"
    assert "Traceback" not in text and "forcing job termination" not in text
    assert comparable(run_dir) == comparable(unbroken)


def test_a_term_to_the_steps_saves_and_ends_the_job_with_exit_75(tmp_path, demo_dir):
    """What preemption sends (TERM to every process of the step): saved, 75, and no requeue of
    its own (Slurm's PreemptMode decides)."""
    run_dir = tmp_path / "run"
    job, log = submit(run_dir, demo_dir)
    wait_until_saved(log)
    subprocess.run(["scancel", "--signal=TERM", job], check=True)
    assert wait_until_ended(job) == "FAILED"
    text = log.read_text()
    step = stopped_at(text, "SIGTERM")
    assert (run_dir / f"checkpoints/step_{step:08d}/manifest.json").is_file()
    assert job_field(job, "ExitCode") == "75:0" and job_field(job, "Restarts") == "0"
    assert "requeueing" not in text and "Traceback" not in text


def test_a_plain_scancel_saves_and_the_job_stays_cancelled(tmp_path, demo_dir):
    run_dir = tmp_path / "run"
    job, log = submit(run_dir, demo_dir)
    wait_until_saved(log)
    subprocess.run(["scancel", job], check=True)
    assert wait_until_ended(job) == "CANCELLED"
    time.sleep(5)  # a requeue, were there one, would show by now
    assert job_field(job, "JobState") == "CANCELLED" and job_field(job, "Restarts") == "0"
    wait_for(lambda: "stopping on SIGTERM" in log.read_text(), "the ranks' stop line", timeout=60)
    step = stopped_at(log.read_text(), "SIGTERM")
    assert (run_dir / f"checkpoints/step_{step:08d}/manifest.json").is_file()
