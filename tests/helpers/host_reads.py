"""Detectors of host synchronisation: Python-level reads of tensor values, and operators
whose CUDA kernels read a device value on the host."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

HOST_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.numpy,
}


class HostReadRecorder(TorchFunctionMode):
    """Records every Python-level read of a tensor value on the host."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


# Operators whose CUDA kernels read a device value on the host (a stream sync), which a
# TorchFunctionMode cannot see when they are called from C++: `.item()` and friends end in
# _local_scalar_dense; bincount reads min and max; nonzero, masked_select and unique size
# their output from the data; boolean-mask indexing goes through nonzero.
CUDA_SYNCING_OPS = {
    torch.ops.aten._local_scalar_dense,
    torch.ops.aten.is_nonzero,
    torch.ops.aten.equal,
    torch.ops.aten.bincount,
    torch.ops.aten.nonzero,
    torch.ops.aten.masked_select,
    torch.ops.aten._unique2,
    torch.ops.aten.unique_consecutive,
    torch.ops.aten.unique_dim,
}


class SyncingOpRecorder(TorchDispatchMode):
    """Records operators that would synchronise with the host on CUDA."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in CUDA_SYNCING_OPS:
            self.calls.append(str(func))
        elif packet in (torch.ops.aten.index, torch.ops.aten.index_put_):
            if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
                self.calls.append(f"{func} with a boolean mask")
        return func(*args, **(kwargs or {}))
