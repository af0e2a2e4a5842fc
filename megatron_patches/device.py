"""Where this process computes: decided once, so every part of a run agrees."""

from __future__ import annotations

import functools

import torch


@functools.cache
def on_gpu() -> bool:
    """True when CUDA is usable: then NCCL, the local GPU, bf16 by default; else CPU and gloo."""
    return torch.cuda.is_available()


def device() -> torch.device:
    """The device tensors of the training step live on (the local GPU or the CPU)."""
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu() else torch.device("cpu")
