"""Engines: what runs a step's forward/backward, reduces gradients and steps the optimizer.

The trainer sees every engine through `Engine`; `cfg.engine` names the module of this
package that implements it (`launch/engines/<name>.py`, class `Engine`).  Adding an engine
is one new file here plus its name in `Config.engine`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    import torch

    from launch.config import Config


class StateBytes(NamedTuple):
    """Bytes per model parameter this engine keeps on one GPU, after its sharding."""

    weights: float
    grads: float
    optimizer: float


class Engine(Protocol):
    """One model replica's training machinery, built around this rank's part of the model."""

    #: the optimizer whose param groups the LR scheduler drives
    optimizer: torch.optim.Optimizer

    def __init__(self, cfg: Config, chunks: list[torch.nn.Module], micro_batches_per_step: int):
        """`chunks`: this rank's model chunks (`launch.model.build_model_chunks`)."""

    @staticmethod
    def config_problems(cfg: Config, world_size: int) -> list[str]:
        """What this engine cannot run at `world_size`, as messages that say what to change."""

    @staticmethod
    def state_bytes(cfg: Config, data_parallel_size: int) -> StateBytes:
        """The memory model for `--dry-run`: weights, gradients and optimizer state per parameter."""

    def forward_backward(
        self, forward_step: Callable, batches: Iterator, num_microbatches: int, forward_only: bool
    ) -> list[dict]:
        """Megatron's `forward_backward_func` contract: the loss reports of the micro-batches."""

    def step(self) -> float:
        """Reduce what is left, clip, step the optimizer, zero the gradients; the grad norm."""

    def write_shards(self, directory: Path, asynchronous: bool = False):
        """Model, optimizer and RNG state into a checkpoint directory (every rank). Asynchronous:
        return Megatron's `AsyncRequest` for the caller to schedule (None when written already)."""

    def read_shards(self, directory: Path, saved_layout: dict[str, int]) -> None:
        """Restore what `write_shards` wrote, possibly under another parallel layout."""

    def shards_complete(self, directory: Path) -> bool:
        """Whether a directory holds this engine's complete shards."""


def engine_class(name: str) -> type[Engine]:
    """The `Engine` of `launch/engines/<name>.py` (imported on demand: DeepSpeed is heavy)."""
    return importlib.import_module(f"{__name__}.{name}").Engine
