"""What a config would do, without a GPU: layout, parameter count, memory, data; on a GPU node
also whether the memory estimate fits its GPU.

Run before a cluster job (`python -m launch.pretrain --config C --dry-run --world-size N`)
so an impossible layout or a missing file costs seconds, not a queue wait.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch

from launch import sources
from launch.config import Config, ConfigError, validate
from launch.engines import engine_class
from launch.model import gradient_accumulation_fusion
from launch.models import family_of
from launch.models.family import ParameterCount
from megatron_patches.device import on_gpu
from megatron_patches.specs import transformer_engine_available


def _size(num_bytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes / 2**10:.2f} KiB"


def count_parameters(cfg: Config, vocab_size: int) -> ParameterCount:
    """Exact count for the GPTModel of this config, as its family builds it."""
    return family_of(cfg.model).count_parameters(cfg.model, sources.padded_vocab_size(cfg, vocab_size))


class MemoryEstimate(NamedTuple):
    """Bytes per GPU on the largest pipeline stage."""

    weights: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return sum(self)


def memory_assumptions(cfg: Config, world_size: int) -> str:
    """What the memory estimate assumes for this config: its precision, the engine's sharding."""
    m = cfg.model
    family = family_of(m)
    activations = family.activation_bytes(m)
    engine = engine_class(cfg.engine)
    dp = cfg.parallel.data_parallel_size(world_size)
    state, whole = engine.state_bytes(cfg, dp), engine.state_bytes(cfg, 1)
    sharded = [name for name, share, full in zip(state._fields, state, whole) if share < full]
    fp32 = m.precision == "fp32"
    precision = m.precision
    if precision == "auto":  # estimated as on a GPU, where a cluster job runs
        precision = "bf16 (precision auto: bf16 on a GPU, fp32 on a CPU)"
    return (
        f"{precision}; bytes per parameter: weights {state.weights:g},"
        f" gradients {state.grads:g} (accumulated in fp32), optimizer {state.optimizer:g}"
        f" ({'Adam m, v' if fp32 else 'fp32 master, Adam m, v'})"
        + (f", {' and '.join(sharded)} sharded over DP {dp}" if sharded else "")
        + f"; activations per layer and token {activations.replicated:g} + {activations.sharded:g}/TP"
        f" bytes in {'fp32' if fp32 else 'bf16'}, all /TP with sequence parallelism ({family.name} layer"
        " on a GPU: its fusions, flash attention), "
        + _describe_recompute(m)
        + ", for min(PP, micro-batches) micro-batches, plus fp32 logits"
    )


def _describe_recompute(m) -> str:
    if m.recompute_granularity is None:
        return "no recomputation"
    if m.recompute_granularity == "selective":
        return "selective recomputation (the attention core)"
    return (
        f"full recomputation ({m.recompute_method}, {m.recompute_num_layers} layers: a recomputed layer"
        " keeps only its input)"
    )


