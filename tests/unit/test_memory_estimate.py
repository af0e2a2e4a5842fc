"""The dry run's memory estimate: every shipped preset fits an 80 GB GPU at the GPU count it is
meant for, and activation recomputation changes the estimate as Megatron-LM's schedules keep
and recompute layers (a hand-worked account of the same per-layer figures)."""

from __future__ import annotations

import math

import pytest
from helpers.e2e import REPO

from launch.config import load_config
from launch.dry_run import count_parameters, dry_run, estimate_memory
from launch.models import family_of
from launch.sources import padded_vocab_size

# The GPU count each preset is meant for: the references' 4 (GPT-2) and 64 (Llama) GPUs, a node of
# 8 for the GPT-2 configs, the demo's 2 processes.
PRESETS = {
    **{path: 8 for path in REPO.glob("configs/gpt2-*.yaml")},
    **{path: 64 for path in REPO.glob("configs/llama-*.yaml")},
    **{path: 2 for path in REPO.glob("configs/demo_cpu*.yaml")},
    **{path: 4 for path in REPO.glob("configs/paper/gpt2-*.yaml") if path.name != "gpt2-common.yaml"},
    **{path: 64 for path in REPO.glob("configs/paper/llama-*.yaml") if path.name != "llama-common.yaml"},
}


def test_every_config_is_a_preset_here():
    shipped = {*REPO.glob("configs/*.yaml"), *REPO.glob("configs/paper/*.yaml")}
    assert shipped - set(PRESETS) == {REPO / "configs/paper/gpt2-common.yaml", REPO / "configs/paper/llama-common.yaml"}


@pytest.mark.parametrize("path", sorted(PRESETS), ids=lambda path: str(path.relative_to(REPO)))
def test_every_preset_fits_an_80_gb_gpu(path, monkeypatch, demo_dir):
    monkeypatch.chdir(REPO)
    # The demo's vocabulary is its tokenizer's: the tests' demo corpus, not a local data/demo.
    overrides = [f"data.tokenizer_model={demo_dir / 'tokenizer.model'}"] if path.name.startswith("demo") else []
    report, fits = dry_run(load_config(path, overrides), PRESETS[path], check_data=False, gpu_memory_gib=80)
    assert fits, report
    assert "memory: OK" in report


def _activations(*overrides: str) -> float:
    cfg = load_config(REPO / "configs/paper/llama-7b-uniform.yaml", overrides)
    return estimate_memory(cfg, count_parameters(cfg, cfg.model.vocab_size), 64).activations


def test_recomputation_keeps_layer_inputs_and_recomputes_what_its_method_says():
    cfg = load_config(REPO / "configs/paper/llama-7b-uniform.yaml", ["model.recompute_granularity=null"])
    m = cfg.model
    tokens = cfg.train.micro_batch_size * m.seq_length  # one micro-batch in flight (PP 1)
    logits = 4 * tokens * padded_vocab_size(cfg, m.vocab_size)
    per_token = family_of(m).activation_bytes(m)
    layer = tokens * (per_token.replicated + per_token.sharded)
    layer_input = tokens * 2 * m.hidden_size  # bf16
    none = _activations("model.recompute_granularity=null")
    assert none == pytest.approx(32 * layer + logits)
    # uniform: a checkpoint every 4 layers, one chunk of 4 recomputed at a time
    uniform = _activations("model.recompute_method=uniform", "model.recompute_num_layers=4")
    assert uniform == pytest.approx(math.ceil(32 / 4) * layer_input + 4 * layer + logits)
    # block: the first 8 layers checkpointed and recomputed one by one, the other 24 kept whole
    block = _activations("model.recompute_method=block", "model.recompute_num_layers=8")
    assert block == pytest.approx(8 * layer_input + 24 * layer + layer + logits)
    # selective: flash attention keeps no scores; only the core's softmax statistics go
    selective = _activations("model.recompute_granularity=selective")
    assert selective == pytest.approx(none - 32 * tokens * per_token.attention_core)
    assert selective < none and block < none and uniform < block


def test_full_recomputation_without_its_method_is_refused():
    from launch.config import ConfigError

    with pytest.raises(ConfigError, match="model.recompute_granularity=full needs model.recompute_method"):
        _activations("model.recompute_method=null")
