"""Lines a run prints, each prefixed with the local wall-clock time (`2026-11-24 12:00:00 `).

Wall-clock rather than elapsed time: a Slurm log is read beside the scheduler's and the
node's logs, which use wall-clock time, and a resumed run's lines then line up with the
first job's. Only rank 0 prints progress; callers decide who speaks.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def stamp(text: str, now: float | None = None) -> str:
    """`text` with every line prefixed by the time."""
    prefix = time.strftime(TIME_FORMAT, time.localtime(now)) + " "
    return "\n".join(prefix + line for line in text.split("\n"))


def say(text: str, file: TextIO | None = None) -> None:
    """Print a timestamped line (or lines) and flush, to stdout unless `file` is given."""
    print(stamp(text), file=file or sys.stdout, flush=True)
