"""Llama style: rotary positions, RMSNorm, a SwiGLU MLP, no linear biases, optional GQA."""

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
    mlp_parameters,
    split_qkv,
    with_mlp,
)


class Llama(ModelFamily):
    name = "llama"
    signature = {"position_embedding": "rope", "normalization": "RMSNorm", "activation": "swiglu"}
    hf_name = "Llama"

    def transformer_config_fields(self, model, *, gpu, te):
        return dict(
            normalization="RMSNorm",
            activation_func=F.silu,
            gated_linear_unit=True,
            add_bias_linear=model.add_bias_linear,
            # Megatron's fused SwiGLU is exact (with or without fc1's bias).
            bias_activation_fusion=gpu,
            # The fused RoPE kernel is Transformer Engine's, whichever layer spec runs.
            apply_rope_fusion=gpu and te,
        )

    def count_parameters(self, model, padded_vocab_size):
        norm = model.hidden_size  # RMSNorm has no bias
        gate_and_up = 2 * model.ffn_hidden_size
        return ParameterCount(
            word_embedding=padded_vocab_size * model.hidden_size,
            position_embedding=0,
            per_layer=2 * norm + attention_parameters(model) + mlp_parameters(model, gate_and_up),
            final_norm=norm,
            output=padded_vocab_size * model.hidden_size if model.untie_embeddings else 0,
            num_layers=model.num_layers,
        )

    def flops_per_token(self, model, padded_vocab_size):
        return dense_flops_per_token(model, 3 * model.hidden_size * model.ffn_hidden_size, padded_vocab_size)

    def activation_bytes(self, model, *, gpu=True):
        # fc1's output (gate and up, 4 bytes per FFN channel) and fc2's input (2); unfused, the
        # SwiGLU also keeps the gate's SiLU and the up half offset by Megatron's glu_linear_offset.
        fused = self.transformer_config_fields(model, gpu=gpu, te=False)["bias_activation_fusion"]
        attention = attention_activation_bytes(model, gpu=gpu)
        return with_mlp(attention, model, (6 if fused else 10) * model.ffn_hidden_size, gpu=gpu)

    def hf_problems(self, gpt_model):
        c = gpt_model.config
        problems = []
        if gpt_model.position_embedding_type != "rope":
            problems.append(f"model.position_embedding must be rope (is {gpt_model.position_embedding_type})")
        elif gpt_model.rotary_percent != 1.0 or gpt_model.rotary_scaling or c.rotary_interleaved:
            problems.append("RoPE must rotate whole heads, unscaled and not interleaved")
        if c.normalization != "RMSNorm":
            problems.append(f"model.normalization must be RMSNorm (is {c.normalization})")
        activation = activation_name(c)
        if activation != "swiglu":
            problems.append(f"model.activation must be swiglu (is {activation})")
        return problems

    def hf_model(self, gpt_model, state, bos_id, eos_id):
        from transformers import LlamaConfig, LlamaForCausalLM

        c = gpt_model.config
        hf_config = LlamaConfig(
            vocab_size=gpt_model.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.ffn_hidden_size,
            num_hidden_layers=c.num_layers, num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_query_groups or c.num_attention_heads, head_dim=c.kv_channels,
            hidden_act="silu", rms_norm_eps=c.layernorm_epsilon,
            max_position_embeddings=gpt_model.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": float(gpt_model.rotary_base)},
            attention_bias=c.add_bias_linear, mlp_bias=c.add_bias_linear,
            tie_word_embeddings=gpt_model.share_embeddings_and_output_weights,
            bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=None, dtype="float32",
        )  # fmt: skip
        return LlamaForCausalLM(hf_config), _hf_state(state, c)


def _hf_state(meg: dict[str, torch.Tensor], c) -> dict[str, torch.Tensor]:
    """Llama keeps Q, K, V and the SwiGLU gate and up projections apart; Megatron fuses
    QKV per query group and stores fc1 as [gate; up]. Both apply RoPE to halves of a head
    (rotate_half), so no permutation of Q/K rows is needed."""
    hf = {"model.embed_tokens.weight": meg["embedding.word_embeddings.weight"]}
    hf["model.norm.weight"] = meg["decoder.final_layernorm.weight"]
    for i in range(c.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        hf[h + "input_layernorm.weight"] = meg[m + "input_layernorm.weight"]
        hf[h + "post_attention_layernorm.weight"] = meg[m + "pre_mlp_layernorm.weight"]
        for kind in ("weight", "bias") if c.add_bias_linear else ("weight",):
            q, k, v = split_qkv(meg[f"{m}self_attention.linear_qkv.{kind}"], c)
            hf[f"{h}self_attn.q_proj.{kind}"], hf[f"{h}self_attn.k_proj.{kind}"], hf[f"{h}self_attn.v_proj.{kind}"] = (
                q,
                k,
                v,
            )
            hf[f"{h}self_attn.o_proj.{kind}"] = meg[f"{m}self_attention.linear_proj.{kind}"]
            gate, up = meg[f"{m}mlp.linear_fc1.{kind}"].chunk(2)
            hf[f"{h}mlp.gate_proj.{kind}"], hf[f"{h}mlp.up_proj.{kind}"] = gate, up
            hf[f"{h}mlp.down_proj.{kind}"] = meg[f"{m}mlp.linear_fc2.{kind}"]
    return hf


FAMILY = Llama()
