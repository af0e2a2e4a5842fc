"""Stopping a run cleanly: on a signal, at a wall-clock limit, or when torchrun's agent dies.

Slurm sends SIGTERM at preemption and, with `--signal=USR1@<lead>`, SIGUSR1 ahead of the
time limit; torchrun forwards both to its workers (`--signals-to-handle`).  A signal only
sets a flag; at the next step boundary every rank agrees on the flags with one all-reduce
of a small CPU tensor over a gloo group (no GPU stream sync), saves a checkpoint and exits.
A worker whose torchrun agent dies (kill -9) gets SIGTERM from the kernel, so it stops the
same way instead of training on unsupervised.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron_patches.device import on_gpu

# Exit status of a rank that stopped on a signal after saving a checkpoint ("try again":
# EX_TEMPFAIL); launch/slurm/pretrain.sbatch requeues the job.  A stop at
# train.exit_duration_minutes or train.exit_after exits 0.
EXIT_STOPPED_ON_SIGNAL = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_TIME_LIMIT = 1  # below every signal number, so that an all-reduced max prefers the signal
_PR_SET_PDEATHSIG = 1


class StopRequests:
    """Signals and a deadline, read by every rank at the same step boundary."""

    def __init__(self, exit_duration_minutes: Optional[float]):
        self._received = 0
        self._deadline = None if exit_duration_minutes is None else time.monotonic() + 60 * exit_duration_minutes
        for number in STOP_SIGNALS:
            signal.signal(number, self._on_signal)
        _terminate_when_parent_dies()
        # On GPU the world group is NCCL; the flag travels over gloo to stay off the GPU stream.
        self._group = dist.new_group(backend="gloo") if on_gpu() else None

    def _on_signal(self, number, frame) -> None:
        self._received = number

    def agreed(self) -> Optional[str]:
        """What every rank stops for now ("SIGTERM", "SIGUSR1", "the time limit"), or None."""
        local = self._received
        if not local and self._deadline is not None and time.monotonic() >= self._deadline:
            local = _TIME_LIMIT
        flag = torch.tensor([local], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        reason = int(flag[0])
        if reason == 0:
            return None
        return "the time limit" if reason == _TIME_LIMIT else signal.Signals(reason).name


def _terminate_when_parent_dies() -> None:
    """Ask the kernel for SIGTERM when the parent (torchrun's agent) exits (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0 and os.getppid() == 1:
        os.kill(os.getpid(), signal.SIGTERM)  # the parent died before we asked
