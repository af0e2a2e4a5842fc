"""`python -m launch.torchrun [torchrun options] -m launch.pretrain ...`: torchrun with the stop policy of this project.

Plain torchrun meets a stop signal by raising in its agent, forwarding the signal to every
worker's process group, killing the workers 30 s later and exiting 1 with a traceback; with
`--max-restarts` it restarts workers that stopped on purpose.  A checkpointing rank needs
otherwise, so this launcher takes every torchrun option and changes three things:

- SIGTERM and SIGUSR1 are passed on to the workers, and the agent waits for them: the ranks
  finish the step, save and exit 75 in their own time (Slurm's KillWait or GraceTime is the
  deadline, not 30 s).
- Workers that end in a way a restart would only repeat (launch.stopping.FINAL_EXITS: 75
  stopped to resume, 2 refused, 74 disk full) are not restarted, and a stop to resume exits
  75 with one line.  Any other failure, e.g. the hang watchdog's exit 70 or a crash, is
  restarted by torchrun's `--max-restarts` and the ranks resume from the run directory.
- After the restarts are spent, it exits with the ranks' own exit code, not 1.

It also sets CUDA_DEVICE_MAX_CONNECTIONS=1 for the workers unless it is set (`main`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Sequence

from torch.distributed import run as torchrun
from torch.distributed.elastic.agent.server.api import RunResult, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher import api as launcher_api

from launch.console import say
from launch.stopping import EXIT_REFUSED, EXIT_STOPPED_ON_SIGNAL, FINAL_EXITS, STOP_SIGNALS

FINISH_GRACE_SECONDS = 300
REFUSAL_GRACE_SECONDS = 60  # rank 0 checks what the others checked: it refuses within seconds


class StopAwareAgent(LocalElasticAgent):
    """torchrun's local agent, but workers that ended for good (FINAL_EXITS) are not restarted."""

    running: StopAwareAgent | None = None  # the agent of this process, for the signal handler
    refused = False  # a worker refused to start: stopping the others is no news

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._finishing_since: float | None = None
        StopAwareAgent.running = self

    def _monitor_workers(self, worker_group):
        if self._others_still_finishing(worker_group):
            return RunResult(state=WorkerState.HEALTHY)
        result = super()._monitor_workers(worker_group)
        if result.is_failed() and _first(result.failures).exitcode in FINAL_EXITS:
            self._remaining_restarts = 0  # a planned stop or a refusal: a restart would repeat it
        return result

    def _others_still_finishing(self, worker_group) -> bool:
        """Some workers ended for good and the rest are still running: wait for them, rather than
        torchrun's kill of the rest at the first failure. After a stop-save (e.g. rank 0 closing its
        logs) for up to FINISH_GRACE_SECONDS; after a refusal, which comes before training, only
        for rank 0, which says why, for up to REFUSAL_GRACE_SECONDS."""
        handlers = getattr(self._pcontext, "subprocess_handlers", {})
        codes = {local_rank: handler.proc.poll() for local_rank, handler in handlers.items()}
        ended = [code for code in codes.values() if code is not None]
        if None not in codes.values() or not any(code in FINAL_EXITS for code in ended):
            self._finishing_since = None
            return False
        if not all(code == 0 or code in FINAL_EXITS for code in ended):
            return False
        grace = FINISH_GRACE_SECONDS
        if EXIT_REFUSED in ended:
            self.refused = True
            rank0 = [codes.get(worker.local_rank) for worker in worker_group.workers if worker.global_rank == 0]
            if rank0 != [None]:  # rank 0 has spoken, or runs on another node
                return False
            grace = REFUSAL_GRACE_SECONDS
        self._finishing_since = self._finishing_since or time.monotonic()
        return time.monotonic() - self._finishing_since < grace

    def worker_pids(self) -> list[int]:
        context = self._pcontext
        return list(context.pids().values()) if context is not None else []


def _forward_stop(number, frame) -> None:
    """Pass a stop signal to every worker (under Slurm they often have it already; twice is harmless)."""
    agent = StopAwareAgent.running
    for pid in agent.worker_pids() if agent is not None else []:
        try:
            os.kill(pid, number)
        except ProcessLookupError:
            pass


class _QuietFinalExits(logging.Filter):
    """torchrun logs every non-zero exit as an error: a planned stop or a refusal is not one (the
    ranks have said what happened). Nor, after a refusal, is its stop of each remaining rank news:
    they refused too, or had not started training."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg.startswith("failed (exitcode") and record.args and record.args[0] in FINAL_EXITS:
            return False
        agent = StopAwareAgent.running
        return not (record.msg.startswith("Sending process") and agent is not None and agent.refused)


def main(argv: Sequence[str] | None = None) -> int:
    args = torchrun.parse_args(argv)
    # One hardware queue per GPU: kernels start in the order they were issued, so a
    # communication kernel that Megatron-Core issues ahead of the compute it overlaps is not
    # held back behind that compute. CUDA reads it when it initialises, i.e. in each worker.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_QuietFinalExits())
    handled = [name.strip() for name in args.signals_to_handle.split(",")]
    stop_names = {s.name for s in STOP_SIGNALS}
    args.signals_to_handle = ",".join(name for name in handled if name not in stop_names)
    for number in STOP_SIGNALS:
        signal.signal(number, _forward_stop)
    launcher_api.LocalElasticAgent = StopAwareAgent  # the class launch_agent builds
    try:
        torchrun.run(args)
    except ChildFailedError as failed:
        code = _first(failed.failures).exitcode
        if {f.exitcode for f in failed.failures.values()} == {EXIT_STOPPED_ON_SIGNAL}:
            say(
                f"launch.torchrun: the ranks stopped with a checkpoint (exit {EXIT_STOPPED_ON_SIGNAL}); rerun to resume"
            )
        elif code not in FINAL_EXITS:  # those the ranks have explained themselves
            print(failed.format_msg(), file=sys.stderr)
        return code if code > 0 else 1  # a rank killed by a signal has a negative code
    return 0


def _first(failures: dict):
    """The failure that came first: its cause is the job's (the other ranks often fail after it)."""
    return min(failures.values(), key=lambda failure: failure.timestamp)


if __name__ == "__main__":
    sys.exit(main())
