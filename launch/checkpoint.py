"""Resumable, reshardable, atomic checkpoints with Megatron's `dist_checkpointing`.

Layout of `<run_dir>/checkpoints/`:

    step_00000100/          model and optimizer shards (dist_checkpointing: any TP/PP/DP
                            layout can load them), RNG states per model-parallel rank,
                            and trainer_state.json (step, LR scheduler, reweighting
                            schedule, layout), written last
    step_00000200.tmp/      a save in progress; never loaded, removed by the next save

A checkpoint is written under a `.tmp` name and renamed by rank 0 once every rank has
finished, so a killed job never leaves one that looks complete.  The newest directory
with a trainer_state.json is loaded; any newer one without it is reported and skipped.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject

STATE_FILE = "trainer_state.json"
PREFIX = "step_"


def _layout() -> dict[str, int]:
    return dict(
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        cp=ps.get_context_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
    )


def _rng_state() -> dict:
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        state["cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        from megatron.core import tensor_parallel

        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(state: Optional[dict]) -> ShardedObject:
    """One RNG state per (PP, TP, CP) rank, replicated over DP (Megatron-LM's convention)."""
    return ShardedObject(
        "rng_state",
        state,
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(), ps.get_context_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), ps.get_context_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(),
    )


# Fully sharded in model space: the distributed optimizer's state reshards across layouts.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_sharded_model_space"}


def _sharded_state(model, optimizer, rng: Optional[dict], is_loading: bool) -> dict:
    model_state = model.sharded_state_dict()
    state = {
        "model": model_state,
        "optimizer": optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=OPTIMIZER_METADATA),
    }
    if rng is not None or is_loading:
        state["rng_state"] = _rng_sharded_object(rng)
    return state


def _warn(message: str) -> None:
    """Printed rather than warned: what happens to a run must not hide behind warning filters."""
    if dist.get_rank() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _write_json_atomically(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


class Checkpointer:
    """Saves and restores the whole training state of one run directory."""

    def __init__(self, root: Path, keep: Optional[int] = None):
        self.root = Path(root)
        self.keep = keep

    def save(self, step: int, model, optimizer, trainer_state: dict) -> Path:
        final = self.root / f"{PREFIX}{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if dist.get_rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(f"{PREFIX}*.tmp"):
                shutil.rmtree(stale)
            tmp.mkdir()
        dist.barrier()
        dist_checkpointing.save(_sharded_state(model, optimizer, _rng_state(), is_loading=False), str(tmp))
        dist.barrier()
        if dist.get_rank() == 0:
            _write_json_atomically(tmp / STATE_FILE, {**trainer_state, "step": step, "layout": _layout()})
            if final.exists():  # the same step saved again (a rerun of a finished run)
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        dist.barrier()
        return final

    def _prune(self) -> None:
        if self.keep is None:
            return
        for old in self.complete_checkpoints()[self.keep :]:
            shutil.rmtree(old)

    def complete_checkpoints(self) -> list[Path]:
        """Finished checkpoints, newest first."""
        found = [p for p in self.root.glob(f"{PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp")]
        found.sort(key=lambda p: int(p.name[len(PREFIX) :]), reverse=True)
        complete = []
        for path in found:
            if (path / STATE_FILE).is_file() and (path / "metadata.json").is_file():
                complete.append(path)
            elif not complete:
                _warn(f"checkpoint {path} is incomplete (no {STATE_FILE} or metadata.json); using an earlier one")
        return complete

    def latest(self) -> Optional[Path]:
        complete = self.complete_checkpoints() if self.root.is_dir() else []
        return complete[0] if complete else None

    def load(self, path: Path, model, optimizer) -> dict:
        """Restore model, optimizer and (same layout only) RNG; returns the trainer state."""
        trainer_state = json.loads((path / STATE_FILE).read_text())
        same_layout = {k: v for k, v in trainer_state["layout"].items() if k != "dp"} == {
            k: v for k, v in _layout().items() if k != "dp"
        }
        state = _sharded_state(model, optimizer, None, is_loading=True)
        if not same_layout:
            # RNG streams belong to model-parallel ranks; a new layout starts fresh ones.
            del state["rng_state"]
            _warn(f"resharding checkpoint from layout {trainer_state['layout']} to {_layout()}; RNG states re-seeded")
        loaded = dist_checkpointing.load(state, str(path))
        model.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
        if same_layout:
            _set_rng_state(loaded["rng_state"])
        return trainer_state
