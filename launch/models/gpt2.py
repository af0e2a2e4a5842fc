"""GPT-2 style: learned positions, LayerNorm, a GELU MLP (tanh approximation), linear biases.

The GELU is GPT-2's own, the tanh approximation, on every device: on a GPU it is Megatron's
fused bias-GELU kernel, which computes that approximation, elsewhere `gelu_tanh`; the export
writes it as Hugging Face's `gelu_new`, so the exported model computes what was trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from launch.models.family import (
    ModelFamily,
    ParameterCount,
    activation_name,
    attention_activation_bytes,
    attention_parameters,
    dense_flops_per_token,
    gelu_tanh,
    mlp_parameters,
    split_qkv,
    with_mlp,
)

# The Hugging Face activation computing each GELU a Megatron GPTModel can compute.
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new"}


class GPT2(ModelFamily):
    name = "gpt2"
    signature = {"position_embedding": "learned_absolute", "normalization": "LayerNorm", "activation": "gelu"}
    hf_name = "GPT-2"

    def transformer_config_fields(self, model, *, gpu, te):
        # Megatron's fused bias-GELU adds fc1's bias, so it needs one.
        fused = gpu and model.add_bias_linear
        return dict(
            normalization="LayerNorm",
            activation_func=F.gelu if fused else gelu_tanh,
            gated_linear_unit=False,
            add_bias_linear=model.add_bias_linear,
            bias_activation_fusion=fused,
        )

    def count_parameters(self, model, padded_vocab_size):
        norm = 2 * model.hidden_size  # LayerNorm has a bias
        return ParameterCount(
            word_embedding=padded_vocab_size * model.hidden_size,
            position_embedding=model.max_position_embeddings * model.hidden_size,
            per_layer=2 * norm + attention_parameters(model) + mlp_parameters(model, model.ffn_hidden_size),
            final_norm=norm,
            output=padded_vocab_size * model.hidden_size if model.untie_embeddings else 0,
            num_layers=model.num_layers,
        )

    def flops_per_token(self, model, padded_vocab_size):
        return dense_flops_per_token(model, 2 * model.hidden_size * model.ffn_hidden_size, padded_vocab_size)

    def activation_bytes(self, model, *, gpu=True):
        # The GELU's input and fc2's input, 2 bytes per FFN channel each, fused or not.
        attention = attention_activation_bytes(model, gpu=gpu)
        return with_mlp(attention, model, 4 * model.ffn_hidden_size, gpu=gpu)

    def hf_problems(self, gpt_model):
        c = gpt_model.config
        problems = []
        if gpt_model.position_embedding_type != "learned_absolute":
            problems.append(
                f"model.position_embedding must be learned_absolute (is {gpt_model.position_embedding_type})"
            )
        if c.normalization != "LayerNorm":
            problems.append(f"model.normalization must be LayerNorm (is {c.normalization})")
        activation = activation_name(c)
        if activation not in HF_ACTIVATIONS:
            problems.append(f"model.activation must be gelu, exact or tanh GELU (is {activation})")
        if c.num_query_groups not in (None, c.num_attention_heads):
            problems.append(
                f"model.num_query_groups must equal num_attention_heads (is {c.num_query_groups}): GPT-2 has no GQA"
            )
        if c.kv_channels * c.num_attention_heads != c.hidden_size:
            problems.append("the head size must be hidden_size/num_attention_heads")
        return problems

    def hf_model(self, gpt_model, state, bos_id, eos_id):
        from transformers import GPT2Config, GPT2LMHeadModel

        c = gpt_model.config
        hf_config = GPT2Config(
            vocab_size=gpt_model.vocab_size, n_positions=gpt_model.max_position_embeddings, n_embd=c.hidden_size,
            n_layer=c.num_layers, n_head=c.num_attention_heads, n_inner=c.ffn_hidden_size,
            activation_function=HF_ACTIVATIONS[activation_name(c)], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            layer_norm_epsilon=c.layernorm_epsilon, tie_word_embeddings=gpt_model.share_embeddings_and_output_weights,
            bos_token_id=bos_id, eos_token_id=eos_id, dtype="float32",
        )  # fmt: skip
        return GPT2LMHeadModel(hf_config), _hf_state(state, c)


def _hf_state(meg: dict[str, torch.Tensor], c) -> dict[str, torch.Tensor]:
    """GPT-2's Conv1D layers hold weights transposed ([in, out]) and QKV as [all q; all k; all v].
    A model without linear biases gets zero ones, which computes the same."""
    hf = {"transformer.wte.weight": meg["embedding.word_embeddings.weight"]}
    hf["transformer.wpe.weight"] = meg["embedding.position_embeddings.weight"]
    hf["transformer.ln_f.weight"] = meg["decoder.final_layernorm.weight"]
    hf["transformer.ln_f.bias"] = meg["decoder.final_layernorm.bias"]

    def bias(key: str, size: int) -> torch.Tensor:
        return meg.get(key, torch.zeros(size))

    for i in range(c.num_layers):
        m, h = f"decoder.layers.{i}.", f"transformer.h.{i}."
        for meg_norm, hf_norm in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
            hf[h + hf_norm + ".weight"] = meg[m + meg_norm + ".weight"]
            hf[h + hf_norm + ".bias"] = meg[m + meg_norm + ".bias"]
        qkv = meg[m + "self_attention.linear_qkv.weight"]
        hf[h + "attn.c_attn.weight"] = torch.cat(split_qkv(qkv, c)).t().contiguous()
        hf[h + "attn.c_attn.bias"] = torch.cat(split_qkv(bias(m + "self_attention.linear_qkv.bias", qkv.shape[0]), c))
        for meg_linear, hf_linear in (
            ("self_attention.linear_proj", "attn.c_proj"),
            ("mlp.linear_fc1", "mlp.c_fc"),
            ("mlp.linear_fc2", "mlp.c_proj"),
        ):
            weight = meg[m + meg_linear + ".weight"]
            hf[h + hf_linear + ".weight"] = weight.t().contiguous()
            hf[h + hf_linear + ".bias"] = bias(m + meg_linear + ".bias", weight.shape[0])
    return hf


FAMILY = GPT2()