def estimate_memory(cfg: Config, params: ParameterCount, world_size: int, *, gpu: bool = True) -> MemoryEstimate:
    """The estimate for a run on GPUs (with their fusions), or on CPUs with `gpu=False`."""
    m, par = cfg.model, cfg.parallel
    dp = par.data_parallel_size(world_size)
    layers_per_stage = m.num_layers // par.pp
    if par.pp == 1:
        stage = params.total
    else:  # Megatron keeps a copy of tied word embeddings on the last stage
        first = params.word_embedding + params.position_embedding
        last = params.final_norm + (params.output or params.word_embedding)
        stage = layers_per_stage * params.per_layer + max(first, last)
    stage_params = stage / par.tp
    state = engine_class(cfg.engine).state_bytes(cfg, dp)

    fp32 = m.precision == "fp32"  # "auto" is estimated as on GPU: bf16
    micro_batches = cfg.train.micro_batches_per_step(dp)
    tokens = m.seq_length // par.cp * cfg.train.micro_batch_size
    activations = family_of(m).activation_bytes(m, gpu=gpu)
    if m.recompute_granularity == "selective":
        activations = activations._replace(sharded=activations.sharded - activations.attention_core)
    # Without sequence parallelism norms and dropouts stay whole on every TP rank.
    split = par.tp if par.sequence_parallel else 1
    bytes_per_token = activations.replicated / split + activations.sharded / par.tp
    scale = tokens * (2 if fp32 else 1)
    layer, layer_input = bytes_per_token * scale, 2 * m.hidden_size / split * scale
    kept, recomputed = _stage_activations(m, layers_per_stage, layer, layer_input)
    logits = 4 * tokens * (params.word_embedding // m.hidden_size) / par.tp
    in_flight = min(par.pp, micro_batches)
    return MemoryEstimate(
        weights=stage_params * state.weights,
        grads=stage_params * state.grads,
        optimizer=stage_params * state.optimizer,
        activations=in_flight * kept + recomputed + logits,
    )


def _stage_activations(m, layers: int, layer: float, layer_input: float) -> tuple[float, float]:
    """What one micro-batch keeps on a stage of `layers` layers, and the most its backward pass
    recomputes at once. Full recomputation keeps a checkpointed layer's input only: `uniform`
    checkpoints chunks of recompute_num_layers layers and recomputes one chunk at a time; `block`
    checkpoints the stage's first recompute_num_layers layers and recomputes them one by one."""
    if m.recompute_granularity != "full":
        return layers * layer, 0.0
    if m.recompute_method is None or (m.recompute_num_layers or 0) < 1:
        raise ConfigError(
            "model.recompute_granularity=full needs model.recompute_method (uniform or block) and"
            " model.recompute_num_layers >= 1, e.g. uniform and 1"
        )
    chunk = min(m.recompute_num_layers, layers)
    if m.recompute_method == "uniform":
        return math.ceil(layers / chunk) * layer_input, chunk * layer
    return chunk * layer_input + (layers - chunk) * layer, layer


def dry_run(
    cfg: Config, world_size: int, check_data: bool = True, gpu_memory_gib: float | None = None
) -> tuple[str, bool]:
    """A readable account of the run ending in its verdict, and whether everything checked holds;
    raises ConfigError for a layout that cannot run. The layout and memory verdicts stand apart
    from the data files, which `check_data=False` skips (a layout checked before the data exists).
    The memory estimate is checked against a GPU of `gpu_memory_gib`, else this machine's GPU."""
    validate(cfg, world_size)
    lines = describe_run(cfg, world_size)
    lines.append(
        f"layout: OK for {world_size} process{'es' if world_size > 1 else ''}"
        " (parallel sizes, heads, layers, batch sizes and settings)"
    )
    memory, fits = _memory_verdict(cfg, world_size, gpu_memory_gib)
    lines.append(memory)
    if not check_data:
        lines.append("data: not checked (--no-data)")
        return "\n".join(lines), fits
    problems = sources.file_problems(cfg)
    if problems:
        lines.append(f"data problems: {len(problems)} (--no-data checks the layout alone)")
        lines += [f"  - {problem}" for problem in problems]
    else:
        lines.append("data problems: none, ready to run")
    return "\n".join(lines), fits and not problems


def dry_run_report(cfg: Config, world_size: int, check_data: bool = True) -> str:
    """The account of `dry_run` alone."""
    return dry_run(cfg, world_size, check_data)[0]


# The share of a GPU's memory the estimate may take; the rest is for what it leaves out: the CUDA
# context, NCCL's buffers, kernels' workspaces, the allocator's fragmentation.
GPU_MEMORY_SHARE = 0.9


def _memory_verdict(cfg: Config, world_size: int, gpu_memory_gib: float | None) -> tuple[str, bool]:
    """The memory estimate against the named GPU memory or this machine's GPU: the line, and
    whether it fits."""
    if gpu_memory_gib is not None:
        capacity, of_the_gpu = gpu_memory_gib * 2**30, f"{gpu_memory_gib:g} GiB of GPU memory (--gpu-memory-gib)"
    elif on_gpu():
        gpu = torch.cuda.get_device_properties(torch.cuda.current_device())
        capacity, of_the_gpu = gpu.total_memory, f"the {_size(gpu.total_memory)} of this machine's {gpu.name}"
    else:
        return "memory: not checked, no GPU here (--gpu-memory-gib G checks it against a GPU of G GiB)", True
    try:
        vocab = sources.vocab_size(cfg)
    except ConfigError:
        return "memory: not checked, the vocabulary is unknown (see vocab above)", True
    need = estimate_memory(cfg, count_parameters(cfg, vocab), world_size).total
    share = f"{need / capacity:.0%} of {of_the_gpu}"
    if need > GPU_MEMORY_SHARE * capacity:
        return (
            f"memory: ~{_size(need)} per GPU is {share}, over the {GPU_MEMORY_SHARE:.0%} an estimate may take:"
            " set model.recompute_granularity=full (model.recompute_method, model.recompute_num_layers),"
            " raise parallel.tp or parallel.pp, set parallel.distributed_optimizer=true or lower"
            " train.micro_batch_size",
            False,
        )
    return f"memory: OK, ~{_size(need)} per GPU, {share}", True


def describe_run(cfg: Config, world_size: int) -> list[str]:
    """The lines of the account (layout, batch, model, parameters, memory, reweighting, data);
    also the start-up summary of a training run. For a config `validate` accepted at
    `world_size` (the run validates once per start, before any process group)."""
    m, par, train = cfg.model, cfg.parallel, cfg.train
    dp = par.data_parallel_size(world_size)
    micro_batches = train.micro_batches_per_step(dp)
    lines = [
        f"engine: {cfg.engine}" + (f" (ZeRO stage {cfg.deepspeed.zero_stage})" if cfg.engine == "deepspeed" else ""),
        f"layout: world size {world_size} = TP {par.tp} x PP {par.pp} x CP {par.cp} x DP {dp}"
        f" (sequence_parallel={_yaml(par.sequence_parallel)},"
        f" distributed_optimizer={_yaml(par.distributed_optimizer)})",
        f"performance: {_describe_performance(cfg)}",
        f"batch: global {train.global_batch_size} = micro {train.micro_batch_size} x DP {dp}"
        f" x {micro_batches} micro-batches per step; {train.global_batch_size * m.seq_length:,}"
        f" tokens per step (seq {m.seq_length}); {train.steps:,} steps"
        f" = {train.steps * train.global_batch_size * m.seq_length:,} tokens",
        f"model: {family_of(m).name}, {m.num_layers} layers x {m.hidden_size} hidden, {m.num_attention_heads} heads"
        f" ({m.num_query_groups} K/V groups), ffn {m.ffn_hidden_size} {m.activation},"
        f" {m.normalization}, {m.position_embedding} positions,"
        f" {'untied' if m.untie_embeddings else 'tied'} embeddings,"
        f" {'with' if m.add_bias_linear else 'no'} linear biases, precision {m.precision}",
    ]
    try:
        vocab = sources.vocab_size(cfg)
    except ConfigError as error:
        lines.append(f"vocab: unknown, so no parameter count or memory estimate: {error}")
    else:
        source = "model.vocab_size" if m.vocab_size is not None else cfg.data.tokenizer_model
        params = count_parameters(cfg, vocab)
        memory = estimate_memory(cfg, params, world_size)
        lines += [
            f"vocab: {vocab} (from {source}), padded to {sources.padded_vocab_size(cfg, vocab)}"
            + _unused_rows(cfg, vocab),
            f"parameters: {params.total:,} = embeddings {params.word_embedding:,}"
            f" + positions {params.position_embedding:,}"
            f" + {params.num_layers} layers x {params.per_layer:,} + final norm"
            f" {params.final_norm:,} + output layer {params.output:,}",
            f"memory per GPU: ~{_size(memory.total)} = weights {_size(memory.weights)}"
            f" + grads {_size(memory.grads)} + optimizer {_size(memory.optimizer)}"
            f" + activations {_size(memory.activations)}",
            f"  assumptions: {memory_assumptions(cfg, world_size)}",
        ]
    lines.append(
        f"reweighting: {_describe_reweighting(cfg)}; weights normalised over DP x"
        f" micro_batch = {dp * train.micro_batch_size} samples per micro-batch"
    )
    if cfg.logging.weights_every:
        units = f"{dp * train.micro_batch_size} samples"
        if cfg.reweight.unit == "document":
            units = f"the document segments of {units} (at most {cfg.reweight.units_per_row} each)"
        lines.append(
            f"weights log: every {cfg.logging.weights_every} steps, {units}"
            " to RUN/weights/ (python -m launch.tools.report --weights RUN)"
        )
    lines += _describe_data(cfg)
    return lines


def _describe_performance(cfg: Config) -> str:
    """Megatron-LM's performance features as this run sets them, under the config's names."""
    m, par = cfg.model, cfg.parallel
    recompute = {
        None: "no activation recomputation",
        "selective": "selective recomputation (core attention)",
        "full": f"full recomputation ({m.recompute_method}, recompute_num_layers={m.recompute_num_layers})",
    }[m.recompute_granularity]
    reduce = "overlapped with the backward" if par.overlap_grad_reduce else "after the backward"
    gather = ", parameter all-gather overlapped with the forward" if par.overlap_param_gather else ""
    buckets = f"{par.bucket_size:,} parameters" if par.bucket_size else "Megatron's size"
    bucketing = f" in buckets of {buckets}" if par.overlap_grad_reduce else ""
    if par.pp == 1:
        schedule = "no pipeline"
    elif par.virtual_pipeline_size:
        schedule = f"interleaved pipeline, {par.virtual_pipeline_size} model chunks per pipeline rank"
    else:
        schedule = "1F1B pipeline"
    # A dry run on a host without a GPU tells what a GPU with this host's packages would do.
    fusion = gradient_accumulation_fusion(cfg, gpu=True, te=transformer_engine_available())[1]
    where = "" if on_gpu() else " on a GPU with this machine's packages"
    return (
        f"{recompute}; gradient reduction {reduce}{bucketing}{gather}; {schedule};"
        f" gradient accumulation fusion {fusion}{where}; fp8 {m.fp8 or 'off'}"
    )


def _unused_rows(cfg: Config, vocab: int) -> str:
    """A fixed model.vocab_size far above the tokenizer's trains embedding rows no token uses."""
    tokenizer = cfg.data.tokenizer_model
    if cfg.model.vocab_size is None or tokenizer is None or not Path(tokenizer).is_file():
        return ""
    try:
        used = sources.Tokenizer.of(cfg).vocab_size
    except ConfigError:  # a tokenizer without EOS: the data check below names it
        return ""
    if vocab - used < cfg.model.make_vocab_size_divisible_by:
        return ""
    return (
        f"; note: the tokenizer has {used} tokens, so {vocab - used} rows are never used"
        " (model.vocab_size=null fits it)"
    )


def _yaml(flag: bool) -> str:
    return "true" if flag else "false"


def _describe_reweighting(cfg: Config) -> str:
    rw = cfg.reweight
    if rw.strategy == "uniform":
        return "uniform (the ordinary Megatron loss)"
    target = f"{rw.strategy}, temperature {rw.temperature}, delta {rw.delta}"
    if rw.unit == "document":
        target += f", per document (at most {rw.max_segments_per_sample} a sample)"
    if rw.warmup_steps == 0 and rw.anneal_steps == 0:
        return target
    start = "uniform weights" if rw.warmup_temperature is None else f"temperature {rw.warmup_temperature}"
    anneal = f", then annealed over {rw.anneal_steps} steps" if rw.anneal_steps else ""
    return f"{target}; {start} for the first {rw.warmup_steps} steps{anneal}"


def _describe_data(cfg: Config) -> list[str]:
    data = cfg.data
    lines = []
    for name, path in (("train", data.blend), ("valid", data.valid_blend)):
        if path is None:
            continue
        try:
            blend = sources.read_blend(path, data.weights if name == "train" else None)
        except ConfigError:
            lines.append(f"data {name}: {path} (not readable)")
            continue
        mix = ", ".join(f"{d} {w:.3f}" for d, w in zip(blend.domains, blend.weights))
        start = " (the starting point of data.mixing)" if name == "train" and data.mixing != "fixed" else ""
        lines.append(f"data {name}: {path}: {mix}{start}")
    if data.prefixes is not None:
        weights = data.weights or "by token count"
        lines.append(f"data train: {len(data.prefixes)} prefixes, weights {weights}")
    if data.valid_blend is None:
        lines.append(f"data valid: split {data.split} of the training data")
    lines.append(f"data mixing: {_describe_mixing(data)}")
    flags = ("reset_attention_mask", "reset_position_ids", "eod_mask_loss")
    kept_apart = [f"data.{key}" for key in flags if getattr(data, key)]
    if kept_apart:
        lines.append("documents kept apart: " + ", ".join(kept_apart))
    lines.append(f"tokenizer: {data.tokenizer_model}")
    return lines


def _describe_mixing(data) -> str:
    if data.mixing == "fixed":
        return "fixed (Megatron's blend, the same weights for the whole run)"
    exploration = (
        "ODM's schedule min(1, sqrt(K ln K / t))" if data.mixing_exploration is None else str(data.mixing_exploration)
    )
    every = "every step" if data.mixing_update_interval == 1 else f"every {data.mixing_update_interval} steps"
    return (
        f"{data.mixing} (EXP3 over domains rewarded by their training loss), updated {every};"
        f" uniform share {exploration}; reward smoothing {data.mixing_smoothing}"
    )
