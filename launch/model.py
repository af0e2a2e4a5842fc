"""A Megatron-Core GPTModel from the run's model config, as its family (`launch.models`) builds it."""

from __future__ import annotations

import importlib.util

import torch
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from launch.config import Config, ConfigError
from launch.models import family_of
from megatron_patches.device import on_gpu
from megatron_patches.init import initialize_weights
from megatron_patches.specs import transformer_engine_available


def use_bf16(cfg: Config, gpu: bool | None = None) -> bool:
    """bf16 for `precision: auto` on a GPU; `gpu` = None: whether this process has one."""
    gpu = on_gpu() if gpu is None else gpu
    return cfg.model.precision == "bf16" or (cfg.model.precision == "auto" and gpu)


def use_transformer_engine(cfg: Config, *, gpu: bool, te: bool) -> bool:
    """Transformer Engine's layer spec; `te`: Transformer Engine is installed."""
    impl = cfg.model.transformer_impl
    if impl == "auto":
        return gpu and te
    return impl == "transformer_engine"


def gradient_accumulation_fusion(cfg: Config, *, gpu: bool, te: bool) -> tuple[bool, str]:
    """Whether weight gradients go straight into Megatron DDP's fp32 buffers, and why (not)."""
    if not cfg.model.gradient_accumulation_fusion:
        return False, "off (model.gradient_accumulation_fusion=false)"
    if cfg.engine != "megatron":
        return False, "off (DeepSpeed keeps no fp32 gradient buffers for it)"
    if not gpu:
        return False, "off (its kernels are CUDA's; none on a CPU)"
    if use_transformer_engine(cfg, gpu=gpu, te=te):
        return True, "on (Transformer Engine's linears)"
    if importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None:
        return True, "on (apex's fused_weight_gradient_mlp_cuda)"
    return False, "off (the local linears need apex's fused_weight_gradient_mlp_cuda, not installed)"


def transformer_config(cfg: Config, *, gpu: bool, te: bool) -> TransformerConfig:
    """The config of a run on a GPU or the CPU, with Transformer Engine installed or not: every
    fusion with a kernel on a GPU, none on the CPU."""
    m, p = cfg.model, cfg.parallel
    bf16 = use_bf16(cfg, gpu)
    dtype = torch.bfloat16 if bf16 else torch.float32
    te_spec = use_transformer_engine(cfg, gpu=gpu, te=te)
    if p.sequence_parallel and not te_spec:
        raise ConfigError(
            "parallel.sequence_parallel=true needs Transformer Engine's layers (the local layer's torch"
            " norms refuse it): run where transformer_engine is installed or set parallel.sequence_parallel=false"
        )
    if m.fp8 is not None and not te_spec:
        why = "no GPU here" if not gpu else "transformer_engine not installed" if not te else "transformer_impl=local"
        raise ConfigError(
            f"model.fp8={m.fp8} runs through Transformer Engine's layers, and this run has none ({why}):"
            " run on a GPU with transformer_engine installed, or set model.fp8=null"
        )
    if cfg.data.reset_attention_mask and te_spec:
        raise ConfigError(
            "data.reset_attention_mask=true needs the local layer's SDPA attention (Transformer Engine's is"
            " not given the document mask): set model.transformer_impl=local"
        )
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        context_parallel_size=p.cp,
        sequence_parallel=p.sequence_parallel,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        use_cpu_initialization=not gpu,
        bias_dropout_fusion=gpu,
        masked_softmax_fusion=gpu,
        cross_entropy_loss_fusion=gpu,
        gradient_accumulation_fusion=gradient_accumulation_fusion(cfg, gpu=gpu, te=te)[0],
        recompute_granularity=m.recompute_granularity,
        recompute_method=m.recompute_method,
        recompute_num_layers=m.recompute_num_layers,
        fp8=m.fp8,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_size,
        # As Megatron-LM for the interleaved schedule: batched sends and receives would pair a
        # forward and a backward tensor between the same two ranks at PP=2, and swap them.
        overlap_p2p_comm=p.virtual_pipeline_size is not None,
        batch_p2p_comm=p.virtual_pipeline_size is None,
        # Only apex's FusedLayerNorm reads persist_layer_norm, and neither layer spec builds it
        # (megatron_patches/specs.py); torch's norms refuse the flag.
        persist_layer_norm=False,
        **family_of(m).transformer_config_fields(m, gpu=gpu, te=te),
    )


def build_model_chunks(cfg: Config, padded_vocab_size: int) -> list[GPTModel]:
    """This pipeline rank's model chunks: one, or `parallel.virtual_pipeline_size` of them for
    the interleaved schedule (chunk i holds the layers of virtual stage i x PP + rank)."""
    if cfg.parallel.virtual_pipeline_size is None:
        return [build_model(cfg, padded_vocab_size)]
    return [build_model(cfg, padded_vocab_size, vp_stage) for vp_stage in range(cfg.parallel.virtual_pipeline_size)]


def build_model(cfg: Config, padded_vocab_size: int, vp_stage: int | None = None) -> GPTModel:
    """This pipeline stage's part of the model (with the interleaved schedule, its model chunk
    `vp_stage`), on the GPU when there is one; the embedding has `padded_vocab_size` rows
    (`launch.sources.padded_vocab_size`)."""
    gpu, te = on_gpu(), transformer_engine_available()
    model = GPTModel(
        config=transformer_config(cfg, gpu=gpu, te=te),
        transformer_layer_spec=family_of(cfg.model).layer_spec(
            cfg.model, transformer_engine=use_transformer_engine(cfg, gpu=gpu, te=te)
        ),
        vocab_size=padded_vocab_size,
        max_sequence_length=cfg.model.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=not cfg.model.untie_embeddings,
        position_embedding_type=cfg.model.position_embedding,
        rotary_base=cfg.model.rotary_base,
        vp_stage=vp_stage,
    )
    initialize_weights(model, cfg.train.seed)  # the same weights under every parallel layout
    return model.cuda() if on_gpu() else model
