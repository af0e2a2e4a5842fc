"""What a model family owns, and the arithmetic of Megatron-Core's GPTModel that families share.

A family is one architecture (GPT-2 style, Llama style, ...) built as a Megatron-Core
`GPTModel`. It alone says how its `ModelConfig` becomes a TransformerConfig and a layer spec,
how many parameters and FLOPs the model has, which activations a layer keeps for the
backward pass, and how its weights map to a Hugging Face model. Megatron-Core is imported
inside the methods that build modules, so the config and the dry run stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from launch.config import ModelConfig


class ParameterCount(NamedTuple):
    """Parameters of a Megatron-Core GPTModel, counted once (tied weights once)."""

    word_embedding: int  # padded vocabulary x hidden
    position_embedding: int  # 0 with rotary embeddings
    per_layer: int
    final_norm: int
    output: int  # 0 when the output layer shares the word embeddings
    num_layers: int

    @property
    def total(self) -> int:
        return (
            self.word_embedding
            + self.position_embedding
            + self.num_layers * self.per_layer
            + self.final_norm
            + self.output
        )


class ActivationBytes(NamedTuple):
    """Bytes one layer keeps per token for the backward pass in bf16 (fp32 keeps twice as much):
    the tensors autograd saves, as `tests/distributed/test_memory.py` counts them on a real layer,
    with flash (fused) attention: SDPA on a GPU or Transformer Engine's."""

    replicated: float  # whole on every TP rank unless sequence parallelism splits it too
    sharded: float  # split over the tensor-parallel ranks
    attention_core: float  # the part of `sharded` selective recomputation drops


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation: GPT-2's `gelu_new` and Megatron's fused bias-GELU kernel."""
    return F.gelu(x, approximate="tanh")


def activation_name(config) -> str:
    """The MLP activation a TransformerConfig computes: swiglu, gelu (exact erf) or gelu_tanh."""
    if config.gated_linear_unit and config.activation_func is F.silu:
        return "swiglu"
    if not config.gated_linear_unit and config.activation_func is F.gelu:
        # Megatron's fused bias-GELU is the tanh approximation of the F.gelu it is given.
        fused = config.bias_activation_fusion and config.add_bias_linear
        return "gelu_tanh" if fused else "gelu"
    if not config.gated_linear_unit and config.activation_func is gelu_tanh:
        return "gelu_tanh"
    gated = "gated " if config.gated_linear_unit else ""
    return gated + getattr(config.activation_func, "__name__", str(config.activation_func))


class ModelFamily:
    """One architecture, everything that depends on it. A family module of `launch.models`
    defines `FAMILY`, an instance of a subclass; see `launch/models/gpt2.py`."""

    name: str  # the `model.family` value
    # The ModelConfig fields whose values make a model of this family.
    signature: dict[str, str]
    hf_name: str  # the Hugging Face architecture, as refusals name it

    def describe(self) -> str:
        return f"{self.name} ({', '.join(f'{k}={v}' for k, v in self.signature.items())})"

    # ---- Megatron-Core model -----------------------------------------------------------

    def transformer_config_fields(self, model: ModelConfig, *, gpu: bool, te: bool) -> dict[str, Any]:
        """The TransformerConfig fields this family decides (normalization, MLP, its fusions);
        `te`: Transformer Engine is installed."""
        raise NotImplementedError

    def layer_spec(self, model: ModelConfig, *, transformer_engine: bool):
        from megatron_patches.specs import gpt_layer_spec

        return gpt_layer_spec(normalization=self.signature["normalization"], use_transformer_engine=transformer_engine)

    # ---- arithmetic ----------------------------------------------------------------------

    def count_parameters(self, model: ModelConfig, padded_vocab_size: int) -> ParameterCount:
        raise NotImplementedError

    def flops_per_token(self, model: ModelConfig, padded_vocab_size: int) -> float:
        """Training FLOPs per token (launch/throughput.py says which are counted)."""
        raise NotImplementedError

    def activation_bytes(self, model: ModelConfig, *, gpu: bool = True) -> ActivationBytes:
        """Per layer and token, with the fusions a run on a GPU (or the CPU) has."""
        raise NotImplementedError

    # ---- Hugging Face ----------------------------------------------------------------------

    def hf_problems(self, gpt_model) -> list[str]:
        """What keeps this family's Hugging Face class from computing what `gpt_model` computes."""
        raise NotImplementedError

    def hf_model(self, gpt_model, state: dict[str, torch.Tensor], bos_id: int | None, eos_id: int | None):
        """The Hugging Face model (random weights) and its state dict from Megatron's `state`,
        the output layer aside."""
        raise NotImplementedError


