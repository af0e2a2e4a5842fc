"""Layer specs: Megatron-Core's own, with SDPA core attention where Transformer Engine is absent."""

from __future__ import annotations

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from megatron_patches.attention import SDPAttention


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def gpt_layer_spec(*, normalization: str = "LayerNorm", use_transformer_engine: bool = False) -> ModuleSpec:
    """Transformer Engine's fused layer when asked for, else the local layer with SDPA attention
    and torch's norms, whether apex is installed or not (Megatron would pick apex's LayerNorm)."""
    if use_transformer_engine:
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization=normalization)
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    spec.submodules.input_layernorm = WrappedTorchNorm
    spec.submodules.pre_mlp_layernorm = WrappedTorchNorm
    return spec
