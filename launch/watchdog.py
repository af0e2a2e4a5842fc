"""A hung rank ends the job within minutes, with every live rank's Python stack on stderr.

A rank that stops answering (a stalled node, a deadlock, a SIGSTOP) leaves the others waiting
in a collective until the process-group timeout, and torchrun sees nothing wrong.  Each rank
runs this thread: when the current step has taken far longer than the recent ones
(`faults.hang_multiple` x their median, but at least `faults.hang_min_seconds`), or anything
between steps (evaluation, a save) longer than `faults.hang_max_minutes`, it dumps every
thread's stack (faulthandler) and exits 70, so that torchrun's `--max-restarts` or the job's
requeue restarts from the last checkpoint.
"""

from __future__ import annotations

import faulthandler
import os
import statistics
import sys
import threading
import time
from collections import deque

EXIT_HUNG = 70  # EX_SOFTWARE
RECENT_STEPS = 20


class Watchdog:
    def __init__(self, multiple: float, min_seconds: float, max_seconds: float, rank: int):
        self.multiple, self.min_seconds, self.max_seconds = multiple, min_seconds, max_seconds
        self.rank = rank
        self._recent: deque[float] = deque(maxlen=RECENT_STEPS)
        self._lock = threading.Lock()
        self._what, self._limit, self._since = "start-up before the first step", max_seconds, time.monotonic()
        self._stopped = threading.Event()
        threading.Thread(target=self._watch, name="hang-watchdog", daemon=True).start()

    def step_started(self, step: int) -> None:
        limit = self.max_seconds
        if self._recent:
            limit = min(self.max_seconds, max(self.min_seconds, self.multiple * statistics.median(self._recent)))
        self._arm(f"step {step}", limit)

    def step_finished(self, step: int, seconds: float) -> None:
        self._recent.append(seconds)
        self._arm(f"the work after step {step} (evaluation, checkpoint, logging)", self.max_seconds)

    def stop(self) -> None:
        self._stopped.set()

    def _arm(self, what: str, limit: float) -> None:
        with self._lock:
            self._what, self._limit, self._since = what, limit, time.monotonic()

    def _watch(self) -> None:
        poll = min(1.0, self.min_seconds / 4)
        while not self._stopped.wait(poll):
            with self._lock:
                what, limit, elapsed = self._what, self._limit, time.monotonic() - self._since
            if elapsed > limit:
                self._fire(what, limit, elapsed)

    def _fire(self, what: str, limit: float, elapsed: float) -> None:
        recent = (
            f"median of the last {len(self._recent)} steps {statistics.median(self._recent):.2f} s"
            if self._recent
            else "no step timed yet"
        )
        print(
            f"rank {self.rank}: hang: {what} has run {elapsed:.1f} s, over the watchdog's {limit:.3g} s"
            f" ({recent}; faults.hang_multiple={self.multiple:g}, hang_min_seconds={self.min_seconds:g},"
            f" hang_max_minutes={self.max_seconds / 60:g}); stacks of every thread follow, then exit {EXIT_HUNG}"
            " for a restart from the last checkpoint",
            file=sys.stderr,
            flush=True,
        )
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(EXIT_HUNG)
