"""data_prep/slurm/: the array job of shards and the merge after it, with stand-ins for sbatch,
srun and scontrol on PATH (the shards and the merge themselves run for real);
tests/e2e/test_data_prep_slurm_run.py submits them to a real Slurm."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import REPO
from helpers.shards import corpus, tokenize_arguments


def fake_command(folder: Path, name: str, body: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(f"#!/bin/sh\n{body}\n")
    (folder / name).chmod(0o755)


def test_submit_chains_the_merge_after_the_whole_array(tmp_path):
    bin_dir = tmp_path / "bin"
    # sbatch prints job ids 101, 102, ... and logs each call's arguments, one per line.
    fake_command(
        bin_dir,
        "sbatch",
        f"n=$(($(cat {tmp_path}/n 2>/dev/null || echo 100) + 1)); echo $n > {tmp_path}/n; "
        f'printf "%s\\n" "$@" > {tmp_path}/sbatch-$n; echo "$n;cluster"',
    )
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CPUS_PER_TASK": "4"}
    args = ["--input", "in dir/*.jsonl", "--tokenizer-model", "t.model", "--output-prefix", "data/my train"]
    done = subprocess.run(
        ["bash", "data_prep/slurm/submit.sh", "8", *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    array = (tmp_path / "sbatch-101").read_text().splitlines()
    merge = (tmp_path / "sbatch-102").read_text().splitlines()
    assert array == [
        "--parsable",
        "--array=0-7",
        "--cpus-per-task=4",
        "--time=12:00:00",
        "--output=./%x-%A_%a.out",
        "data_prep/slurm/tokenize.sbatch",
        *args,
    ]
    assert merge == [
        "--parsable",
        "--dependency=afterok:101",
        "--output=./%x-%j.out",
        "data_prep/slurm/merge.sbatch",
        "--output-prefix",
        "data/my train",
    ]
    assert "array job 101 and the merge as job 102" in done.stdout

    refused = subprocess.run(
        ["bash", "data_prep/slurm/submit.sh", "8", "--input", "x"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert refused.returncode == 2 and "--output-prefix" in refused.stderr


def test_array_tasks_then_merge_write_what_one_run_writes(tmp_path):
    """Each task as Slurm starts it (its SLURM_ARRAY_* variables, srun running the step), with
    an array that does not start at 0; then the merge job."""
    corpus(tmp_path, 7)
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "srun", 'while [ "${1#--}" != "$1" ]; do shift; done; exec "$@"')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable}
    env |= {"SLURM_SUBMIT_DIR": str(REPO), "PYTHONPATH": str(REPO), "SLURM_ARRAY_JOB_ID": "7"}
    array = {"SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "3"}
    for task in (3, 1, 2):  # in any order, as the scheduler pleases
        job = {**env, **array, "SLURM_ARRAY_TASK_ID": str(task)}
        done = subprocess.run(
            ["bash", str(REPO / "data_prep/slurm/tokenize.sbatch"), *tokenize_arguments(tmp_path, "sharded/train")],
            cwd=tmp_path,
            env=job,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        assert f"shard {task - 1} of 3" in done.stdout
    merged = subprocess.run(
        ["bash", str(REPO / "data_prep/slurm/merge.sbatch"), "--output-prefix", str(tmp_path / "sharded/train")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert merged.returncode == 0, merged.stderr
    one = subprocess.run(
        [sys.executable, "-m", "data_prep", "tokenize", *tokenize_arguments(tmp_path, "one/train")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr
    names = sorted(path.name for path in (tmp_path / "one").glob("train*") if not path.name.endswith("stats.json"))
    assert names == ["train.blend.json", "train_code.bin", "train_code.idx", "train_web.bin", "train_web.idx"]
    for name in names:
        assert (tmp_path / "sharded" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_the_time_limit_warning_requeues_the_task_and_only_that_task(tmp_path):
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "scontrol", f'echo "scontrol $*" >> {tmp_path}/calls')
    # srun stands for the step; Slurm ends it when the requeued job is stopped.
    fake_command(bin_dir, "srun", f"echo $$ > {tmp_path}/step.pid; exec sleep 30")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(REPO)}
    env |= {"SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "2", "SLURM_JOB_ID": "9"}
    job = subprocess.Popen(
        ["bash", str(REPO / "data_prep/slurm/tokenize.sbatch"), "--input", "x"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "step.pid").exists():
            assert time.monotonic() < deadline and job.poll() is None
            time.sleep(0.02)
        job.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while not (tmp_path / "calls").exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(int((tmp_path / "step.pid").read_text()), signal.SIGTERM)  # what Slurm then does
        out, _ = job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert (tmp_path / "calls").read_text() == "scontrol requeue 7_2\n"
    assert "requeueing 7_2" in out