# ---- the Megatron-Core GPTModel arithmetic families share -----------------------------------


def head_dim(model: ModelConfig) -> int:
    return model.hidden_size // model.num_attention_heads


def qkv_width(model: ModelConfig) -> int:
    """Rows of the fused QKV projection: a query per head, a key and a value per K/V group."""
    return head_dim(model) * (model.num_attention_heads + 2 * model.num_query_groups)


def attention_parameters(model: ModelConfig) -> int:
    bias = int(model.add_bias_linear)
    qkv, hidden = qkv_width(model), model.hidden_size
    projection = model.num_attention_heads * head_dim(model) * hidden
    return hidden * qkv + bias * qkv + projection + bias * hidden


def mlp_parameters(model: ModelConfig, fc1_width: int) -> int:
    bias = int(model.add_bias_linear)
    hidden, ffn = model.hidden_size, model.ffn_hidden_size
    return hidden * fc1_width + bias * fc1_width + ffn * hidden + bias * hidden


def dense_flops_per_token(model: ModelConfig, mlp_weights: int, padded_vocab_size: int) -> float:
    """6 x the weights that multiply activations (every layer's and the output layer's, tied or
    not) + 12 L h s for the attention scores and their product with the values."""
    projection = model.num_attention_heads * head_dim(model) * model.hidden_size
    per_layer = model.hidden_size * qkv_width(model) + projection + mlp_weights
    matmul_weights = model.num_layers * per_layer + padded_vocab_size * model.hidden_size
    return 6 * matmul_weights + 12 * model.num_layers * model.hidden_size * model.seq_length


def norm_and_linear_bytes(model: ModelConfig, *, gpu: bool) -> float:
    """A norm and the linear layer it feeds keep the norm's input and output (the linear's input);
    torch's RMSNorm off a GPU is composed of elementwise operations and also keeps the input
    normalised before the weight."""
    composite = model.normalization == "RMSNorm" and not gpu
    return 2 * model.hidden_size * (3 if composite else 2)


def dropout_mask_bytes(model: ModelConfig) -> float:
    """The residual branch's dropout keeps a mask of a byte per channel, only when it drops."""
    return model.hidden_size if model.hidden_dropout > 0 else 0


def attention_activation_bytes(model: ModelConfig, *, gpu: bool) -> ActivationBytes:
    """The attention half of a layer. Whole: its norm and the QKV input, the dropout mask. Split:
    the QKV output (the core keeps V as a view of it, and Q and K too without RoPE), RoPE's rotated
    Q and K, the core's output (the projection's input, a view of it) and the core's softmax
    statistics (4 bytes a head), which alone selective recomputation drops: flash attention
    keeps no scores, and its inputs and output stay for the recomputation and the projection."""
    h = model.hidden_size
    kv = model.num_query_groups * head_dim(model)
    rotated = 2 * (h + kv) if model.position_embedding == "rope" else 0
    core = 4 * model.num_attention_heads
    return ActivationBytes(
        replicated=norm_and_linear_bytes(model, gpu=gpu) + dropout_mask_bytes(model),
        sharded=2 * (h + 2 * kv) + rotated + 2 * h + core,
        attention_core=core,
    )


def with_mlp(attention: ActivationBytes, model: ModelConfig, mlp_bytes: float, *, gpu: bool) -> ActivationBytes:
    """A whole layer: the attention half and an MLP that keeps, whole, its norm and fc1's input and
    the dropout mask, and `mlp_bytes` split over TP."""
    replicated = norm_and_linear_bytes(model, gpu=gpu) + dropout_mask_bytes(model)
    return attention._replace(replicated=attention.replicated + replicated, sharded=attention.sharded + mlp_bytes)


def split_qkv(weight: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's fused QKV rows, grouped per query group as [q heads of the group, k, v],
    into separate Q, K and V (rows in head order); works for weights and biases alike."""
    groups = config.num_query_groups or config.num_attention_heads
    per_group = config.num_attention_heads // groups
    rest = weight.shape[1:]
    grouped = weight.reshape(groups, per_group + 2, config.kv_channels, *rest)
    q = grouped[:, :per_group].reshape(config.num_attention_heads * config.kv_channels, *rest)
    k = grouped[:, per_group].reshape(groups * config.kv_channels, *rest)
    v = grouped[:, per_group + 1].reshape(groups * config.kv_channels, *rest)
    return q, k, v
