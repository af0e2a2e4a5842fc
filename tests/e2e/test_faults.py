"""Faults injected on purpose into real runs: signals, killed launchers, corrupted checkpoints,
two jobs on one run directory, a wall-clock limit. Each case says what happens and what is lost."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time

import pytest
from helpers.e2e import ENV, LONG, REPO, comparable, pretrain, pretrain_command, rows

from data_prep.lock import exclusive_lock


def start(run_dir, demo_dir, *overrides, launcher=()):
    """A run in the background whose stdout is read line by line."""
    command = pretrain_command(run_dir, demo_dir, *overrides, launcher=launcher)
    return subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def job_processes(pid: int) -> list[int]:
    """`pid` and all its descendants: the launcher, the ranks, Megatron's checkpoint helpers."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid] + [p for child in children for p in job_processes(int(child))]


def signal_job(process, number):
    """As Slurm signals a job step (preemption, scancel --signal): every process at once."""
    for pid in job_processes(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, number)


def stopped_at(output: str, reason: str) -> int:
    return int(output.rsplit(f"stopping on {reason} at step ", 1)[1].split(";")[0])


def read_until(process, text: str) -> str:
    seen = ""
    for line in process.stdout:
        seen += line
        if text in line:
            return seen
    raise AssertionError(f"the run ended without printing {text!r}:\n{seen[-3000:]}")


def test_sigterm_saves_at_the_next_step_and_a_rerun_continues_exactly(tmp_path, demo_dir, unbroken):
    run = start(tmp_path, demo_dir, *LONG)
    read_until(run, "step      2/40")
    run.send_signal(signal.SIGTERM)  # to torchrun, which forwards it to the ranks
    output = read_until(run, "stopping on SIGTERM at step")
    run.wait(timeout=120)
    stopped_at = int(output.rsplit("stopping on SIGTERM at step ", 1)[1].split(";")[0])
    assert 2 <= stopped_at < 40 and "checkpoint saved; rerun to resume" in output
    assert (tmp_path / f"checkpoints/step_{stopped_at:08d}/manifest.json").is_file()
    resumed = pretrain(tmp_path, demo_dir, *LONG)
    assert f"resuming from {tmp_path}/checkpoints/step_{stopped_at:08d}" in resumed.stdout
    assert comparable(tmp_path) == comparable(unbroken)  # nothing lost, bit for bit on CPU


@pytest.mark.parametrize(
    "save",
    ["sync", pytest.param("async", marks=pytest.mark.slow), pytest.param("data-workers", marks=pytest.mark.slow)],
)
def test_a_signal_to_every_process_after_periodic_checkpoints_saves_and_resumes_exactly(
    tmp_path, demo_dir, unbroken, save
):
    """Megatron's checkpoint helper process gets the signal too; the stop-save must not need it
    alive. So do the data workers (data-workers: two per rank), which read on until the save."""
    extra = {"async": ("checkpoint.async_save=true",), "data-workers": ("data.num_workers=2",)}.get(save, ())
    number, name = (signal.SIGUSR1, "SIGUSR1") if save == "async" else (signal.SIGTERM, "SIGTERM")
    run = start(tmp_path, demo_dir, *LONG, "checkpoint.interval=5", *extra)
    read_until(run, "saved checkpoint")
    read_until(run, "saved checkpoint")  # two saves served by the helper before the signal
    signal_job(run, number)
    output = read_until(run, f"stopping on {name}")
    output += run.stdout.read()
    assert run.wait(timeout=120) == 75
    step = stopped_at(output, name)
    assert "checkpoint saved; rerun to resume" in output and "Traceback" not in output
    assert "launch.torchrun: the ranks stopped with a checkpoint (exit 75)" in output
    assert (tmp_path / f"checkpoints/step_{step:08d}/manifest.json").is_file()
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    pretrain(tmp_path, demo_dir, *LONG, "checkpoint.interval=5", *extra)
    assert comparable(tmp_path) == comparable(unbroken)


@pytest.mark.slow
def test_a_signal_during_a_save_still_leaves_the_checkpoint_of_the_step_reached(tmp_path, demo_dir, unbroken):
    run = start(tmp_path, demo_dir, *LONG, "checkpoint.interval=3")
    checkpoints, deadline = tmp_path / "checkpoints", time.monotonic() + 120
    while not [p for p in checkpoints.glob("step_*.tmp") if int(p.name[5:13]) >= 6]:
        assert time.monotonic() < deadline and run.poll() is None, "no save in progress was seen"
        time.sleep(0.002)
    signal_job(run, signal.SIGTERM)  # while step 6's (or a later) checkpoint is being written
    output = run.stdout.read()
    assert run.wait(timeout=120) == 75, output[-3000:]
    step = stopped_at(output, "SIGTERM")
    assert (checkpoints / f"step_{step:08d}/manifest.json").is_file() and not list(checkpoints.glob("*.tmp"))
    pretrain(tmp_path, demo_dir, *LONG, "checkpoint.interval=3")
    assert comparable(tmp_path) == comparable(unbroken)


