"""Model FLOPs, device peaks and MFU, worked by hand."""

from __future__ import annotations

import pytest
from helpers.e2e import REPO

from launch.config import load_config
from launch.throughput import Throughput, device_peak_tflops, flops_per_token, peak_tflops


def test_flops_per_token_of_gpt2_small_by_hand():
    cfg = load_config(REPO / "configs/gpt2-124m.yaml")
    # per layer: QKV 768·2304 + projection 768·768 + MLP 2·768·3072 = 7,077,888 weights; 12 layers
    # = 84,934,656; output layer 50,304 (padded) · 768 = 38,633,472; 6 · 123,568,128 = 741,408,768;
    # attention 12 · 12 layers · 768 · 512 = 56,623,104.
    assert flops_per_token(cfg, 50_304) == 798_031_872


def test_swiglu_and_grouped_queries_count_their_own_matmuls():
    cfg = load_config(
        REPO / "configs/demo_cpu.yaml",
        [
            "model.position_embedding=rope",
            "model.normalization=RMSNorm",
            "model.activation=swiglu",
            "model.ffn_hidden_size=256",
            "model.num_query_groups=2",
            "model.num_layers=1",
            "model.hidden_size=128",
            "model.num_attention_heads=4",
            "model.seq_length=16",
        ],
    )
    head_dim = 32
    per_layer = 128 * head_dim * (4 + 2 * 2) + 4 * head_dim * 128 + 3 * 128 * 256
    assert flops_per_token(cfg, 256) == 6 * (per_layer + 256 * 128) + 12 * 1 * 128 * 16


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H800", 989.0),
        ("NVIDIA H800 PCIe", 756.0),
        ("NVIDIA GB200", 2500.0),
        ("NVIDIA B200", 2250.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("Some Future GPU", None),
    ],
)
def test_device_peaks_by_name(name, peak):
    assert device_peak_tflops(name) == peak


def test_throughput_row_arithmetic_and_the_peak_override():
    cfg = load_config(REPO / "configs/gpt2-124m.yaml", ["logging.peak_tflops=100"])
    throughput = Throughput(cfg, 50_304, world_size=8)
    row = throughput.row(step_time_s=2.0)
    tokens_per_s = 384 * 512 / 2.0
    assert row["tokens_per_s"] == tokens_per_s
    assert row["tflops_per_device"] == pytest.approx(798_031_872 * tokens_per_s / 8 / 1e12)
    assert row["mfu"] == pytest.approx(row["tflops_per_device"] / 100)
    assert row["peak_memory_gib"] > 0
    # Without the override: this machine's GPU peak, or no MFU (a CPU, an unknown GPU).
    plain = load_config(REPO / "configs/gpt2-124m.yaml")
    known = peak_tflops(plain)
    expected = None if known is None else pytest.approx(row["tflops_per_device"] / known)
    assert Throughput(plain, 50_304, 8).row(2.0)["mfu"] == expected
