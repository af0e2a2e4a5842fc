"""Progress of a long data_prep command: a tqdm bar on a terminal, plain lines in a log file.

tqdm draws nothing when stderr is not a terminal (a Slurm log, a pipe), so there a job would
be silent for hours. Instead a line like

    tokenizing: 45% (1.2 GB of 2.7 GB), file 12 of 40 (c4-0012.jsonl.zst 63%), 3,100 docs/s, ...

goes to stderr every DATA_PREP_PROGRESS_SECONDS seconds (default 30), and a last one with
the total time when the job has printed any. Both kinds have `update(n)`, `n`,
`set_postfix_str(text)` and are context managers.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

from tqdm import tqdm

INTERVAL_ENV = "DATA_PREP_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0


def progress(total: int, desc: str, stream: TextIO | None = None, interval: float | None = None):
    """A byte counter up to `total`: a tqdm bar when `stream` (stderr) is a terminal, else `PlainProgress`."""
    stream = stream or sys.stderr
    if stream.isatty():
        return tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=stream)
    if interval is None:
        interval = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL))
    return PlainProgress(total, desc, stream, interval)


class PlainProgress:
    """tqdm's counting interface, printing a line every `interval` seconds."""

    def __init__(self, total: int, desc: str, stream: TextIO, interval: float):
        self.total, self.desc, self.stream, self.interval = total, desc, stream, interval
        self.n = 0
        self.postfix = ""
        self.started = self.last = time.monotonic()
        self.printed = False

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._print(self.line(now - self.started))

    def close(self) -> None:
        """A last line with the total time, if the job was long enough to print any."""
        if self.printed:
            elapsed = time.monotonic() - self.started
            self._print(
                f"{self.desc}: done, {_bytes(self.n)} in {_duration(elapsed)}"
                + (f", {self.postfix}" if self.postfix else "")
            )

    def line(self, elapsed: float) -> str:
        fraction = self.n / self.total if self.total else 1.0
        parts = [f"{self.desc}: {fraction:.0%} ({_bytes(self.n)} of {_bytes(self.total)})"]
        if self.postfix:
            parts.append(self.postfix)
        if 0 < fraction < 1:
            parts.append(f"eta {_duration(elapsed * (1 - fraction) / fraction)}")
        return ", ".join(parts)

    def _print(self, line: str) -> None:
        self.printed = True
        print(line, file=self.stream, flush=True)


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
