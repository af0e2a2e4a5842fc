"""What a step's speed means: model FLOPs per token, the device's peak, MFU and peak memory.

FLOPs follow the convention of PaLM (Chowdhery et al. 2022, appendix B) and Megatron-LM's
throughput reports: a training step costs 3× its forward pass, a forward pass 2 FLOPs per
multiply-add of every matmul, so per token

    6 · N_matmul + 12 · L · h · s

with N_matmul the weights that multiply activations (every layer's linear layers and the
output layer, vocab × hidden, counted even when tied to the input embedding) and the second
term the attention scores and their product with the values over the whole sequence
(causal masking is not subtracted). Embedding lookups, norms and biases are left out. Each
model family (`launch/models/`) counts its own matmuls.
MFU is the model FLOPs per second per device over the device's dense bf16 peak.
"""

from __future__ import annotations

import resource

import torch

from launch.config import Config
from launch.models import family_of
from megatron_patches.device import on_gpu

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from the vendors' datasheets; the first
# name that occurs in torch.cuda.get_device_name() wins, so the more specific come first
# ("GB200" before "B200", which it contains).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H800 PCIe", 756.0),
    ("H800", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
)


def flops_per_token(cfg: Config, padded_vocab_size: int) -> float:
    """Training FLOPs per token of the model described by `cfg` (see the module docstring)."""
    return family_of(cfg.model).flops_per_token(cfg.model, padded_vocab_size)


def peak_tflops(cfg: Config) -> float | None:
    """`logging.peak_tflops`, else the table's figure for this GPU; None when unknown (CPU)."""
    if cfg.logging.peak_tflops is not None:
        return cfg.logging.peak_tflops
    if not on_gpu():
        return None
    return device_peak_tflops(torch.cuda.get_device_name())


def device_peak_tflops(device_name: str) -> float | None:
    return next((peak for name, peak in PEAK_BF16_TFLOPS if name in device_name), None)


def peak_memory_gib() -> float:
    """This process's peak: allocated GPU memory on a GPU, else the peak resident set size."""
    if on_gpu():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Throughput:
    """Per-step figures from the step time: computed once, then only arithmetic per row."""

    def __init__(self, cfg: Config, padded_vocab_size: int, world_size: int):
        self.tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
        self.flops_per_token = flops_per_token(cfg, padded_vocab_size)
        self.world_size = world_size
        self.peak = peak_tflops(cfg)

    def row(self, step_time_s: float) -> dict:
        tokens_per_s = self.tokens_per_step / step_time_s
        tflops = self.flops_per_token * tokens_per_s / self.world_size / 1e12
        return {
            "tokens_per_s": tokens_per_s,
            "tflops_per_device": tflops,
            "mfu": None if self.peak is None else tflops / self.peak,
            "peak_memory_gib": peak_memory_gib(),
        }
