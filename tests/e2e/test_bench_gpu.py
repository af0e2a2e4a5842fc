"""`make bench-gpu`'s table, on the CPU: a tiny model through every column (the GPU figures need
a GPU; what the table computes and prints is the same), and the one-line refusal without a GPU."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from helpers.e2e import REPO


@pytest.mark.slow
def test_the_cpu_mode_prints_the_whole_table():
    argv = ["--device", "cpu", "--pairs", "2", "--warmup", "0", "--steps", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "launch.tools.bench_gpu", *argv], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    header, columns, *rows = done.stdout.strip().splitlines()[-4:]
    assert header.startswith("bench-gpu on CPU") and "linupper/uniform [95% CI]" in columns
    assert [row.split()[0] for row in rows] == ["gpt2-124m", "llama-7b"]
    for row in rows:
        # tokens/s, TFLOP/s, MFU (none on a CPU), memory, the ratio and its interval, the two losses
        numbers = r"([\d,]+) +([\d.]+) +n/a +n/a / ([\d.]+) +([\d.]+) \[(-?[\d.]+), ([\d.]+)\] +([\d.]+) / ([\d.]+)$"
        tokens, _, _, ratio, low, high, bf16, fp32 = re.search(numbers, row).groups()
        assert float(tokens.replace(",", "")) > 0 and float(low) <= float(ratio) <= float(high)
        # random tokens of a 256-token vocabulary: about ln 256 = 5.55, bf16 within 1 % of fp32
        assert abs(float(fp32) - 5.55) < 0.2 and abs(float(bf16) - float(fp32)) < 0.01 * float(fp32)


def test_without_a_gpu_it_says_so_in_one_line(capsys, monkeypatch):
    from launch.tools import bench_gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_gpu.main([]) == 2
    out, err = capsys.readouterr()
    assert not out and err.count("\n") == 1 and err.startswith("bench-gpu: no CUDA GPU here")
