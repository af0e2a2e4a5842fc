"""Resumable, atomic checkpoints: one directory discipline; each engine writes its own shards.

Layout of `<run_dir>/checkpoints/`:

    step_00000100/          the engine's shards (model, optimizer, RNG states),
                            trainer_state.json (step, layout, config and the state of
                            every part registered in a `TrainerState`: LR scheduler,
                            reweighting schedule, step statistics) and manifest.json
                            (size and SHA-256 of every file), written last
    step_00000200.tmp/      a save in progress; never loaded, removed by the next save

A checkpoint is written under a `.tmp` name and renamed by rank 0 once every rank has
finished, so a killed job never leaves one that looks complete.  The newest complete
checkpoint that matches its manifest and loads is used; a newer one that is incomplete,
corrupted or unloadable is reported with the file and the reason, skipped, and kept.
The shards are the engine's (`launch.engines`): Megatron's `dist_checkpointing` ones load
into any TP/PP/DP layout.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from torch.distributed.checkpoint.api import CheckpointException

from data_prep.files import file_sha256, write_text_atomically
from launch.console import say
from megatron_patches.device import on_gpu

STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
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
        say(f"warning: {message}", file=sys.stderr)


def write_json_atomically(path: Path, data: dict) -> None:
    write_text_atomically(path, json.dumps(data, indent=2))


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted or loaded; the message names the file and why."""


class DiskFullError(RuntimeError):
    """A save that does not fit on its filesystem; nothing half-written is left behind."""


class Stateful(Protocol):
    """A part of the run that a checkpoint saves beside the engine's shards, as JSON."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


# Keys of trainer_state.json that the checkpoint discipline itself writes and reads.
RESERVED_KEYS = ("step", "layout", "config")


class TrainerState:
    """The parts of a run saved in trainer_state.json, by name: a save writes every
    registered part's `state_dict()`; a resume, once the engine's shards are loaded (the LR
    scheduler needs the optimizer's), gives each part its own back in registration order."""

    def __init__(self):
        self._parts: dict[str, tuple[Stateful, tuple[str, ...]]] = {}

    def register(self, name: str, part: Stateful, *, formerly: tuple[str, ...] = ()) -> None:
        """`formerly`: keys that older checkpoints saved the part under (read, never written)."""
        taken = set(RESERVED_KEYS).union(self._parts, *(old for _, old in self._parts.values()))
        clash = taken.intersection((name, *formerly))
        if clash:
            raise ValueError(f"trainer state key {min(clash)!r} is taken; register {name!r} under another name")
        self._parts[name] = (part, tuple(formerly))

    def state_dict(self) -> dict[str, Any]:
        """Every part's state (every rank calls it: a part may gather its state from all ranks)."""
        return {name: part.state_dict() for name, (part, _) in self._parts.items()}

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None:
        for name, (part, formerly) in self._parts.items():
            key = next((key for key in (name, *formerly) if key in state), None)
            if key is None:
                raise CheckpointError(f"{source / STATE_FILE} has no {name!r}: it was not written by this trainer")
            part.load_state_dict(state[key])


def file_manifest(directory: Path, share: tuple[int, int] = (0, 1)) -> dict[str, dict]:
    """Size and SHA-256 of the files under `directory` (but the manifest), by relative path.

    `share` = (rank, ranks): this rank hashes every ranks-th file, so that a large checkpoint
    is hashed by all ranks together; within a rank, threads hash files in parallel (hashlib
    releases the GIL)."""
    rank, ranks = share
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)[rank::ranks]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(file_sha256, files))
    return {
        str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": digest}
        for p, digest in zip(files, digests)
    }


