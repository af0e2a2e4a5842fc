"""Resumable, atomic checkpoints: one directory discipline; each engine writes its own shards.

Layout of `<run_dir>/checkpoints/`:

    step_00000100/          the engine's shards (model, optimizer, RNG states) and
                            trainer_state.json (step, LR scheduler, reweighting schedule,
                            layout), written last
    step_00000200.tmp/      a save in progress; never loaded, removed by the next save

A checkpoint is written under a `.tmp` name and renamed by rank 0 once every rank has
finished, so a killed job never leaves one that looks complete.  The newest directory
with a trainer_state.json and its shards is loaded; any newer one is reported and skipped.
The shards are the engine's (`launch.engines`): Megatron's `dist_checkpointing` ones load
into any TP/PP/DP layout.
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
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from megatron_patches.device import on_gpu

STATE_FILE = "trainer_state.json"
PREFIX = "step_"


def current_layout() -> dict[str, int]:
    return dict(
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        cp=ps.get_context_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
    )


def rng_state() -> dict:
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if on_gpu():
        state["cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def warn(message: str) -> None:
    """Printed rather than warned: what happens to a run must not hide behind warning filters."""
    if dist.get_rank() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def write_json_atomically(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


class Checkpointer:
    """Saves and restores the training state of one run directory; `shards` (the engine)
    writes and reads the model, optimizer and RNG state inside each checkpoint."""

    def __init__(self, root: Path, shards, keep: Optional[int] = None):
        self.root = Path(root)
        self.shards = shards
        self.keep = keep

    def save(self, step: int, trainer_state: dict) -> Path:
        final = self.root / f"{PREFIX}{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if dist.get_rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(f"{PREFIX}*.tmp"):
                shutil.rmtree(stale)
            tmp.mkdir()
        dist.barrier()
        self.shards.write_shards(tmp)
        dist.barrier()
        if dist.get_rank() == 0:
            write_json_atomically(tmp / STATE_FILE, {**trainer_state, "step": step, "layout": current_layout()})
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
            if (path / STATE_FILE).is_file() and self.shards.shards_complete(path):
                complete.append(path)
            elif not complete:
                warn(f"checkpoint {path} is incomplete (no {STATE_FILE} or missing shards); using an earlier one")
        return complete

    def latest(self) -> Optional[Path]:
        complete = self.complete_checkpoints() if self.root.is_dir() else []
        return complete[0] if complete else None

    def load(self, path: Path) -> dict:
        """Restore the engine's state from `path`; returns the trainer state saved with it."""
        trainer_state = json.loads((path / STATE_FILE).read_text())
        self.shards.read_shards(path, trainer_state["layout"])
        return trainer_state
