"""Process groups and seeds for Megatron-Core, on GPU (NCCL) or CPU (gloo)."""

from __future__ import annotations

import os
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_patches.cpu import enable_cpu_mode
from megatron_patches.device import on_gpu


def initialize_parallel(
    tp: int = 1, pp: int = 1, cp: int = 1, seed: int = 1234, timeout_minutes: float = 10, vpp: int | None = None
) -> None:
    """Start the world group from torchrun's environment and build Megatron's TP/PP/CP/DP groups;
    started without torchrun (no RANK), the world is this one process. `vpp`: model chunks per
    pipeline rank for the interleaved schedule (None: one).

    On a machine without CUDA this switches on CPU mode and uses gloo; otherwise NCCL on
    the local GPU.  DP is whatever the world size leaves after TP×PP×CP.  A collective that
    waits `timeout_minutes` for a lost rank fails, in every group.
    """
    if on_gpu():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        enable_cpu_mode()
    if not dist.is_initialized():
        backend = "nccl" if on_gpu() else "gloo"
        timeout = timedelta(minutes=timeout_minutes)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's workers
            rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            dist.init_process_group(
                backend=backend, timeout=timeout, store=_attempt_store(timeout), rank=rank, world_size=world_size
            )
        elif "RANK" in os.environ:  # started with the variables set (e.g. by Slurm's srun)
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, timeout=timeout, store=_standalone_store(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        virtual_pipeline_model_parallel_size=vpp,
        distributed_timeout_minutes=timeout_minutes,  # used as timedelta(minutes=...): a float is fine
    )
    set_seed(seed)


def _attempt_store(timeout: timedelta) -> dist.Store:
    """torchrun's agent store, under a prefix of this attempt.  After a restart
    (`--max-restarts`) the agent's store still holds the previous attempt's keys, among them
    the dead ranks' gloo addresses: a rank that reads one before its peer has rewritten it
    fails with "connection refused"."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def _standalone_store() -> dist.TCPStore:
    """`python -m launch.pretrain` without torchrun: a world of one process.

    The store listens on a port the kernel picks (port 0), so two such runs on one machine
    never race for a port; the variables torchrun would set are filled in for code that
    reads them (Megatron, DeepSpeed).
    """
    store = dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True, timeout=timedelta(minutes=5))
    for name, value in (
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_RANK", "0"),
        ("LOCAL_WORLD_SIZE", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", str(store.port)),
    ):
        os.environ.setdefault(name, value)
    return store


def set_seed(seed: int) -> None:
    """Same seed on every rank of a model replica; Megatron's TP RNG tracker on GPU."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if on_gpu():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
