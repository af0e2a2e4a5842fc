"""`launch.tools.export`'s conversion, without a run: random Megatron weights convert exactly, the
tokenizer encodes and decodes as SentencePiece does, and what it cannot export is refused."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers.e2e import REPO
from helpers.export import LLAMA_STYLE, assert_logits_equal, offline_env, run_module
from helpers.multiprocess import run_distributed

TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab=96, seq=16)


VARIANTS = {
    # name: (position embedding, normalization, activation, query groups, bias, tied, ffn, eps)
    "gpt2": ("learned_absolute", "LayerNorm", "gelu", 4, True, True, 80, 1e-5),
    "gpt2_untied_no_bias": ("learned_absolute", "LayerNorm", "gelu", 4, False, False, 64, 1e-5),
    "llama_gqa_untied": ("rope", "RMSNorm", "swiglu", 2, False, False, 48, 1e-6),
    "llama_mqa_bias_tied": ("rope", "RMSNorm", "swiglu", 1, True, True, 40, 1e-5),
}


# Built by launch.model.build_model from the demo config, as a run builds them: GPT-2's tanh GELU.
FAMILY_BUILT = {
    "gpt2_family": ("model.ffn_hidden_size=80",),
    "llama_family": (*LLAMA_STYLE, "model.ffn_hidden_size=48"),
}


REFUSED = {
    "learned_rmsnorm": ("learned_absolute", "RMSNorm", "gelu", 4, True, True, 64, 1e-5),
    "rope_layernorm_gelu": ("rope", "LayerNorm", "gelu", 4, True, True, 64, 1e-5),
    "gpt2_gqa": ("learned_absolute", "LayerNorm", "gelu", 2, True, True, 64, 1e-5),
}


def _tiny_megatron(position, norm, activation, groups, bias, tied, ffn, eps):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_patches.specs import gpt_layer_spec

    swiglu = activation == "swiglu"
    config = TransformerConfig(
        num_layers=TINY["num_layers"], hidden_size=TINY["hidden_size"], num_attention_heads=TINY["num_attention_heads"],
        num_query_groups=groups, ffn_hidden_size=ffn, normalization=norm, layernorm_epsilon=eps,
        activation_func=F.silu if swiglu else F.gelu, gated_linear_unit=swiglu, add_bias_linear=bias,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, pipeline_dtype=torch.float32,
        bias_dropout_fusion=False, gradient_accumulation_fusion=False, masked_softmax_fusion=False,
        bias_activation_fusion=False, persist_layer_norm=False,
    )  # fmt: skip
    return GPTModel(
        config=config,
        transformer_layer_spec=gpt_layer_spec(normalization=norm),
        vocab_size=TINY["vocab"],
        max_sequence_length=TINY["seq"],
        share_embeddings_and_output_weights=tied,
        position_embedding_type=position,
        rotary_base=500000,
    ).eval()


def _family_built(overrides):
    from launch.config import load_config
    from launch.model import build_model

    shape = (f"model.num_layers={TINY['num_layers']}", f"model.hidden_size={TINY['hidden_size']}",
             f"model.num_attention_heads={TINY['num_attention_heads']}", f"model.seq_length={TINY['seq']}")  # fmt: skip
    cfg = load_config(REPO / "configs/demo_cpu.yaml", [*shape, *overrides])
    return build_model(cfg, TINY["vocab"]).eval()


def _convert_random_models(out_dir: str):
    """Every parameter random (norm gains and biases too, so a misplaced one shows), then
    Megatron's logits and the saved conversion of each variant, and the refusals' messages."""
    from launch.tools.export import ExportError, choose_architecture, to_hugging_face
    from megatron_patches.parallel import initialize_parallel

    initialize_parallel(1, 1, 1)
    tokens = torch.randint(0, TINY["vocab"], (2, TINY["seq"]), generator=torch.Generator().manual_seed(0))
    logits = {}
    models = {name: _tiny_megatron(*variant) for name, variant in VARIANTS.items()}
    models |= {name: _family_built(overrides) for name, overrides in FAMILY_BUILT.items()}
    for name, model in models.items():
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(torch.randn_like(param) * 0.5)
            logits[name] = model(tokens, torch.arange(TINY["seq"]).expand_as(tokens), None)
        to_hugging_face(model, bos_id=1, eos_id=2).save_pretrained(f"{out_dir}/{name}")
    refusals = {}
    for name, variant in REFUSED.items():
        try:
            choose_architecture(_tiny_megatron(*variant))
        except ExportError as error:
            refusals[name] = str(error)
    return tokens, logits, refusals


@pytest.fixture(scope="module")
def random_conversions(tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    [result] = run_distributed(_convert_random_models, 1, str(out))
    return out, result


@pytest.mark.parametrize("name", [*VARIANTS, *FAMILY_BUILT])
def test_conversion_of_random_weights_is_exact(random_conversions, name):
    from transformers import AutoModelForCausalLM

    out, (tokens, megatron_logits, _) = random_conversions
    model = AutoModelForCausalLM.from_pretrained(out / name, local_files_only=True)
    assert type(model).__name__ == ("GPT2LMHeadModel" if name.startswith("gpt2") else "LlamaForCausalLM")
    if name.startswith("gpt2"):  # the GELU trained: exact in the hand-built variants, tanh as runs train it
        assert model.config.activation_function == ("gelu_new" if name == "gpt2_family" else "gelu")
    with torch.no_grad():
        logits = model(tokens).logits
    error = assert_logits_equal(logits, megatron_logits[name])
    print(f"{name}: max relative logit error {error:.2e}")


def test_models_neither_architecture_represents_are_refused_with_what_to_change(random_conversions):
    _, (_, _, refusals) = random_conversions
    assert set(refusals) == set(REFUSED)
    assert "Llama: model.position_embedding must be rope (is learned_absolute)" in refusals["learned_rmsnorm"]
    assert "GPT-2: model.normalization must be LayerNorm (is RMSNorm)" in refusals["learned_rmsnorm"]
    assert "model.normalization must be RMSNorm (is LayerNorm)" in refusals["rope_layernorm_gelu"]
    assert "model.activation must be swiglu (is gelu)" in refusals["rope_layernorm_gelu"]
    assert "GPT-2 has no GQA" in refusals["gpt2_gqa"]


def test_tokenizer_encodes_and_decodes_exactly_as_sentencepiece(tmp_path, demo_dir):
    import sentencepiece
    from transformers import AutoTokenizer

    from launch.tools.export import hugging_face_tokenizer

    model_file = str(demo_dir / "tokenizer.model")
    hugging_face_tokenizer(model_file, max_length=64).save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    texts = [json.loads(line)["text"] for name in ("valid.jsonl", "train.jsonl") for line in (demo_dir / name).open()]
    # leading and repeated spaces, bytes outside the vocabulary, digits, special-token text
    texts += ["", " ", "   indented", "a  b\n\n  c", "naïve 日本語 🙂", "3.14159 + 2718", "</s><s> <unk>"]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == sp.encode(text), text[:80]
        assert tokenizer.decode(ids) == sp.decode(ids)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        sp.bos_id(),
        sp.eos_id(),
        sp.unk_id(),
    )
    assert len(texts) > 1000


def test_export_of_a_directory_without_checkpoints_says_what_to_give(tmp_path):
    result = run_module(
        "launch.tools.export", "--run-dir", tmp_path, "--out", tmp_path / "hf", env=offline_env(tmp_path)
    )
    assert result.returncode == 2
    assert "checkpoints does not exist: give --run-dir a run directory" in result.stderr
    assert not (tmp_path / "hf").exists()
