"""`launch.tools.bench` on the demo: uniform, linupper per sequence and per document interleaved step by
step, and each overhead reported."""

from __future__ import annotations

import re

import pytest
from helpers.e2e import REPO

from launch.config import load_config
from launch.throughput import flops_per_token

ROW = re.compile(
    r"(?P<name>[\w-]+) +(?P<median>[\d.]+) \[(?P<q1>[\d.]+), (?P<q3>[\d.]+)\] +(?P<tokens>[\d,]+)"
    r" +(?P<tflops>[\d.]+) +(?P<mfu>[\d.]+)% +(?P<peak>[\d.]+)"
)


OVERHEAD = re.compile(
    r"overhead (?P<name>[\w-]+)/uniform: (?P<mean>[\d.]+) \[(?P<low>-?[\d.]+), (?P<high>[\d.]+)\]"
    r" \(mean of (?P<pairs>\d+) paired step-time ratios, 95% t-interval\)"
)


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
    header = next(i for i, line in enumerate(lines) if line.startswith("loss "))
    table = lines[header + 1 : header + 6]
    rows = [ROW.fullmatch(line) for line in table[:3]]
    assert all(rows), table
    assert [row["name"] for row in rows] == ["uniform", "linupper", "linupper-document"]

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
    # One process's peak, read row by row: it cannot have fallen since.
    peaks = [float(row["peak"]) for row in rows]
    assert peaks == sorted(peaks)

    overheads = [OVERHEAD.fullmatch(line) for line in table[3:]]
    assert all(overheads), table[3:]
    assert [overhead["name"] for overhead in overheads] == ["linupper", "linupper-document"]
    for overhead in overheads:
        assert overhead["pairs"] == "4"
        mean, low, high = (float(overhead[k]) for k in ("mean", "low", "high"))
        assert mean > 0 and low <= mean <= high
        assert (low + high) / 2 == pytest.approx(mean, abs=1e-4)  # a t-interval is centred on the mean
