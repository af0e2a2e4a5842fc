"""DeepSpeed ZeRO's engine (`engine: deepspeed`).

The same Megatron-Core GPTModel (tensor parallelism included), data order, reweighted loss,
metrics, validation and checkpoint discipline as with Megatron's engine; DeepSpeed
partitions the optimizer state (ZeRO-1), gradients (ZeRO-2) and parameters (ZeRO-3) over
the data-parallel group, reduces the gradients and clips them.
`megatron_patches.deepspeed` explains why a step computes exactly the Megatron engine's
gradient.  The optimizer is torch's AdamW with Megatron's parameter groups and the learning
rate comes from Megatron's own `OptimizerParamScheduler`, so both engines follow one
schedule, and the optimizer needs no compiled DeepSpeed op.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from launch.checkpoint import current_layout, rng_state, set_rng_state
from launch.config import Config, ConfigError, deep_merge
from launch.engines import StateBytes
from launch.model import use_bf16
from megatron_patches.deepspeed import MegatronMPU, forward_backward, optimizer_param_groups

# DeepSpeed's model-states files: `mp_rank_XX_...` per TP rank, `zero_pp_rank_N_mp_rank_XX_...` under ZeRO-3.
MODEL_STATES = "*model_states.pt"


def deepspeed_config(cfg: Config, micro_batches_per_step: int) -> dict:
    """DeepSpeed's settings from the run config, with `deepspeed.config` (a JSON) merged over them.

    The JSON may add settings (e.g. offloading, bucket sizes) but not contradict the run
    config: batch sizes, accumulation, clipping, precision and the ZeRO stage define the
    step that both engines must compute, so each has one place to be set.  In bf16 that step
    accumulates and reduces the gradients in fp32, as Megatron's engine does.
    """
    step = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": micro_batches_per_step,
        # The loop calls engine.step() once per global batch, like Megatron's optimizer.step().
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": use_bf16(cfg)},
        "data_types": {"grad_accum_dtype": "fp32"},
        "communication_data_type": "fp32",
    }
    settings = {**step, "log_level": "warning"}  # DeepSpeed's INFO lines would drown the step lines
    if cfg.deepspeed.zero_stage >= 2:
        # Reduce the gradients during the backward (DeepSpeed's default at stage 3 only).
        # Stages 0 and 1 reduce once, in step(): DeepSpeed refuses overlap_comm there
        # without its own gradient accumulation.
        settings = deep_merge(settings, {"zero_optimization": {"overlap_comm": True}})
    if cfg.deepspeed.config is None:
        return settings
    try:
        extra = json.loads(Path(cfg.deepspeed.config).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"deepspeed.config {cfg.deepspeed.config} is not a readable JSON file ({error})") from None
    for section in ("optimizer", "scheduler"):
        if section in extra:
            raise ConfigError(
                f"deepspeed.config sets {section!r}: the optimizer and LR schedule come from optim.* in the run config"
            )
    merged = deep_merge(settings, extra)
    conflicts = [key for key in _dotted_keys(step) if _lookup(merged, key) != _lookup(step, key)]
    if conflicts:
        raise ConfigError(
            f"deepspeed.config {cfg.deepspeed.config} contradicts the run config on {', '.join(conflicts)}:"
            " set train.*, optim.clip_grad, model.precision or deepspeed.zero_stage instead"
        )
    return merged


def _dotted_keys(settings: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in settings.items():
        keys += _dotted_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
    return keys


def _lookup(settings: dict, dotted: str):
    for key in dotted.split("."):
        settings = settings.get(key) if isinstance(settings, dict) else None
    return settings


def build_engine(cfg: Config, model: torch.nn.Module, micro_batches_per_step: int):
    """DeepSpeed's engine around `model`, and the torch optimizer whose LR the scheduler sets."""
    import deepspeed  # here: importing it takes seconds that a Megatron run need not spend

    o = cfg.optim
    optimizer_class = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    optimizer = optimizer_class(
        optimizer_param_groups(model), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, micro_batches_per_step), mpu=MegatronMPU()
    )
    return engine, optimizer