def verify(directory: Path, share: tuple[int, int] = (0, 1)) -> str | None:
    """Why `directory` does not match its manifest, or None: every file's presence and size,
    and the SHA-256 of this rank's share of the files (see `file_manifest`)."""
    try:
        expected = json.loads((directory / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{MANIFEST} unreadable ({error})"
    for name, entry in expected.items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {entry['bytes']}"
    for name, entry in file_manifest(directory, share).items():
        if name in expected and entry["sha256"] != expected[name]["sha256"]:
            return f"{directory / name} does not match its SHA-256 in the manifest (corrupted)"
    return None


def _disk_full(error: BaseException, directory: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC (or a quota), as an exception or as the
    text of one, in the exception chain or in the per-rank failures a torch CheckpointException
    carries; or a short write (torch's writer reports one only as "unexpected pos") on a
    filesystem with little space left."""
    causes, short_write = [error], False
    while causes:
        seen = causes.pop()
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if os.strerror(errno.ENOSPC) in str(seen):  # an ENOSPC passed on as text by a writer process
            return True
        short_write = short_write or "unexpected pos" in str(seen)
        for failure in getattr(seen, "failures", {}).values():  # (exception, traceback) per rank
            causes += [
                part
                for part in (failure if isinstance(failure, tuple) else (failure,))
                if isinstance(part, BaseException)
            ]
        causes += [cause for cause in (seen.__cause__, seen.__context__) if cause is not None]
    usage = shutil.disk_usage(directory if directory.exists() else directory.parent)
    return short_write and (usage.free < 2**30 or usage.free < usage.total // 20)


def _bytes_under(directory: Path) -> int:
    total = 0
    for path in directory.rglob("*"):
        with contextlib.suppress(OSError):  # rank 0 may be removing the directory meanwhile
            total += path.stat().st_size if path.is_file() else 0
    return total


def _size(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def _world_share() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


class Checkpointer:
    """Saves and restores the training state of one run directory; `engine` (an instance or
    class of `launch.engines`) writes and reads the model, optimizer and RNG state inside
    each checkpoint.

    A manifest of every file's size and SHA-256 is written last; a checkpoint is loaded
    only after it verifies, and one that does not is reported and never deleted."""

    def __init__(self, root: Path, engine, keep: int | None = None, asynchronous: bool = False):
        self.root = Path(root)
        self.engine = engine
        self.keep = keep
        # Asynchronous saves write the shards from a forked process while training goes on;
        # the checkpoint is committed (state, manifest, rename) once every rank's write is done.
        self.pending = AsyncCallsQueue() if asynchronous else None

    def save(self, step: int, trainer_state: dict) -> Path:
        """Write a checkpoint of `step`; with asynchronous saves, return before it is committed."""
        self.finish_pending()  # one save in flight at a time: it owns the .tmp directory
        final = self.root / f"{PREFIX}{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        problem = [None]
        if dist.get_rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(f"{PREFIX}*.tmp"):
                shutil.rmtree(stale)
            problem = [self._space_problem(tmp)]
            if problem[0] is None:
                tmp.mkdir()
        dist.broadcast_object_list(problem, src=0)  # every rank refuses the save together
        if problem[0] is not None:
            raise DiskFullError(problem[0])
        commit = partial(self._commit, step, trainer_state, tmp, final)
        try:
            request = self.engine.write_shards(tmp, asynchronous=self.pending is not None)
            if request is None:
                commit()
        except (Exception, CheckpointException) as error:  # torch's is a BaseException
            # Every rank's save fails together (dist_checkpointing shares the failure), but only
            # the ranks that hit the full disk can tell; they tell the others.
            verdicts = [None] * dist.get_world_size()
            dist.all_gather_object(verdicts, _disk_full(error, tmp))
            if not any(verdicts):
                raise
            last, free = self._last_size(), shutil.disk_usage(self.root).free
            sizes = f"{_size(last)} needed" if last else f"{_size(_bytes_under(tmp))} written when it filled"
            if dist.get_rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise DiskFullError(
                f"no space left on device writing checkpoint {tmp} ({sizes}, {_size(free)} free);"
                f" the half-written checkpoint was removed: free space on {self.root}, or lower checkpoint.keep"
            ) from error
        if request is not None:
            request.add_finalize_fn(commit)  # runs on every rank after every rank's write
            self.pending.schedule_async_request(request)
        return final

    def _last_size(self) -> int | None:
        """Bytes of the newest checkpoint (from its manifest): what the next save will need."""
        for path in self.complete_checkpoints():
            try:
                files = json.loads((path / MANIFEST).read_text())["files"]
            except (OSError, ValueError, KeyError):
                continue
            return sum(entry["bytes"] for entry in files.values())
        return None

    def _space_problem(self, tmp: Path) -> str | None:
        """Why a save of the newest checkpoint's size would not fit now, or None (also when unknown)."""
        needed, free = self._last_size(), shutil.disk_usage(self.root).free
        if needed is None or free >= needed:
            return None
        return (
            f"no space left on device for checkpoint {tmp} ({_size(needed)} needed, {_size(free)} free):"
            f" free space on {self.root}, or lower checkpoint.keep"
        )

    def poll(self) -> None:
        """Commit an asynchronous save whose writes have finished on every rank (call each step)."""
        if self.pending is not None:
            self.pending.maybe_finalize_async_calls(blocking=False)

    def finish_pending(self) -> None:
        """Wait for and commit an asynchronous save in flight."""
        if self.pending is not None:
            self.pending.maybe_finalize_async_calls(blocking=True)

    def _commit(self, step: int, trainer_state: dict, tmp: Path, final: Path) -> None:
        """Once every rank's shards are written: state, manifest (last), then the rename."""
        dist.barrier()
        if dist.get_rank() == 0:
            write_json_atomically(tmp / STATE_FILE, {**trainer_state, "step": step, "layout": current_layout()})
        dist.barrier()
        shares = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(file_manifest(tmp, _world_share()), shares, dst=0)
        if dist.get_rank() == 0:
            write_json_atomically(
                tmp / MANIFEST, {"files": dict(sorted(kv for share in shares for kv in share.items()))}
            )
            if final.exists():  # the same step saved again: keep the old one aside, unverified
                aside = final.with_name(f"{final.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(final, aside)
                warn(f"{final} existed (not loaded: it failed verification or loading); kept as {aside}")
            os.replace(tmp, final)
            self._prune()
            say(f"step {step:>6} | saved checkpoint {final}")
        dist.barrier()

    def _prune(self) -> None:
        """Keep the newest `keep` verified checkpoints; older ones written by this discipline go."""
        if self.keep is None:
            return
        for old in self.complete_checkpoints()[self.keep :]:
            shutil.rmtree(old)

    def complete_checkpoints(self) -> list[Path]:
        """Finished checkpoints (a manifest, written last), newest first."""
        found = [p for p in self.root.glob(f"{PREFIX}*") if p.is_dir() and re.fullmatch(rf"{PREFIX}\d+", p.name)]
        found.sort(key=lambda p: int(p.name[len(PREFIX) :]), reverse=True)
        complete = []
        for path in found:
            if (path / MANIFEST).is_file() and self.engine.shards_complete(path):
                complete.append(path)
            elif not complete:
                warn(f"checkpoint {path} is incomplete (no {MANIFEST} or missing shards); using an earlier one")
        return complete

    def load(self, path: Path) -> dict:
        """Verify `path` (every rank hashes its share of the files and hears every verdict), then
        restore the engine's state from it; returns the trainer state saved with it. Raises
        CheckpointError."""
        verdicts = [None] * dist.get_world_size()
        dist.all_gather_object(verdicts, verify(path, _world_share()))
        problem = next((v for v in verdicts if v is not None), None)
        if problem is not None:
            raise CheckpointError(problem)
        try:
            trainer_state = json.loads((path / STATE_FILE).read_text())
            self.engine.read_shards(path, trainer_state["layout"])
        except (OSError, ValueError, KeyError, EOFError, RuntimeError) as error:
            raise CheckpointError(f"{path} could not be loaded: {type(error).__name__}: {error}") from error
        return trainer_state
