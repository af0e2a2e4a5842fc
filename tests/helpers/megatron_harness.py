"""A tiny Megatron-Core GPT under any TP/PP/CP/DP layout, with its parameters in one global naming.

Layout runs load the same full weights and report full gradients, so they can be compared
with a single-process reference tensor by tensor.
"""

from __future__ import annotations

import re
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_batch_on_this_cp_rank

from launch.config import Config, ModelConfig, ParallelConfig
from launch.model import build_model

VOCAB, SEQ, LAYERS, HIDDEN, HEADS = 128, 32, 4, 64, 4
GLOBAL_MICRO_BATCH = 4


def tiny_config() -> Config:
    """The tiny GPT-2-style model's run config, under this process's parallel layout."""
    model = ModelConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, seq_length=SEQ,
        vocab_size=VOCAB, precision="fp32", transformer_impl="local",
    )  # fmt: skip
    parallel = ParallelConfig(
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        cp=ps.get_context_parallel_world_size(),
    )
    return Config(model=model, parallel=parallel)


def tiny_gpt() -> GPTModel:
    """The model as a run builds it (`launch.model.build_model`)."""
    return build_model(tiny_config(), VOCAB)


def global_batch(seed: int = 0, ragged: bool = True) -> dict[str, torch.Tensor]:
    """One global micro-batch; ragged: random masked tokens, a half-masked and a fully masked sample."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (GLOBAL_MICRO_BATCH, SEQ + 1), generator=g)
    loss_mask = torch.ones(GLOBAL_MICRO_BATCH, SEQ)
    if ragged:
        loss_mask = (torch.rand(GLOBAL_MICRO_BATCH, SEQ, generator=g) > 0.1).float()
        loss_mask[1, SEQ // 2 :] = 0
        loss_mask[2] = 0
    return dict(
        tokens=tokens[:, :-1],
        labels=tokens[:, 1:],
        loss_mask=loss_mask,
        position_ids=torch.arange(SEQ).expand(GLOBAL_MICRO_BATCH, SEQ),
        domains=torch.arange(GLOBAL_MICRO_BATCH) % 2,
    )


def numpy_weights(losses, counts, strategy, temperature, delta=1.0):
    """The README's weights ("The method, exactly") with the token prior π_i ∝ n_i, written
    independently in NumPy."""
    valid = (counts > 0) & np.isfinite(losses)
    lv = losses[valid]
    x = (2 * delta * lv - delta * (lv.max() + lv.min())) / max(lv.max() - lv.min(), 1e-6)
    f = {"uniform": np.zeros_like(x), "linupper": np.minimum(x + delta, delta)}[strategy]
    p = counts[valid] * np.exp((f - f.max()) / temperature)
    weights = np.zeros_like(losses)
    weights[valid] = p / p.sum()
    return weights


# One value per sample: not cut by the CP split.
PER_SAMPLE = ("domains", "unit_counts")


def local_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This DP rank's samples, then this CP rank's sequence chunks (Megatron's load-balanced split)."""
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    size = GLOBAL_MICRO_BATCH // dp
    local = {k: v[rank * size : (rank + 1) * size] for k, v in batch.items()}
    per_sample = {k: local.pop(k) for k in PER_SAMPLE if k in local}
    return get_batch_on_this_cp_rank(local) | per_sample


def _global_name(name: str, layer_offset: int) -> str:
    return re.sub(r"decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.", name)


def _named_local_parameters(model: GPTModel):
    """(global name, parameter), skipping the last stage's copy of tied embeddings."""
    offset = model.decoder.layers[0].layer_number - 1
    for name, param in model.named_parameters():
        if name == "output_layer.weight" and model.share_embeddings_and_output_weights and not model.pre_process:
            continue
        yield _global_name(name, offset), param


def _tp_dim(param) -> int | None:
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def load_full_state(model: GPTModel, full: dict[str, torch.Tensor]) -> None:
    """Copy this rank's TP shard of every full tensor into the model."""
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, param in _named_local_parameters(model):
            value, dim = full[name], _tp_dim(param)
            if dim is not None:
                value = value.chunk(tp, dim=dim)[rank]
            param.copy_(value)
        if model.share_embeddings_and_output_weights and model.post_process and not model.pre_process:
            value = full["embedding.word_embeddings.weight"].chunk(tp, dim=0)[rank]
            model.output_layer.weight.copy_(value)


def full_gradients(model: GPTModel, grad_of=lambda p: p.main_grad) -> dict[str, torch.Tensor]:
    """Every local parameter's gradient, TP shards gathered into the full tensor."""
    group = ps.get_tensor_model_parallel_group()
    out = {}
    for name, param in _named_local_parameters(model):
        grad, dim = grad_of(param).detach().clone(), _tp_dim(param)
        if dim is not None:
            parts = [torch.empty_like(grad) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, grad.contiguous(), group=group)
            grad = torch.cat(parts, dim=dim)
        out[name] = grad
    return out


def forward_step(loss_fn, batches, model):
    """Megatron `forward_step_func`: per-token losses and the loss closure (with the batch's units, if any)."""
    batch = next(batches)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    units = {key: batch[key] for key in ("unit_ids", "unit_counts") if key in batch}
    return output, partial(loss_fn, batch["loss_mask"], batch["domains"], **units)


def layout_stepper(full_state: dict[str, torch.Tensor]):
    """This rank's part of the tiny GPT, loaded from `full_state`, under Megatron's DDP;
    `step(loss_fn, batches)` takes global micro-batches through Megatron's schedule and
    returns (loss reports, full gradients)."""
    model = tiny_gpt()
    load_full_state(model, full_state)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    model.config.finalize_model_grads_func = finalize_model_grads

    def step(loss_fn, batches):
        ddp.zero_grad_buffer()
        reports = get_forward_backward_func()(
            forward_step_func=partial(forward_step, loss_fn),
            data_iterator=iter([local_batch(b) for b in batches]),
            model=[ddp],
            num_microbatches=len(batches),
            seq_length=SEQ,
            micro_batch_size=GLOBAL_MICRO_BATCH // ps.get_data_parallel_world_size(),
        )
        return reports, full_gradients(model)

    return step
