"""Megatron-Core's engine: DDP over DP×CP, Megatron's optimizer, `dist_checkpointing` shards.

Gradients are reduced in fp32 buffers; the optimizer keeps fp32 master weights and Adam's
moments, sharded over the data-parallel group with `parallel.distributed_optimizer`.
Checkpoints are reshardable: any TP/PP/DP layout loads them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from launch.checkpoint import current_layout, rng_state, set_rng_state, warn
from launch.config import Config
from launch.engines import StateBytes
from launch.model import use_bf16
from megatron_patches.checkpoint_writer import start_write_results_helper


def ddp_config(cfg: Config) -> DistributedDataParallelConfig:
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        check_for_nan_in_grad=True,
    )


def megatron_optimizer_config(cfg: Config, gpu: bool | None = None) -> OptimizerConfig:
    """`gpu`: the device to configure for; None = whether this process has one."""
    o = cfg.optim
    bf16 = use_bf16(cfg, gpu)
    return OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        decoupled_weight_decay=o.name == "adamw",
        adam_beta1=o.beta1,
        adam_beta2=o.beta2,
        adam_eps=o.eps,
        clip_grad=o.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )


class Engine:
    """Megatron DDP (gradient reduction over DP×CP) and Megatron's optimizer."""

    # Fully sharded in model space: the distributed optimizer's state reshards across layouts.
    OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_sharded_model_space"}

    def __init__(self, cfg: Config, model: torch.nn.Module, micro_batches_per_step: int):
        self.cfg = cfg
        self.model = model
        self.wrapped_model = DistributedDataParallel(model.config, ddp_config(cfg), model)
        self.optimizer = get_megatron_optimizer(megatron_optimizer_config(cfg), [self.wrapped_model])
        model.config.finalize_model_grads_func = finalize_model_grads
        model.config.grad_scale_func = self.optimizer.scale_loss
        start_write_results_helper()  # before any stop signal can reach the first save

    @staticmethod
    def config_problems(cfg: Config, world_size: int) -> list[str]:
        return []  # every layout the common checks accept

    @staticmethod
    def state_bytes(cfg: Config, data_parallel_size: int) -> StateBytes:
        if cfg.model.precision == "fp32":  # no master copy; Adam m, v
            weights, optimizer = 4, 8
        else:  # "auto" is estimated as on GPU: bf16 weights; fp32 master, Adam m, v
            weights, optimizer = 2, 12
        shards = data_parallel_size if cfg.parallel.distributed_optimizer else 1
        return StateBytes(weights=weights, grads=4, optimizer=optimizer / shards)  # fp32 grad buffers

    def forward_backward(
        self, forward_step: Callable, batches: Iterator, num_microbatches: int, forward_only: bool
    ) -> list[dict]:
        if not forward_only:
            self.wrapped_model.zero_grad_buffer()
            self.optimizer.zero_grad()
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=batches,
            model=[self.wrapped_model],
            num_microbatches=num_microbatches,
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size,
            forward_only=forward_only,
        )

    def step(self) -> float:
        _, grad_norm, _ = self.optimizer.step()
        return float("nan") if grad_norm is None else grad_norm

    # ---- checkpoint shards: RNG states per (PP, TP, CP) rank, replicated over DP ------------

    def _sharded_state(self, rng: dict | None, is_loading: bool) -> dict:
        model_state = self.model.sharded_state_dict()
        state = {
            "model": model_state,
            "optimizer": self.optimizer.sharded_state_dict(
                model_state, is_loading=is_loading, metadata=self.OPTIMIZER_METADATA
            ),
        }
        if rng is not None or is_loading:
            state["rng_state"] = ShardedObject(
                "rng_state",
                rng,
                (
                    ps.get_pipeline_model_parallel_world_size(),
                    ps.get_tensor_model_parallel_world_size(),
                    ps.get_context_parallel_world_size(),
                ),
                (
                    ps.get_pipeline_model_parallel_rank(),
                    ps.get_tensor_model_parallel_rank(),
                    ps.get_context_parallel_rank(),
                ),
                replica_id=ps.get_data_parallel_rank(),
            )
        return state

    def write_shards(self, directory: Path, asynchronous: bool = False):
        return dist_checkpointing.save(
            self._sharded_state(rng_state(), is_loading=False), str(directory), async_sharded_save=asynchronous
        )

    @staticmethod
    def shards_complete(directory: Path) -> bool:
        return (directory / "metadata.json").is_file()

    def read_shards(self, directory: Path, saved_layout: dict[str, int]) -> None:
        same_layout = {k: v for k, v in saved_layout.items() if k != "dp"} == {
            k: v for k, v in current_layout().items() if k != "dp"
        }
        state = self._sharded_state(None, is_loading=True)
        if not same_layout:
            # RNG streams belong to model-parallel ranks; a new layout starts fresh ones.
            del state["rng_state"]
            warn(f"resharding checkpoint from layout {saved_layout} to {current_layout()}; RNG states re-seeded")
        loaded = dist_checkpointing.load(state, str(directory))
        self.model.load_state_dict(loaded["model"])
        self.optimizer.load_state_dict(loaded["optimizer"])
        if same_layout:
            set_rng_state(loaded["rng_state"])
