"""data_prep/slurm/submit.sh on a real one-node Slurm (`bash tests/slurm/start-cluster.sh`, as
.ci/run does): the array of shards, then the merge after it, equal to one unsharded run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
from helpers import REPO
from helpers.shards import corpus, tokenize_arguments


def _slurm_answers() -> bool:
    return shutil.which("sbatch") is not None and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(
    not _slurm_answers(), reason="no Slurm here: start one with `bash tests/slurm/start-cluster.sh` (root)"
)


def job_state(job: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return sorted({word.split("=", 1)[1] for word in shown.split() if word.startswith("JobState=")})


def test_the_array_of_shards_and_the_merge_after_it_write_what_one_run_writes(tmp_path):
    corpus(tmp_path, 6)
    env = {**os.environ, "CPUS_PER_TASK": "1", "TIME_LIMIT": "10", "LOG_DIR": str(tmp_path), "PYTHON": sys.executable}
    submitted = subprocess.run(
        ["bash", "data_prep/slurm/submit.sh", "3", *tokenize_arguments(tmp_path, "sharded/train")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    array, merge = submitted.split("array job ")[1].split()[0], submitted.split("merge as job ")[1].split()[0]
    deadline = time.monotonic() + 240
    while job_state(merge) not in (["COMPLETED"], ["FAILED"], ["CANCELLED"]):
        assert time.monotonic() < deadline, f"the merge job {merge} did not end: {job_state(merge)}"
        time.sleep(1)
    logs = {path.name: path.read_text() for path in tmp_path.glob("*.out")}
    assert job_state(merge) == ["COMPLETED"], logs
    assert job_state(array) == ["COMPLETED"], logs  # every task of the array
    assert sorted(logs) == sorted([f"tokenize-{array}_{k}.out" for k in range(3)] + [f"tokenize-merge-{merge}.out"])

    one = subprocess.run(
        [sys.executable, "-m", "data_prep", "tokenize", *tokenize_arguments(tmp_path, "one/train")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr
    names = sorted(path.name for path in (tmp_path / "one").glob("train*") if not path.name.endswith("stats.json"))
    assert len(names) == 5
    for name in names:
        assert (tmp_path / "sharded" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
