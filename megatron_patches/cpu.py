"""Run Megatron-Core on CPU with gloo: everything it needs, in one place.

Megatron-Core assumes CUDA in a handful of spots: tensor factories that hard-code
`device="cuda"` (pipeline schedules, optimizers, gradient clipping), type-string checks
(`param.type() == 'torch.cuda.FloatTensor'`), and `torch.cuda.current_device()` /
`torch.cuda.synchronize()` calls.  Instead of patching those files one by one, a
`TorchFunctionMode` rewrites CUDA devices to CPU and reports CPU float tensors under their
CUDA type names, and the two `torch.cuda` helpers become harmless.  Activation recomputation
(`tensor_parallel.checkpoint`) saves and restores the CUDA generator's state around each
recomputed forward: a CPU has none, so that state is empty; the CPU generator, which dropout
draws from here, Megatron restores itself.

`enable_cpu_mode()` switches all of this on for the rest of the process and does nothing
when CUDA is available, so the same launch code runs on GPU untouched.  Core attention
comes from the layer spec (`megatron_patches.attention`), not from here.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import random as tp_random
from torch.overrides import TorchFunctionMode

from megatron_patches.device import on_gpu

_CPU = torch.device("cpu")
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}
_active_mode: _CudaAsCpu | None = None


def _is_cuda(device) -> bool:
    if isinstance(device, int):  # torch.cuda.current_device() hands out ints
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaAsCpu(TorchFunctionMode):
    """Maps every CUDA device argument to CPU; `.type()` answers with CUDA type names."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = _CPU
        if func in (torch.Tensor.to, torch.Tensor.new_empty) and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


def enable_cpu_mode() -> bool:
    """Make Megatron-Core's CUDA-only spots run on CPU.  Returns True when switched on."""
    global _active_mode
    if on_gpu():
        return False
    if _active_mode is None:
        torch.cuda.current_device = lambda: 0
        torch.cuda.synchronize = lambda device=None: None
        tp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
        tp_random._set_cuda_rng_state = lambda *args, **kwargs: None
        _active_mode = _CudaAsCpu()
        _active_mode.__enter__()
    return True
