"""The GPU model as Megatron-Core validates it, checked on the CPU: for every shipped config,
the TransformerConfig, DDP config and optimizer config a GPU run gets, with Transformer
Engine installed and without; the local layer built with those flags; the same activation
trained on every device as the export writes."""

from __future__ import annotations

import dataclasses

import pytest
from helpers.e2e import REPO
from helpers.multiprocess import run_distributed

from launch.config import ConfigError, load_config
from launch.model import transformer_config, use_transformer_engine
from launch.models import family_of
from launch.models.family import activation_name

CONFIGS = sorted((REPO / "configs").glob("**/*.yaml"))
DEVICES = {"gpu-te": dict(gpu=True, te=True), "gpu-local": dict(gpu=True, te=False), "cpu": dict(gpu=False, te=False)}


@pytest.fixture
def transformer_engine_rope(monkeypatch):
    """TransformerConfig looks up TE's fused RoPE kernel; here TE is what the test says is installed."""
    from megatron.core.models.common.embeddings import rope_utils

    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", lambda *args, **kwargs: None)


def _config(path, device):
    cfg = load_config(path)
    if cfg.parallel.sequence_parallel and not device["te"]:
        with pytest.raises(ConfigError, match="sequence_parallel=true needs Transformer Engine's layers"):
            transformer_config(cfg, **device)
        cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, sequence_parallel=False))
    return cfg, transformer_config(cfg, **device)  # TransformerConfig.__post_init__ validates


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.parent.name + "/" + p.stem)
def test_every_config_passes_megatron_core_validation(path, device, transformer_engine_rope):
    from launch.engines.megatron import ddp_config, megatron_optimizer_config

    device = DEVICES[device]
    cfg, config = _config(path, device)
    gpu, te_spec = device["gpu"], use_transformer_engine(cfg, **device)
    optimizer = megatron_optimizer_config(cfg, gpu=gpu)  # OptimizerConfig.__post_init__ validates
    ddp_config(cfg)
    assert config.bf16 == optimizer.bf16 == (cfg.model.precision == "bf16" or (cfg.model.precision == "auto" and gpu))
    assert config.params_dtype == optimizer.params_dtype
    # Every fusion with a kernel here on a GPU, none on the CPU.
    assert config.bias_dropout_fusion == config.masked_softmax_fusion == config.cross_entropy_loss_fusion == gpu
    assert config.bias_activation_fusion == (gpu and (config.gated_linear_unit or config.add_bias_linear))
    assert config.apply_rope_fusion == (gpu and device["te"] and cfg.model.position_embedding == "rope")
    # Into Megatron DDP's main_grad buffers, which DeepSpeed does not keep
    assert config.gradient_accumulation_fusion == (gpu and te_spec and cfg.engine == "megatron")
    assert config.use_cpu_initialization == (not gpu)
    assert not config.persist_layer_norm  # torch's norms refuse it; nothing else here reads it


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.parent.name + "/" + p.stem)
def test_the_activation_trained_is_the_same_on_every_device_and_the_one_exported(path, transformer_engine_rope):
    from launch.models.gpt2 import HF_ACTIVATIONS

    names = {activation_name(_config(path, device)[1]) for device in DEVICES.values()}
    family = family_of(load_config(path).model)
    assert names == ({"gelu_tanh"} if family.name == "gpt2" else {"swiglu"})
    if family.name == "gpt2":
        assert HF_ACTIVATIONS["gelu_tanh"] == "gelu_new"  # GPT-2's own tanh approximation


def test_gelu_without_biases_runs_unfused_and_still_tanh():
    cfg = load_config(REPO / "configs/gpt2-124m.yaml", ["model.add_bias_linear=false"])
    config = transformer_config(cfg, gpu=True, te=False)  # the fused bias-GELU would raise without a bias
    assert not config.bias_activation_fusion and activation_name(config) == "gelu_tanh"


