"""DeepSpeed ZeRO around a Megatron-Core model: the parallel groups and the step contract.

Two pieces make a DeepSpeed engine compute exactly the gradient Megatron's engine does:

* `MegatronMPU`, DeepSpeed's "model parallel unit": it answers DeepSpeed's questions about
  model- and data-parallel groups with Megatron-Core's `parallel_state`, so that ZeRO
  partitions and averages over the data-parallel group only, and the gradient norm counts
  each tensor-parallel shard once (replicated parameters on TP rank 0 only).
* `forward_backward`, Megatron's `forward_backward_func` contract on the engine: the same
  `forward_step_func(data_iterator, model) -> (output, loss_func)` and
  `loss_func(output) -> (loss, num_tokens, report)`, so `megatron_patches.loss.ReweightedLoss`
  is used unchanged.

Why the step is Megatron's (DeepSpeed 0.19.8, Megatron-Core 0.16.1), for M micro-batches per
step on DP data-parallel ranks, where `loss_func` gives (L, n) on rank r for micro-batch m:

  Megatron   the schedule back-propagates L/n/M (`forward_step_calc_loss`); DDP sums over
             the DP ranks and scales by 1/DP                      ->  (1/DP) Σ_r Σ_m ∇L/(n·M)
  DeepSpeed  `forward_backward` back-propagates L/n through `engine.backward`, which divides
             by gradient_accumulation_steps = M (scale_wrt_gas; once: the output hook of
             `engine.forward` leaves alone a graph that `engine.backward` scaled); ZeRO-1/2
             (`gradient_reduction_w_predivide`, `average_tensor`), ZeRO-3
             (`__avg_scatter_grads`) and stage 0 (`allreduce_bucket`) sum over the mpu's DP
             group and divide by its size (gradient_predivide_factor 1; the sequence-parallel
             divisor is 1, the mpu having no sequence-parallel names)
                                                                  ->  (1/DP) Σ_r Σ_m ∇L/(n·M)

In bf16 both reduce and accumulate the gradient in fp32: Megatron's DDP in fp32 buffers
(`grad_reduce_in_fp32`), DeepSpeed with `data_types.grad_accum_dtype` and
`communication_data_type` fp32 (`launch.engines.deepspeed.deepspeed_config`); the losses the
step back-propagates are fp32 in both (Megatron's cross entropy upcasts the logits).

With `ReweightedLoss` (L = DP · Σ_{i on r} w_i l_i, n = 1) both are (1/M) Σ_m ∇ Σ_{i∈B_m} w_i l_i:
the paper's objective on each global micro-batch B_m, averaged over the step.  Clipping
agrees as well: both multiply by max_norm / (‖g‖ + 1e-6) when that is below 1, ‖g‖ counting
each TP shard once.  tests/distributed/test_deepspeed_parity.py checks all of it against Megatron's engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


class MegatronMPU:
    """Megatron-Core's tensor- and data-parallel groups under the names DeepSpeed asks for.

    DeepSpeed's "model parallel" group is the one that shards parameters: here the
    tensor-parallel group.  Pipeline and context parallelism are refused because DeepSpeed
    would neither schedule the stages nor average gradients over the CP ranks.  Sequence-
    parallel names (DeepSpeed's Ulysses) are deliberately absent: DeepSpeed would divide its
    data-parallel world size by them.
    """

    def __init__(self):
        if ps.get_pipeline_model_parallel_world_size() != 1 or ps.get_context_parallel_world_size() != 1:
            raise ValueError(
                "DeepSpeed runs only with pipeline and context parallel size 1: set parallel.pp=1"
                " and parallel.cp=1, or use engine=megatron"
            )

    # Tensor parallelism, under its current and its older DeepSpeed names.
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_src_rank = staticmethod(ps.get_tensor_model_parallel_src_rank)
    get_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)

    # A single pipeline stage: DeepSpeed asks for the size to know it has nothing to do.
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(ps.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)

    # Data parallelism without CP (CP is 1): the group ZeRO partitions and averages over.
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)

    @staticmethod
    def get_data_parallel_group_ranks() -> list[int]:
        return dist.get_process_group_ranks(ps.get_data_parallel_group())


def optimizer_param_groups(model: torch.nn.Module) -> list[dict]:
    """Megatron's parameter groups: no weight decay on biases and 1-D parameters (norms).

    `wd_mult` is what Megatron's `OptimizerParamScheduler` multiplies the weight decay by,
    so the same scheduler drives a plain torch optimizer exactly as Megatron's.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.dim() == 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}]


def forward_backward(
    engine,
    forward_step_func: Callable,
    data_iterator: Iterator,
    num_microbatches: int,
    forward_only: bool = False,
) -> list[dict]:
    """Megatron's `forward_backward_func` on a DeepSpeed engine (one pipeline stage).

    Returns the loss reports of the micro-batches.  The caller then calls `engine.step()`
    once, as it would call Megatron's `optimizer.step()`; this needs the engine configured
    with `"managed_gradient_accumulation": false` and `gradient_accumulation_steps` equal to
    `num_microbatches` (the engine divides every backward by it).
    """
    if not forward_only and (
        engine.managed_gradient_accumulation() or engine.gradient_accumulation_steps() != num_microbatches
    ):
        raise ValueError(
            f"a step of {num_microbatches} micro-batches needs the DeepSpeed config to set"
            f' "managed_gradient_accumulation": false and "gradient_accumulation_steps": {num_microbatches}'
            f" (got {engine.managed_gradient_accumulation()} and {engine.gradient_accumulation_steps()}):"
            " the engine divides every backward by the latter, and only then does step() end the accumulation"
        )
    reports = []
    for _ in range(num_microbatches):
        output, loss_func = forward_step_func(data_iterator, engine)
        loss, num_tokens, report = loss_func(output)
        if not forward_only:
            engine.backward(loss / torch.clamp(num_tokens, min=1))  # as Megatron's schedule
        reports.append(report)
    return reports
