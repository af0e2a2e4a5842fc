"""Model FLOPs, device peaks and MFU, worked by hand."""

from __future__ import annotations

import re

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


ROW = re.compile(
    r"(?P<name>\w+) +(?P<median>[\d.]+) \[(?P<q1>[\d.]+), (?P<q3>[\d.]+)\] +(?P<tokens>[\d,]+)"
    r" +(?P<tflops>[\d.]+) +(?P<mfu>[\d.]+)% +(?P<peak>[\d.]+)"
)
OVERHEAD = re.compile(
    r"overhead linupper/uniform: (?P<mean>[\d.]+) \[(?P<low>-?[\d.]+), (?P<high>[\d.]+)\]"
    r" \(mean of (?P<pairs>\d+) paired step-time ratios, 95% t-interval\)"
)


@pytest.mark.e2e
def test_bench_interleaves_the_strategies_and_reports_the_overhead(demo_dir):
    import subprocess
    import sys

    from helpers.e2e import ENV

    from launch.sources import Tokenizer, padded_vocab_size

    settings = [
        f"data.blend={demo_dir / 'train.blend.json'}",
        f"data.valid_blend={demo_dir / 'valid.blend.json'}",
        f"data.tokenizer_model={demo_dir / 'tokenizer.model'}",
        "model.num_layers=2",
        "model.hidden_size=64",
        "model.seq_length=64",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        "optim.warmup_steps=1",
        "logging.peak_tflops=1.0",
    ]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "launch.tools.bench",
        "--config",
        "configs/demo_cpu.yaml",
        "--pairs",
        "4",
        "--warmup",
        "1",
        "--set",
        *settings,
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split(" ", 2)[-1] for line in result.stdout.splitlines()]  # without the time stamp
    header = next(i for i, line in enumerate(lines) if line.startswith("strategy "))
    table = lines[header + 1 : header + 4]
    rows = [ROW.fullmatch(line) for line in table[:2]]
    assert all(rows), table
    assert [row["name"] for row in rows] == ["uniform", "linupper"]

    # Step times vary from machine to machine; what the figures say about each other does not.
    # Every figure is printed rounded, so each check allows half a unit of the last digit.
    cfg = load_config(REPO / "configs/demo_cpu.yaml", settings)
    per_token = flops_per_token(cfg, padded_vocab_size(cfg, Tokenizer.from_model(cfg.data.tokenizer_model).vocab_size))
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
    for row in rows:
        median, q1, q3 = (float(row[k]) for k in ("median", "q1", "q3"))
        tokens, tflops, mfu = int(row["tokens"].replace(",", "")), float(row["tflops"]), float(row["mfu"])
        assert 0 < q1 <= median <= q3
        assert (
            tokens_per_step / ((median + 0.05) / 1e3) - 0.5 <= tokens <= tokens_per_step / ((median - 0.05) / 1e3) + 0.5
        )
        expected_tflops = per_token * tokens / 2 / 1e12  # two devices
        assert abs(tflops - expected_tflops) <= per_token * 0.5 / 2 / 1e12 + 0.5e-4
        assert abs(mfu - 100 * tflops / 1.0) <= 0.05 + 100 * 0.5e-4 + 1e-9  # peak 1 TFLOP/s
        assert float(row["peak"]) > 0
    # One process's peak, read for the uniform row first: it cannot have fallen since.
    assert float(rows[0]["peak"]) <= float(rows[1]["peak"])

    overhead = OVERHEAD.fullmatch(table[2])
    assert overhead, table[2]
    assert overhead["pairs"] == "4"
    mean, low, high = (float(overhead[k]) for k in ("mean", "low", "high"))
    assert mean > 0 and low <= mean <= high
    assert (low + high) / 2 == pytest.approx(mean, abs=1e-4)  # a t-interval is centred on the mean
