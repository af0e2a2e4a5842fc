"""Megatron-Core's distributed optimizer over torch's Adam: checkpoints that resume exactly.

Without Transformer Engine or Apex (on CPU, or a GPU install without them) Megatron-Core
0.16.1 steps its distributed optimizer with torch's Adam, which keeps Adam's step in every
parameter's state; the distributed optimizer's checkpoints store it once, with the parameter
groups.  Loading one goes wrong three times:

* `sharded_state_dict(is_loading=True)` reads the step from torch's state, which torch
  creates only at the first step (AssertionError): a fresh optimizer gets step 0's state.
* `load_state_dict` hands every parameter the same step tensor, which torch's Adam then
  increments once per parameter at every step, so the bias correction drifts after a
  resume: each parameter gets a copy of its own.
* `_set_main_param_and_optimizer_states` copies every key of torch's state from the
  checkpoint, the step included (KeyError): it copies the keys the checkpoint holds.

With Transformer Engine's or Apex's Adam (the step lives in the parameter groups) the
patched methods do what Megatron's do.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

_megatron = {
    name: getattr(DistributedOptimizer, name)
    for name in ("sharded_state_dict", "load_state_dict", "_set_main_param_and_optimizer_states")
}


def _torch_adam(optimizer: DistributedOptimizer):
    return optimizer.optimizer if isinstance(optimizer.optimizer, torch.optim.Adam) else None


def _sharded_state_dict(self, model_sharded_state_dict, is_loading=False, **kwargs):
    adam = _torch_adam(self)
    if is_loading and adam is not None and not adam.state:
        for group in adam.param_groups:
            for param in group["params"]:
                adam.state[param] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(param),
                    "exp_avg_sq": torch.zeros_like(param),
                }
    return _megatron["sharded_state_dict"](self, model_sharded_state_dict, is_loading, **kwargs)


def _load_state_dict(self, state_dict) -> None:
    _megatron["load_state_dict"](self, state_dict)
    adam = _torch_adam(self)
    if adam is not None:
        for state in adam.state.values():
            state["step"] = state["step"].clone()


def _set_main_param_and_optimizer_states(self, model_param, tensors: dict) -> None:
    if _torch_adam(self) is None or self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
        return _megatron["_set_main_param_and_optimizer_states"](self, model_param, tensors)
    group_index, group_order = self.model_param_group_index_map[model_param]
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    targets = {"param": main_param, **self.optimizer.state[main_param]}
    for key, value in tensors.items():
        targets[key].copy_(value)


def patch_distributed_optimizer() -> None:
    """Make the distributed optimizer's checkpoints load exactly over torch's Adam (idempotent)."""
    DistributedOptimizer.sharded_state_dict = _sharded_state_dict
    DistributedOptimizer.load_state_dict = _load_state_dict
    DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