def _instantiate_local_gpu_models(paths) -> list[str]:
    """Each config's GPU model without Transformer Engine, shrunk and on one CPU process: every
    GPU flag except CUDA initialisation, which needs a device."""
    from megatron.core.models.gpt import GPTModel

    from megatron_patches.parallel import initialize_parallel

    initialize_parallel(1, 1, 1)
    built = []
    for path in paths:
        cfg = load_config(path)
        m = cfg.model
        groups = 2 if m.num_query_groups < m.num_attention_heads else 4
        model = dataclasses.replace(m, num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=groups,
                                    ffn_hidden_size=96, seq_length=16, max_position_embeddings=16)  # fmt: skip
        parallel = dataclasses.replace(cfg.parallel, tp=1, pp=1, cp=1, sequence_parallel=False)
        tiny = dataclasses.replace(cfg, model=model, parallel=parallel)
        config = dataclasses.replace(transformer_config(tiny, gpu=True, te=False), use_cpu_initialization=True)
        gpt = GPTModel(
            config=config,
            transformer_layer_spec=family_of(model).layer_spec(model, transformer_engine=False),
            vocab_size=128,
            max_sequence_length=16,
            share_embeddings_and_output_weights=not model.untie_embeddings,
            position_embedding_type=model.position_embedding,
            rotary_base=model.rotary_base,
        )
        built.append(f"{path.stem}: {type(gpt.decoder.layers[0].input_layernorm).__name__}")
    return built


@pytest.mark.parametrize(
    "precision, tf32, gpu, expected",
    [
        ("fp32", True, True, True),
        ("fp32", False, True, False),  # model.tf32=false: full fp32 matmuls
        ("fp32", True, False, False),  # a CPU has no TF32
        ("auto", True, True, False),  # bf16 on a GPU
        ("auto", True, False, False),  # fp32, but on a CPU
        ("bf16", True, True, False),
    ],
)
def test_tf32_serves_the_fp32_runs_on_a_gpu_unless_turned_off(precision, tf32, gpu, expected):
    from launch.trainer import use_tf32

    cfg = load_config(REPO / "configs/demo_cpu.yaml", [f"model.precision={precision}", f"model.tf32={tf32}"])
    assert use_tf32(cfg, gpu=gpu) is expected


def test_the_local_gpu_layer_builds_with_the_gpu_flags():
    [built] = run_distributed(_instantiate_local_gpu_models, 1, CONFIGS)
    assert len(built) == len(CONFIGS)
    for line in built:
        assert line.endswith(("LayerNorm", "RMSNorm")), line


def test_a_model_of_no_family_is_refused_naming_the_families():
    with pytest.raises(ConfigError, match="is no model family's: set the fields of one of gpt2"):
        family_of(load_config(REPO / "configs/demo_cpu.yaml", ["model.activation=swiglu"]).model)
    with pytest.raises(
        ConfigError, match="model.family=llama needs model.position_embedding=rope, model.normalization=RMSNorm"
    ):
        family_of(load_config(REPO / "configs/demo_cpu.yaml", ["model.family=llama", "model.activation=swiglu"]).model)
    assert family_of(load_config(REPO / "configs/llama-7b.yaml", ["model.family=llama"]).model).name == "llama"


def test_activation_memory_follows_the_family():
    gpt2 = load_config(REPO / "configs/gpt2-124m.yaml").model
    # h = 768: whole, two norms' inputs and outputs (8h); split, QKV's output (6h), the core's
    # output (2h), its softmax statistics (4 bytes x 12 heads), the GELU's and fc2's inputs (16h)
    assert tuple(family_of(gpt2).activation_bytes(gpt2)) == (8 * 768, 24 * 768 + 48, 48)
    llama = load_config(REPO / "configs/llama-1.4b.yaml", ["model.num_query_groups=4"]).model
    h, kv, ffn, core = 2048, 4 * 128, 5632, 4 * 16
    # split: QKV's output 2(h + 2kv), RoPE's Q and K 2(h + kv), the core's output 2h; the fused
    # SwiGLU keeps fc1's output (4 bytes per FFN channel) and fc2's input (2)
    attention = 2 * (h + 2 * kv) + 2 * (h + kv) + 2 * h + core
    assert tuple(family_of(llama).activation_bytes(llama)) == (8 * h, attention + 6 * ffn, core)
    # On a CPU: torch's composed RMSNorm keeps the normalised input too (2h a norm), the unfused
    # SwiGLU the SiLU and the offset up half (2 + 2 bytes per FFN channel)
    assert tuple(family_of(llama).activation_bytes(llama, gpu=False)) == (12 * h, attention + 10 * ffn, core)
    dropout = load_config(REPO / "configs/paper/gpt2-124m-uniform.yaml").model
    assert family_of(dropout).activation_bytes(dropout).replicated == 10 * 768  # two masks of a byte a channel
