"""A Megatron-Core GPTModel from the run's model config (GPT-2 or Llama style)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from launch.config import Config
from megatron_patches.device import on_gpu
from megatron_patches.init import initialize_weights
from megatron_patches.specs import gpt_layer_spec, transformer_engine_available


def use_bf16(cfg: Config) -> bool:
    return cfg.model.precision == "bf16" or (cfg.model.precision == "auto" and on_gpu())


def use_transformer_engine(cfg: Config) -> bool:
    impl = cfg.model.transformer_impl
    if impl == "auto":
        return on_gpu() and transformer_engine_available()
    return impl == "transformer_engine"


def transformer_config(cfg: Config) -> TransformerConfig:
    m, p = cfg.model, cfg.parallel
    gpu = on_gpu()
    bf16 = use_bf16(cfg)
    dtype = torch.bfloat16 if bf16 else torch.float32
    swiglu = m.activation == "swiglu"
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        normalization=m.normalization,
        activation_func=F.silu if swiglu else F.gelu,
        gated_linear_unit=swiglu,
        add_bias_linear=m.add_bias_linear,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        context_parallel_size=p.cp,
        sequence_parallel=p.sequence_parallel,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        # CPU: initialise on the host and skip the fused CUDA kernels.
        use_cpu_initialization=not gpu,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=gpu and not swiglu,
        bias_dropout_fusion=gpu,
        masked_softmax_fusion=gpu,
        persist_layer_norm=gpu,
        apply_rope_fusion=False,
    )


def build_model(cfg: Config, padded_vocab_size: int) -> GPTModel:
    """This pipeline stage's part of the model, on the GPU when there is one; the embedding
    has `padded_vocab_size` rows (`launch.sources.padded_vocab_size`)."""
    model = GPTModel(
        config=transformer_config(cfg),
        transformer_layer_spec=gpt_layer_spec(
            normalization=cfg.model.normalization, use_transformer_engine=use_transformer_engine(cfg)
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