class Engine:
    """DeepSpeed's engine and ZeRO partitions; its shards load only into the same TP and DP sizes."""

    def __init__(self, cfg: Config, chunks: list[torch.nn.Module], micro_batches_per_step: int):
        (model,) = chunks  # no pipeline schedule here, so one chunk
        self.engine, self.optimizer = build_engine(cfg, model, micro_batches_per_step)

    @staticmethod
    def config_problems(cfg: Config, world_size: int) -> list[str]:
        par, problems = cfg.parallel, []
        if par.pp > 1 or par.cp > 1:
            problems.append(
                f"engine=deepspeed runs only parallel.pp=1 and parallel.cp=1 (got pp={par.pp},"
                f" cp={par.cp}); pipeline and context parallelism need engine=megatron"
            )
        if par.distributed_optimizer:
            problems.append(
                "parallel.distributed_optimizer is Megatron's optimizer sharding; with"
                " engine=deepspeed set it to false and use deepspeed.zero_stage >= 1"
            )
        megatron_only = [key for key in ("overlap_grad_reduce", "overlap_param_gather") if getattr(par, key)]
        if par.bucket_size is not None:
            megatron_only.append("bucket_size")
        if megatron_only:
            problems.append(
                f"parallel.{', parallel.'.join(megatron_only)} configure Megatron DDP's buckets; with"
                " engine=deepspeed unset them (DeepSpeed overlaps its own communication: deepspeed.config"
                " with zero_optimization.overlap_comm)"
            )
        if par.sequence_parallel:
            problems.append(
                "parallel.sequence_parallel=true needs engine=megatron: DeepSpeed does not reduce"
                " the layer-norm gradients over the tensor-parallel group; set it to false"
            )
        if use_bf16(cfg) and cfg.deepspeed.zero_stage == 0:
            problems.append(
                "bf16 with deepspeed.zero_stage=0: DeepSpeed accumulates gradients in fp32 (as Megatron's"
                " engine does) only under ZeRO; set deepspeed.zero_stage >= 1 or model.precision=fp32"
            )
        if cfg.checkpoint.async_save:
            problems.append("checkpoint.async_save=true needs engine=megatron (dist_checkpointing); set it to false")
        try:  # a deepspeed.config JSON at odds with the run config, found before any process starts
            deepspeed_config(cfg, cfg.train.micro_batches_per_step(max(1, par.data_parallel_size(world_size))))
        except ConfigError as error:
            problems.append(str(error))
        return problems

    @staticmethod
    def state_bytes(cfg: Config, data_parallel_size: int) -> StateBytes:
        weights, optimizer = (4, 8) if cfg.model.precision == "fp32" else (2, 12)
        zero, dp = cfg.deepspeed.zero_stage, data_parallel_size
        return StateBytes(
            weights=weights / (dp if zero == 3 else 1),
            grads=4 / (dp if zero >= 2 else 1),  # accumulated in fp32 (data_types.grad_accum_dtype)
            optimizer=optimizer / (dp if zero >= 1 else 1),
        )

    def forward_backward(
        self, forward_step: Callable, batches: Iterator, num_microbatches: int, forward_only: bool
    ) -> list[dict]:
        return forward_backward(self.engine, forward_step, batches, num_microbatches, forward_only)

    def step(self) -> float:
        self.engine.step()  # reduces what is left, clips, steps, zeroes the gradients
        grad_norm = self.engine.get_global_grad_norm()
        # ZeRO stage 0 clips with a plain torch optimizer and keeps no norm: logged as NaN.
        return float("nan") if grad_norm is None else float(grad_norm)

    def write_shards(self, directory: Path, asynchronous: bool = False) -> None:
        self.engine.save_checkpoint(
            str(directory.parent), tag=directory.name, client_state={"rng_state": rng_state()}, save_latest=False
        )

    def shards_complete(self, directory: Path) -> bool:
        return any(directory.glob(MODEL_STATES))

    def read_shards(self, directory: Path, saved_layout: dict[str, int]) -> None:
        if not self.shards_complete(directory):
            raise RuntimeError(
                f"{directory} is not a DeepSpeed checkpoint (no {MODEL_STATES}); engine=megatron wrote it?"
            )
        if saved_layout != current_layout():
            raise RuntimeError(
                f"checkpoint {directory} was written with layout {saved_layout} and this run is {current_layout()}:"
                " ZeRO partitions load only into the same parallel.tp and number of processes"
            )
        _, client_state = self.engine.load_checkpoint(str(directory.parent), tag=directory.name)
        set_rng_state(client_state["rng_state"])
