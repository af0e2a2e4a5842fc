"""Run a function on N real processes (gloo on CPU), as torchrun would, and collect results."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import traceback
from datetime import timedelta

from torch.distributed import TCPStore


def rendezvous_store() -> TCPStore:
    """The store the ranks meet at, served by this (parent) process as torchrun's agent does.

    The server binds port 0 and keeps its socket, so no other process can take the port
    between choosing and using it (a probed-then-closed "free port" can be taken).
    """
    return TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(minutes=10))


def _worker(rank, world_size, port, fn, args, results):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        # Every rank connects to the parent's store as a client (torchrun's agent store).
        TORCHELASTIC_USE_AGENT_STORE="True",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    try:
        # Plain pickle bytes: torch's queue reducers would share tensors through file
        # descriptors that vanish when this process exits.
        results.put((rank, pickle.dumps(fn(*args)), None))
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the traceback
        results.put((rank, None, traceback.format_exc()))


def run_distributed(fn, world_size: int, *args, timeout: float = 600):
    """`fn(*args)` on `world_size` spawned ranks; returns the list of their results by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = rendezvous_store()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, store.port, fn, args, results)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs = {}
    try:
        for _ in range(world_size):
            rank, value, error = results.get(timeout=timeout)
            if error:
                raise RuntimeError(f"rank {rank} failed:\n{error}")
            outputs[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [outputs[r] for r in range(world_size)]