@pytest.mark.slow
def test_a_hung_rank_is_caught_by_the_watchdog_and_the_job_restarts_from_its_checkpoint(tmp_path, demo_dir, unbroken):
    hang = (
        "faults.hang_min_seconds=3",
        "faults.hang_multiple=5",
        "faults.hang_max_minutes=0.5",
        "checkpoint.interval=5",
    )
    run = start(tmp_path, demo_dir, *LONG, *hang, launcher=("--max-restarts=1",))
    read_until(run, "saved checkpoint")
    read_until(run, "step     12/40")
    frozen = job_processes(run.pid)[1:]  # the ranks and their helpers
    rank_1 = max(
        int(p) for p in subprocess.run(["pgrep", "-P", str(run.pid)], capture_output=True, text=True).stdout.split()
    )
    try:
        os.kill(rank_1, signal.SIGSTOP)  # a rank that stops answering, as a stalled node does
        begun = time.monotonic()
        output = run.stdout.read()
        assert run.wait(timeout=240) == 0, output[-12000:]
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert "rank 0: hang: " in output and "then exit 70 for a restart" in output
    assert "Current thread" in output and "(most recent call first)" in output  # rank 0's stacks
    assert f"resuming from {tmp_path}/checkpoints/step_00000010" in output
    assert time.monotonic() - begun < 200
    assert comparable(tmp_path) == comparable(unbroken)  # the restart lost nothing but time


def test_a_wall_clock_limit_stops_with_a_checkpoint(tmp_path, demo_dir):
    result = pretrain(tmp_path, demo_dir, *LONG, "train.exit_duration_minutes=0.0001")
    assert "stopping on the time limit at step 1; checkpoint saved" in result.stdout
    assert (tmp_path / "checkpoints/step_00000001/manifest.json").is_file()


def test_workers_stop_when_their_torchrun_dies(tmp_path, demo_dir):
    run = start(tmp_path, demo_dir, *LONG)
    read_until(run, "step      2/40")
    workers = subprocess.run(["pgrep", "-P", str(run.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    run.kill()  # kill -9 of the agent: it cannot forward anything
    deadline = time.monotonic() + 60
    while any(os.path.exists(f"/proc/{pid}") and not _is_zombie(pid) for pid in workers):
        assert time.monotonic() < deadline, "workers outlived their torchrun"
        time.sleep(0.2)
    run.wait()


def _is_zombie(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1].startswith("Z")
    except FileNotFoundError:
        return True


@pytest.mark.slow
def test_a_second_job_on_the_same_run_dir_is_refused(tmp_path, demo_dir):
    with exclusive_lock(str(tmp_path / "run.lock")):  # as a running job's rank 0 holds it
        result = pretrain(tmp_path, demo_dir, check=False)
    assert result.returncode != 0
    assert f"another job is training in {tmp_path} (pid {os.getpid()}" in result.stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.fixture(scope="module")
def stopped_at_4(tmp_path_factory, demo_dir):
    """A run stopped after step 4 with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("stopped")
    pretrain(run_dir, demo_dir, "train.exit_after=4")
    return run_dir


def _largest_shard(checkpoint):
    files = [p for p in checkpoint.rglob("*") if p.is_file() and p.name not in ("manifest.json", "trainer_state.json")]
    return max(files, key=lambda p: p.stat().st_size)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zero_inside(path):
    data = bytearray(path.read_bytes())
    start, length = len(data) // 4, min(64 * 1024, len(data) // 2)
    data[start : start + length] = bytes(length)  # same size: only the hash can tell
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated trainer_state.json": lambda c: (_truncate(c / "trainer_state.json"), "trainer_state.json"),
    "missing common.pt": lambda c: ((c / "common.pt").unlink(), "common.pt is missing"),
    "truncated shard": lambda c: (_truncate(shard := _largest_shard(c)), shard.name),
    "zeroed 64 KiB inside a shard": lambda c: (_zero_inside(_largest_shard(c)), "does not match its SHA-256"),
}


# The SHA-256 case in `make test`; the ones a size or presence check catches in `make test-slow`.
@pytest.mark.parametrize(
    "corruption",
    [pytest.param(name, marks=[] if name.startswith("zeroed") else pytest.mark.slow) for name in CORRUPTIONS],
)
def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, demo_dir, stopped_at_4, corruption):
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_at_4, run_dir)
    newest = run_dir / "checkpoints/step_00000004"
    _, named = CORRUPTIONS[corruption](newest)
    result = pretrain(run_dir, demo_dir)
    assert f"checkpoint {newest} is incomplete or corrupted" in result.stderr and named in result.stderr
    assert f"resuming from {run_dir}/checkpoints/step_00000002 at step 2" in result.stdout
    assert [r["step"] for r in rows(run_dir)] == [2, 4, 6, 8]
    # Never deleted: the run saved step 4 again and kept the corrupted one aside.
    assert len(list((run_dir / "checkpoints").glob("step_00000004.replaced-*"))) == 1


def test_a_resume_that_changes_the_experiment_is_refused_unless_allowed(tmp_path, demo_dir, stopped_at_4):
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_at_4, run_dir)
    refused = pretrain(run_dir, demo_dir, "reweight.strategy=quadratic", check=False)
    assert refused.returncode != 0
    assert "changes the experiment:\n  reweight.strategy: 'linupper' -> 'quadratic'" in refused.stderr
    assert "checkpoint.allow_config_change=true" in refused.stderr
    assert [r["step"] for r in rows(run_dir)] == [2, 4]  # nothing written
    allowed = pretrain(run_dir, demo_dir, "reweight.strategy=quadratic", "checkpoint.allow_config_change=true")
    assert "resuming from" in allowed.stdout and "resuming with a changed experiment" in allowed.stderr
    # Every start's config is kept; config.yaml is the latest one.
    starts = sorted((run_dir / "configs").glob("start-*.yaml"))
    assert [p.name for p in starts] == ["start-1.yaml", "start-2.yaml"]  # the refused start trained nothing
    assert "strategy: linupper" in starts[0].read_text() and "strategy: quadratic" in starts[1].read_text()
    assert (run_dir / "config.yaml").read_text() == starts[1].read_text()


@pytest.mark.slow
def test_a_resume_that_changes_only_how_the_run_reports_goes_on(tmp_path, demo_dir, stopped_at_4):
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_at_4, run_dir)
    result = pretrain(run_dir, demo_dir, "train.log_interval=4", "checkpoint.keep=3")
    assert "resuming from" in result.stdout and "changed experiment" not in result.stderr


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, demo_dir, stopped_at_4):
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_at_4, run_dir)
    with open(run_dir / "metrics.jsonl", "a") as metrics:
        metrics.write('{"kind": "train", "step": 6, "lo')  # a write cut short
    result = pretrain(run_dir, demo_dir)
    assert f"dropped a torn last line of {run_dir / 'metrics.jsonl'}" in result.stderr
    assert [r["step"] for r in rows(run_dir)] == [2, 4, 6, 8]


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a few MiB for the run directory; `resize` frees space as a user would."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")

    def resize(megabytes: int):
        subprocess.run(["mount", "-o", f"remount,size={megabytes}m", str(mount)], check=True)

    yield mount, resize
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.slow
def test_a_full_disk_during_a_save_is_reported_and_leaves_nothing_half_written(tmp_path, demo_dir, small_disk):
    disk, resize = small_disk  # 2 MiB: less than one checkpoint (about 3 MiB)
    run_dir, cache = disk / "run", f"data.cache_dir={tmp_path / 'cache'}"
    result = pretrain(run_dir, demo_dir, cache, check=False)
    assert result.returncode == 74, result.stderr[-3000:]
    assert f"no space left on device writing checkpoint {run_dir}/checkpoints/step_00000002.tmp" in result.stderr
    assert "Traceback" not in result.stderr and not list((run_dir / "checkpoints").glob("*"))
    resize(64)
    pretrain(run_dir, demo_dir, cache)  # with space freed, the rerun trains to the end
    assert [r["step"] for r in rows(run_dir)] == [2, 4, 6, 8]


@pytest.mark.slow
def test_a_save_that_cannot_fit_is_refused_before_writing_and_the_run_resumes_once_there_is_space(
    tmp_path, demo_dir, small_disk
):
    disk, resize = small_disk
    resize(7)  # two checkpoints fit, a third does not
    run_dir, cache = disk / "run", f"data.cache_dir={tmp_path / 'cache'}"
    result = pretrain(run_dir, demo_dir, cache, check=False)
    assert result.returncode == 74, result.stderr[-3000:]
    assert f"no space left on device for checkpoint {run_dir}/checkpoints/step_00000006.tmp (" in result.stderr
    assert " MiB needed, " in result.stderr and "lower checkpoint.keep" in result.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    resize(64)
    resumed = pretrain(run_dir, demo_dir, cache)
    assert f"resuming from {run_dir}/checkpoints/step_00000004 at step 4" in resumed.stdout
    assert [r["step"] for r in rows(run_dir)] == [2, 4, 6, 8]
