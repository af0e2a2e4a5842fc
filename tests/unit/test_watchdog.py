"""The hang watchdog on its own: a step far slower than the recent ones ends the process with
every thread's stack; steps within the limit never do."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from helpers.e2e import REPO

SCRIPT = textwrap.dedent("""
    import time
    from launch.watchdog import Watchdog

    def slow_step(seconds):
        time.sleep(seconds)

    dog = Watchdog(multiple=5, min_seconds=0.5, max_seconds=60, rank=3)
    for step in range(1, 11):  # ten steps of 0.02 s: limit max(0.5, 5 x 0.02) = 0.5 s
        dog.step_started(step)
        slow_step(0.02)
        dog.step_finished(step, 0.02)
    dog.step_started(11)
    slow_step({hang})
    dog.step_finished(11, {hang})
    print("finished")
""")


def run(hang: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT.format(hang=hang)], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_a_step_past_the_limit_dumps_every_stack_and_exits_70():
    result = run(hang=5.0)
    assert result.returncode == 70 and "finished" not in result.stdout
    assert "rank 3: hang: step 11 has run" in result.stderr and "over the watchdog's 0.5 s" in result.stderr
    assert "median of the last 10 steps 0.02 s" in result.stderr
    assert "in slow_step" in result.stderr and "Thread 0x" in result.stderr  # the main thread's stack, where it hangs


def test_steps_within_the_limit_run_to_the_end():
    result = run(hang=0.3)
    assert result.returncode == 0 and "finished" in result.stdout and "hang" not in result.stderr
