"""One run at a time per output: a lock file held for the whole run.

Two runs writing the same outputs would clear and replace each other's files (data_prep's
`P.lock` per output prefix; training's `RUN/run.lock` per run directory). The kernel
releases the lock when its process ends, however it ends, so the lock of a killed run
(kill -9, out of memory) never blocks the next one; the file's text only says who holds it.
A POSIX record lock (`lockf`), not `flock`: forked tokenize workers inherit the open file,
and would keep a `flock` held after their parent is killed, until they notice and exit.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from typing import IO

from .errors import DataPrepError


class LockHeld(Exception):
    """Another process holds the lock; `holder` is what it wrote: pid, host, start time."""

    def __init__(self, path: str, holder: str):
        super().__init__(f"{path} is held by {holder}")
        self.path, self.holder = path, holder


@contextlib.contextmanager
def output_lock(prefix: str) -> Iterator[None]:
    """Hold `prefix.lock` (creating the directory), or refuse naming the run that holds it.

    Taking the lock is the run's first write, so an output place that cannot be written (a
    read-only file system, a path through a regular file) is refused here, before any work."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(exclusive_lock(prefix + ".lock"))
        except LockHeld as held:
            raise DataPrepError(
                f"another data_prep run is writing {prefix} ({held.holder}; lock file {held.path}); "
                "wait for it to finish or stop it, or choose another --output-prefix"
            ) from None
        except OSError as exc:
            raise DataPrepError(
                f"cannot write output prefix {prefix}: {exc.strerror} ({exc.filename}); "
                "choose a writable --output-prefix"
            ) from None
        yield  # errors of the run itself pass through unchanged


@contextlib.contextmanager
def exclusive_lock(path: str) -> Iterator[None]:
    """Hold the lock file `path` (creating its directory), or raise `LockHeld`.

    The lock belongs to the process: it keeps out other processes, not a second lock of the
    same path in this one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    file = _acquire(path)
    try:
        file.truncate(0)
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        file.write(f"pid {os.getpid()} on host {socket.gethostname()}, started {started}\n")
        file.flush()
        yield
    finally:
        # Removed while still locked: a process that opened this file meanwhile sees that it
        # is gone once it gets the lock, and locks a new one (see _acquire).
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        file.close()


def _acquire(path: str) -> IO[str]:
    while True:
        file = open(path, "a+")
        try:
            fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            file.seek(0)
            holder = file.read().strip() or "a process that has not written its pid yet"
            file.close()
            raise LockHeld(path, holder) from None
        with contextlib.suppress(FileNotFoundError):
            if _identity(os.stat(path)) == _identity(os.fstat(file.fileno())):
                return file
        file.close()  # the previous holder removed this file as we opened it


def _identity(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino
