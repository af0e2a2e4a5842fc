"""Run Megatron-LM's own training loop (`megatron.training`) on CPU with gloo, for tests.

`megatron_patches.cpu` covers Megatron-Core; Megatron-LM's `pretrain()` adds a few spots that
need CUDA, a compiler or Triton.  Each is replaced here by what it means on a CPU:

* `initialize_megatron` asserts CUDA unless `allow_no_cuda=True`: pretrain() gets it set.
* `_initialize_distributed` builds the model-parallel groups only when
  `torch.cuda.device_count() > 0`: during that call the CPU counts as one device.
* `_compile_dependencies` runs `make` for the dataset helpers (the megatron-core wheel ships
  them compiled) and builds fused CUDA kernels with nvcc: skipped.
* `get_model` builds DDP on a `torch.cuda.Stream`, and the rerun state machine saves
  `torch.cuda.get_rng_state()`: streams become no-ops, the CUDA RNG state is empty.
* Megatron-Core forks a CUDA RNG state around weight init and dropout; a CPU has no CUDA
  generator, so the tracker is Megatron-Core's one that forks nothing (made for inference):
  both draw from the CPU generator, which checkpoints save and restore.
* `validate_args` reads the GPU architecture when TP or CP > 1 (to require
  CUDA_DEVICE_MAX_CONNECTIONS=1): a CPU has no such limit, reported as Blackwell's 10.
* `megatron.training.initialize` imports the Triton kernels of `--batch-invariant-mode`
  (`megatron.core.transformer.custom_layers.batch_invariant_kernels`).  Without Triton that
  one module is replaced by a stand-in whose `enable_batch_invariant_mode` refuses; a fake
  `triton` package is deliberately not installed, so nothing else mistakes the CPU for a GPU.

`enable_megatron_lm_cpu_mode()` must run before `megatron.training` is imported, and does
nothing when CUDA is available.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
import types

import torch

from megatron_patches.cpu import enable_cpu_mode

_BATCH_INVARIANT_KERNELS = "megatron.core.transformer.custom_layers.batch_invariant_kernels"
_enabled = False


class _NoStream:
    """What `torch.cuda.Stream()` is on a CPU: work runs in order, there is nothing to wait for."""

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _refuse_batch_invariant_mode(*args, **kwargs):
    raise RuntimeError("--batch-invariant-mode needs Triton and a GPU; leave it off on CPU")


def _install_batch_invariant_stand_in() -> None:
    """Megatron-LM imports this Triton module unconditionally; it is used only by --batch-invariant-mode."""
    if importlib.util.find_spec("triton") is not None or _BATCH_INVARIANT_KERNELS in sys.modules:
        return
    stand_in = types.ModuleType(_BATCH_INVARIANT_KERNELS, "CPU stand-in: batch-invariant mode needs Triton")
    stand_in.enable_batch_invariant_mode = _refuse_batch_invariant_mode
    stand_in.set_batch_invariant_mode = _refuse_batch_invariant_mode
    stand_in.is_batch_invariant_mode_enabled = lambda: False
    stand_in.disable_batch_invariant_mode = lambda: None
    sys.modules[_BATCH_INVARIANT_KERNELS] = stand_in


def _patch_torch_cuda() -> None:
    torch.cuda.Stream = lambda *args, **kwargs: _NoStream()
    torch.cuda.current_stream = lambda device=None: _NoStream()
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.get_rng_state = lambda device="cuda": torch.empty(0, dtype=torch.uint8)
    torch.cuda.set_rng_state = lambda state, device="cuda": None


def _one_device_during(function):
    """`function` with the CPU counted as one CUDA device, and `set_device` a no-op, while it runs."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        device_count, set_device = torch.cuda.device_count, torch.cuda.set_device
        torch.cuda.device_count, torch.cuda.set_device = (lambda: 1), (lambda device: None)
        try:
            return function(*args, **kwargs)
        finally:
            torch.cuda.device_count, torch.cuda.set_device = device_count, set_device

    return wrapper


def enable_megatron_lm_cpu_mode() -> bool:
    """Make Megatron-LM's `pretrain()` run on CPU.  Returns True when switched on."""
    global _enabled
    if not enable_cpu_mode():
        return False
    if _enabled:
        return True
    _install_batch_invariant_stand_in()
    _patch_torch_cuda()
    from megatron.core import tensor_parallel
    from megatron.training import arguments, initialize, training

    tracker = tensor_parallel.get_cuda_rng_tracker(inference_rng_tracker=True)
    # Megatron-LM's checkpoint load refuses an empty tracker; the CPU generator itself is saved
    # as `torch_rng_state`, so the tracker holds one placeholder, which it never uses.
    tracker.states_["no-cuda-generator"] = torch.empty(0, dtype=torch.uint8)

    training.initialize_megatron = functools.partial(initialize.initialize_megatron, allow_no_cuda=True)
    initialize._initialize_distributed = _one_device_during(initialize._initialize_distributed)
    initialize._compile_dependencies = lambda: None
    arguments.get_device_arch_version = lambda: 10
    _enabled = True
    return True
