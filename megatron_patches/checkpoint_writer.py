"""Megatron-Core's checkpoint writer, made to survive the signal that asks for a stop-save.

`dist_checkpointing`'s filesystem writer gathers its write workers' results through a
`multiprocessing.Manager()` queue that it starts at the first save
(`filesystem_async._get_write_results_queue`), as a spawned child of the rank.  That child
shares the rank's process group and Slurm job step, so a stop signal (torchrun forwards to
the group; Slurm signals every process of the step) kills it, and the stop-save after any
earlier save fails with BrokenPipeError.  `start_write_results_helper` starts that manager
itself, in its own session with the stop signals ignored and bound to die with the rank, and
hands Megatron its queue.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
from multiprocessing.managers import SyncManager

from megatron.core.dist_checkpointing.strategies import filesystem_async

_PR_SET_PDEATHSIG = 1
_manager: SyncManager | None = None


def _detach_from_job_signals() -> None:
    """Runs in the helper: out of the rank's process group, deaf to stop signals, dies with the rank."""
    os.setsid()
    for number in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def start_write_results_helper() -> None:
    """Start Megatron's write-results queue ahead of the first save (start-up pays its spawn)."""
    global _manager
    if filesystem_async._results_queue is not None:
        return
    _manager = SyncManager(ctx=multiprocessing.get_context("spawn"))  # spawn, as Megatron does
    _manager.start(initializer=_detach_from_job_signals)
    filesystem_async._results_queue = _manager.Queue()
