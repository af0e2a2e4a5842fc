"""Training the study's runs here, one after another, each in its own subprocess."""

from __future__ import annotations

import subprocess
import sys
import time

from launch.metrics import read_metrics
from launch.tools.study.plan import Run, is_finished, pretrain_command


def run_all(config: str, runs: list[Run], nproc: int) -> bool:
    """Train the unfinished runs one after another; False at the first failure."""
    timings = []
    for index, run in enumerate(runs, 1):
        head = f"[{index}/{len(runs)}] {run.arm} seed {run.seed}"
        if is_finished(run):
            print(f"{head}: finished earlier, reused ({run.run_dir})", flush=True)
            continue
        trained = [r["step"] for r in read_metrics(run.run_dir) if r.get("kind") == "train"]
        state = f"resuming after step {trained[-1]}" if trained else "training"
        log = run.run_dir / "study.log"
        print(f"{head}: {state} (log: {log})", flush=True)
        run.run_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with log.open("a") as stream:
            result = subprocess.run(pretrain_command(config, run, nproc), stdout=stream, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - start
        if result.returncode != 0 or not is_finished(run):
            tail = "\n".join(log.read_text().splitlines()[-20:])
            why = (
                f"failed (exit {result.returncode})"
                if result.returncode
                else (
                    f"stopped without a held-out loss at step {run.steps} (train.exit_after set? no validation data?)"
                )
            )
            print(
                f"{tail}\n{head}: {why} after {seconds:.0f} s; full log {log}."
                " Fix the cause and run the same command again: finished runs are reused.",
                file=sys.stderr,
            )
            return False
        timings.append(seconds)
        left = sum(not is_finished(r) for r in runs[index:])
        eta = f", about {_duration(left * sum(timings) / len(timings))} for the {left} left" if left else ""
        print(f"{head}: done in {seconds:.0f} s{eta}", flush=True)
    return True


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
