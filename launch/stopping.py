"""Stopping a run cleanly: on a signal, at a wall-clock limit, or when torchrun's agent dies.

Slurm sends SIGUSR1 ahead of the time limit (`--signal=B:USR1@<lead>`, forwarded to the ranks
by launch/slurm/pretrain.sbatch) and SIGTERM at preemption or `scancel`, straight to every
process of the job step; `python -m launch.torchrun` passes both on to its workers without
killing them.  A signal only sets a flag; at the next step boundary every rank agrees on the
flags with one all-reduce of a small CPU tensor over a gloo group (no GPU stream sync), saves
a checkpoint and exits 75.  A worker whose torchrun agent dies (kill -9) gets SIGTERM from the
kernel, so it stops the same way instead of training on unsupervised.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time

# Exit status of a rank that stopped on a signal after saving a checkpoint ("try again":
# EX_TEMPFAIL); launch/slurm/pretrain.sbatch requeues the job on it after the time-limit
# warning.  A stop at train.exit_duration_minutes or train.exit_after exits 0.
EXIT_STOPPED_ON_SIGNAL = 75
EXIT_REFUSED = 2  # a config, run directory or resume refused before training: fix, then rerun
EXIT_DISK_FULL = 74  # EX_IOERR: a checkpoint did not fit; nothing half-written is left
# How a rank ends that a restart would only repeat: launch.torchrun does not restart these.
FINAL_EXITS = (EXIT_REFUSED, EXIT_DISK_FULL, EXIT_STOPPED_ON_SIGNAL)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_TIME_LIMIT = 1  # below every signal number, so that an all-reduced max prefers the signal
_PR_SET_PDEATHSIG = 1

_received = 0  # the last stop signal this process received; 0 = none


def catch_stop_signals() -> None:
    """Turn the stop signals into a flag.  launch.pretrain calls this before it imports torch,
    so that a signal during start-up stops the run at its first step boundary instead of
    killing it with the default action."""
    for number in STOP_SIGNALS:
        signal.signal(number, _on_signal)
    _terminate_when_parent_dies()


def _on_signal(number, frame) -> None:
    global _received
    _received = number


class StopRequests:
    """Signals and a deadline, read by every rank at the same step boundary."""

    def __init__(self, exit_duration_minutes: float | None):
        import torch.distributed as dist  # here, not above: catch_stop_signals runs before torch loads

        from megatron_patches.device import on_gpu

        catch_stop_signals()  # no-op when launch.pretrain did it already; needed for other callers
        self._deadline = None if exit_duration_minutes is None else time.monotonic() + 60 * exit_duration_minutes
        # On GPU the world group is NCCL; the flag travels over gloo to stay off the GPU stream.
        self._group = dist.new_group(backend="gloo") if on_gpu() else None

    def agreed(self, *, deadline: bool = True) -> str | None:
        """What every rank stops for now ("SIGTERM", "SIGUSR1", "the time limit"), or None.

        `deadline=False` reads signals only: the check before the first step leaves the time limit
        out, so a start-up slower than the limit still trains a step and every rerun makes progress.
        """
        import torch
        import torch.distributed as dist

        local = _received
        if not local and deadline and self._deadline is not None and time.monotonic() >= self._deadline:
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
