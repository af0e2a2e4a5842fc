"""A Megatron-Core GPTModel from the run's model config, as its family (`launch.models`) builds it."""

from __future__ import annotations

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
        # Transformer Engine's linears add weight gradients straight into Megatron DDP's
        # main_grad buffers (DeepSpeed keeps none); the local linears would need apex for it.
        gradient_accumulation_fusion=gpu and te_spec and cfg.engine == "megatron",
        # Only apex's FusedLayerNorm reads persist_layer_norm, and neither layer spec builds it
        # (megatron_patches/specs.py); torch's norms refuse the flag.
        persist_layer_norm=False,
        **family_of(m).transformer_config_fields(m, gpu=gpu, te=te),
    )


def build_model(cfg: Config, padded_vocab_size: int) -> GPTModel:
    """This pipeline stage's part of the model, on the GPU when there is one; the embedding
    has `padded_vocab_size` rows (`launch.sources.padded_vocab_size`)."""
    gpu, te = on_gpu(), transformer_engine_available()
    model = GPTModel(
        config=transformer_config(cfg, gpu=gpu, te=te),
        transformer_layer_spec=family_of(cfg.model).layer_spec(
            cfg.model, transformer_engine=use_transformer_engine(cfg, gpu=gpu, te=te)
        ),
        vocab_size=padded_vocab_size,
        max_sequence_length=cfg.model.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not cfg.model.untie_embeddings,
        position_embedding_type=cfg.model.position_embedding,
        rotary_base=cfg.model.rotary_base,
    )
    initialize_weights(model, cfg.train.seed)  # the same weights under every parallel layout
    return model.cuda() if on_gpu() else model
