"""Runs of the training entry point for end-to-end tests: small, fast, on the demo corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import REPO


def pretrain_command(
    run_dir: Path,
    demo_dir: Path,
    *overrides: str,
    config: str = "configs/demo_cpu.yaml",
    nproc: int = 2,
    launcher: tuple = (),
) -> list[str]:
    """`python -m launch.torchrun -m launch.pretrain` with a tiny model and 8 steps of linupper; `overrides` win."""
    settings = [
        f"data.blend={demo_dir / 'train.blend.json'}",
        f"data.valid_blend={demo_dir / 'valid.blend.json'}",
        f"data.tokenizer_model={demo_dir / 'tokenizer.model'}",
        "model.num_layers=2",
        "model.hidden_size=64",
        "model.seq_length=64",
        "train.steps=8",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        "train.log_interval=2",
        "train.eval_interval=4",
        "train.eval_iters=1",
        "checkpoint.interval=2",
        "optim.warmup_steps=2",
        "reweight.strategy=linupper",
        "reweight.warmup_steps=2",
        *overrides,
    ]
    command = [sys.executable, "-m", "launch.torchrun", "--standalone", f"--nproc-per-node={nproc}", *launcher]
    return command + ["-m", "launch.pretrain", "--config", config, "--run-dir", str(run_dir), "--set", *settings]


ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}

# Long enough that a signal sent at the first log line lands mid-run; no periodic checkpoint,
# so only the stop's own checkpoint can save the work (tests add one where they need it).
LONG = ("train.steps=40", "train.eval_interval=20", "checkpoint.interval=1000")


def pretrain(
    run_dir: Path,
    demo_dir: Path,
    *overrides: str,
    config: str = "configs/demo_cpu.yaml",
    nproc: int = 2,
    check: bool = True,
):
    """Run `pretrain_command` to its end; raises with the output unless it succeeds or `check` is off."""
    command = pretrain_command(run_dir, demo_dir, *overrides, config=config, nproc=nproc)
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=ENV)
    if check and result.returncode != 0:
        raise AssertionError(
            f"pretrain failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def rows(run_dir: Path, kind: str = "train") -> list[dict]:
    """The metrics.jsonl rows of one kind ("train" or "valid")."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def comparable(run_dir: Path):
    """What must not change when a run is stopped and resumed: every logged loss, weight and LR."""
    return [(r["step"], r["loss"], r["weighted_loss"], r["lr"]) for r in rows(run_dir)], [
        r["valid_loss"] for r in rows(run_dir, "valid")
    ]
