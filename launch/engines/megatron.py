"""Megatron-Core's engine: DDP over DP×CP, Megatron's optimizer, `dist_checkpointing` shards.

In bf16 the model is wrapped as Megatron-LM wraps it (`Float16Module`: every parameter in
bf16, fp32 outputs); gradients are reduced in fp32 buffers; the optimizer keeps fp32 master
weights and Adam's moments, sharded over the data-parallel group with
`parallel.distributed_optimizer`. Checkpoints are reshardable: any TP/PP/DP layout loads them.

The performance features are wired as Megatron-LM's training loop wires them: with
`parallel.overlap_grad_reduce` the schedule accumulates without reducing until each model
chunk's last micro-batch, then reduces bucket by bucket as the backward pass frees them; with
`parallel.overlap_param_gather` the optimizer step leaves the all-gather of the updated
parameters to the next forward pass (a forward pre-hook per bucket), so a checkpoint first
finishes it. With `parallel.virtual_pipeline_size` the model is a list of chunks, each under
its own DDP, stepped by one optimizer through the interleaved schedule.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from launch.checkpoint import current_layout, rng_state, set_rng_state, warn
from launch.config import Config
from launch.engines import StateBytes
from launch.model import use_bf16
from megatron_patches.checkpoint_writer import start_write_results_helper
from megatron_patches.distrib_optimizer import patch_distributed_optimizer


def ddp_config(cfg: Config) -> DistributedDataParallelConfig:
    p = cfg.parallel
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=p.distributed_optimizer,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        # Megatron-LM's default with the interleaved schedule: every pipeline stage dispatches its
        # all-gathers together (the schedule calls param_sync_func); off without it.
        align_param_gather=p.overlap_param_gather and p.virtual_pipeline_size is not None,
        bucket_size=p.bucket_size,
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


# The distributed optimizer's checkpoint format that reshards over TP and PP as well as DP
# (Megatron-Core 0.16 cannot save `fully_sharded_model_space` any more; `dp_reshardable` keeps
# TP and PP). Gathered on the first DP rank only: that rank alone writes the optimizer state,
# so gathering it on every rank would only cost host memory.
DISTRIBUTED_OPTIMIZER_FORMAT = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "distrib_optim_fully_reshardable_mem_efficient": True,
}


class Engine:
    """Megatron DDP (gradient reduction over DP×CP) and Megatron's optimizer."""

    def __init__(self, cfg: Config, chunks: list[torch.nn.Module], micro_batches_per_step: int):
        self.cfg = cfg
        self.chunks = chunks
        # Float16Module casts the parameters the builder left in fp32 (learned positions, norms)
        # in place, so the chunks stay the modules whose state the checkpoints hold.
        self.wrapped_chunks = [
            DistributedDataParallel(
                chunk.config,
                ddp_config(cfg),
                Float16Module(chunk.config, chunk) if use_bf16(cfg) else chunk,
                # As Megatron-LM: later chunks' reductions overlap the earlier chunks' compute anyway.
                disable_bucketing=index > 0,
            )
            for index, chunk in enumerate(chunks)
        ]
        self.optimizer = get_megatron_optimizer(megatron_optimizer_config(cfg), self.wrapped_chunks)
        # Saved with the checkpoint (content metadata); a load reads the format it was saved in.
        self.optimizer_format = DISTRIBUTED_OPTIMIZER_FORMAT if cfg.parallel.distributed_optimizer else {}
        if cfg.parallel.distributed_optimizer:
            patch_distributed_optimizer()
        self._configure_schedule(chunks[0].config)  # the schedules read the first chunk's config
        start_write_results_helper()  # before any stop signal can reach the first save

    def _configure_schedule(self, config) -> None:
        """The hooks Megatron's schedules call, as Megatron-LM sets them (one per model chunk)."""

        def per_chunk(hooks: list):
            return hooks[0] if len(hooks) == 1 else hooks

        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss
        if self.cfg.parallel.overlap_grad_reduce:
            config.no_sync_func = per_chunk([chunk.no_sync for chunk in self.wrapped_chunks])
            config.grad_sync_func = per_chunk([chunk.start_grad_sync for chunk in self.wrapped_chunks])
        if self.cfg.parallel.overlap_param_gather and self.cfg.parallel.virtual_pipeline_size is not None:
            config.param_sync_func = per_chunk([chunk.start_param_sync for chunk in self.wrapped_chunks])

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
            for chunk in self.wrapped_chunks:
                chunk.zero_grad_buffer()
            self.optimizer.zero_grad()
        if len(self.wrapped_chunks) > 1:  # the interleaved schedule: each chunk reads every micro-batch
            batches = list(itertools.tee(batches, len(self.wrapped_chunks)))
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=batches,
            model=self.wrapped_chunks,
            num_microbatches=num_microbatches,
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size,
            forward_only=forward_only,
        )

    def step(self) -> float:
        _, grad_norm, _ = self.optimizer.step()
        return float("nan") if grad_norm is None else grad_norm

    # ---- checkpoint shards: RNG states per (PP, TP, CP) rank, replicated over DP ------------

    def _sharded_state(self, rng: dict | None, is_loading: bool, optimizer_format: dict) -> dict:
        # Chunk i's state under `model` (i = 0) or `model{i}`, as Megatron-LM names them; the shards
        # are keyed by global layer, so any number of chunks loads them.
        model_state = {_chunk_key(i): chunk.sharded_state_dict() for i, chunk in enumerate(self.chunks)}
        state = {
            **model_state,
            "optimizer": self.optimizer.sharded_state_dict(
                model_state, is_loading=is_loading, metadata=optimizer_format
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
        if self.cfg.parallel.overlap_param_gather:  # the last step's parameters, not yet gathered
            for chunk in self.wrapped_chunks:
                chunk.start_param_sync(force_sync=True)
        return dist_checkpointing.save(
            self._sharded_state(rng_state(), is_loading=False, optimizer_format=self.optimizer_format),
            str(directory),
            async_sharded_save=asynchronous,
            content_metadata=self.optimizer_format,
        )

    @staticmethod
    def shards_complete(directory: Path) -> bool:
        return (directory / "metadata.json").is_file()

    def read_shards(self, directory: Path, saved_layout: dict[str, int]) -> None:
        same_layout = {k: v for k, v in saved_layout.items() if k != "dp"} == {
            k: v for k, v in current_layout().items() if k != "dp"
        }
        # Checkpoints written before the format was recorded hold a plain optimizer's state.
        saved_format = dist_checkpointing.load_content_metadata(str(directory)) or {}
        if bool(saved_format) != self.cfg.parallel.distributed_optimizer:
            saved = str(bool(saved_format)).lower()
            raise RuntimeError(
                f"checkpoint {directory} holds the optimizer state of parallel.distributed_optimizer={saved},"
                f" which this run does not use: resume with --set parallel.distributed_optimizer={saved}"
            )
        state = self._sharded_state(None, is_loading=True, optimizer_format=saved_format)
        if not same_layout:
            # RNG streams belong to model-parallel ranks; a new layout starts fresh ones.
            del state["rng_state"]
            warn(f"resharding checkpoint from layout {saved_layout} to {current_layout()}; RNG states re-seeded")
        loaded = dist_checkpointing.load(state, str(directory))
        for index, chunk in enumerate(self.chunks):
            chunk.load_state_dict(loaded[_chunk_key(index)])
        self.optimizer.load_state_dict(loaded["optimizer"])
        if same_layout:
            set_rng_state(loaded["rng_state"])


def _chunk_key(index: int) -> str:
    return "model" if index == 0 else f"model{index}"
