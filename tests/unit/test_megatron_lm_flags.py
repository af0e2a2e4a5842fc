"""Megatron-LM's own training loop (`pretrain_gpt.py` from $MEGATRON_LM) with the reweighted
loss: the drop-in `python -m megatron_patches.megatron_lm` and a fork with the README's lines,
against the unmodified script, each on 2 CPU processes through the CPU layer for Megatron-LM.

One tiny model, 6 iterations, the demo corpus; runs are shared between tests (module cache).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
from helpers import REPO

from megatron_patches.megatron_lm import add_reweight_args, refusals, reweighted_loss_func, settings_from_args
from megatron_patches.reweighting import ReweightSettings

MEGATRON_LM = os.environ.get("MEGATRON_LM")


RUNNER = REPO / "tests" / "helpers" / "megatron_lm_on_cpu.py"


pytestmark = pytest.mark.skipif(
    not MEGATRON_LM, reason="MEGATRON_LM is unset: the folder of Megatron-LM core_v0.16.1 (.ci/run sets it)"
)


ITERATIONS = 6


def model_args(demo_dir: Path) -> list[str]:
    """pretrain_gpt.py's arguments: a 2-layer, hidden-64 GPT in fp32 with the non-fused
    (CPU-capable) kernels, evaluated at iterations 3 and 6 and at the end, on the demo corpus.

    No dropout: on CPU it draws from the generator that also seeds the data loader, which a
    resumed run creates after restoring that generator, so its masks would differ."""
    return [
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--hidden-dropout", "0", "--attention-dropout", "0",
        "--seq-length", "64", "--max-position-embeddings", "64",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(ITERATIONS),
        "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
        "--log-interval", "1", "--eval-interval", "3", "--eval-iters", "1",
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(demo_dir / "tokenizer.model"),
        "--data-path", "0.5", str(demo_dir / "train_code"), "0.5", str(demo_dir / "train_prose"), "--split", "95,5,0",
        "--num-workers", "0", "--distributed-backend", "gloo", "--transformer-impl", "local",
        "--attention-backend", "unfused", "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion",
        "--no-bias-gelu-fusion", "--no-bias-dropout-fusion", "--no-persist-layer-norm", "--no-rope-fusion",
    ]  # fmt: skip


def environment() -> dict:
    paths = [str(REPO), MEGATRON_LM, os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "PYTHONWARNINGS": "ignore"}


def run(entry: list[str], args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *entry,
        *args,
    ]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=environment(), timeout=600)


def fields_of(line: str) -> dict[str, str]:
    """`key: value` pairs of one Megatron-LM log line, values as printed."""
    return dict(part.strip().split(": ", 1) for part in line.split(" | ") if ": " in part)


class Log:
    """What Megatron-LM printed: per iteration and per evaluation, its `key: value` fields."""

    def __init__(self, output: str):
        self.iterations = [
            fields_of(line) for line in output.splitlines() if " iteration " in line and "lm loss:" in line
        ]
        self.validations = [fields_of(line) for line in output.splitlines() if "validation loss at iteration" in line]

    def column(self, key: str) -> list[str]:
        return [row.get(key) for row in self.iterations]


def checked(result: subprocess.CompletedProcess) -> Log:
    if result.returncode != 0:
        raise AssertionError(f"run failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    log = Log(result.stdout)
    assert len(log.iterations) == ITERATIONS or "--load" in result.args, result.stdout[-3000:]
    return log


@pytest.fixture(scope="module")
def megatron_lm() -> Path:
    root = Path(MEGATRON_LM)
    if not (root / "pretrain_gpt.py").is_file():
        pytest.fail(f"MEGATRON_LM={MEGATRON_LM} holds no pretrain_gpt.py: point it to Megatron-LM core_v0.16.1")
    return root


@pytest.fixture(scope="module")
def fork(megatron_lm, tmp_path_factory) -> Path:
    """pretrain_gpt.py with the README's lines for a fork added (written at test time)."""
    text = (megatron_lm / "pretrain_gpt.py").read_text()
    additions = {
        "\ndef forward_step(": "\nfrom megatron_patches.megatron_lm import add_reweight_args, reweighted_loss_func\n"
        "loss_func = reweighted_loss_func(loss_func)\n\n\ndef forward_step(",
        "extra_args_provider=add_modelopt_args if has_nvidia_modelopt else None,": (
            "extra_args_provider=add_reweight_args,"
        ),
    }
    for anchor, replacement in additions.items():
        assert text.count(anchor) == 1, f"pretrain_gpt.py changed: {anchor!r} is not found once"
        text = text.replace(anchor, replacement)
    path = tmp_path_factory.mktemp("fork") / "pretrain_gpt.py"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def runs(megatron_lm, fork, demo_dir):
    """Each kind of run, started once and shared: `runs(kind, *extra)` → its Log."""
    entries = {
        "plain": [str(RUNNER), str(megatron_lm / "pretrain_gpt.py")],
        "drop-in": ["-m", "megatron_patches.megatron_lm"],
        "fork": [str(RUNNER), str(fork)],
    }

    @cache
    def logged(kind: str, *extra: str) -> Log:
        return checked(run(entries[kind], model_args(demo_dir) + list(extra)))

    return logged


def parsed(*argv: str) -> argparse.Namespace:
    args = add_reweight_args(argparse.ArgumentParser()).parse_args(list(argv))
    args.train_iters, args.hybrid_context_parallel, args.sft, args.use_legacy_models = 100, False, False, False
    return args


def test_the_flags_are_the_config_settings_with_their_defaults_and_aliases():
    assert settings_from_args(parsed()) == ReweightSettings()
    assert settings_from_args(parsed("--reweight-strategy", "mid", "--reweight-warmup-temperature", "100")) == (
        ReweightSettings(strategy="quadratic", warmup_temperature=100.0)
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--reweight-temperature", "0"], "--reweight-temperature=0.0 must be > 0"),
        (["--reweight-delta", "-1"], "--reweight-delta=-1.0 must be > 0"),
        (["--reweight-anneal-steps", "-1"], "--reweight-anneal-steps=-1 must be >= 0"),
        (["--reweight-strategy", "linupper", "--reweight-warmup-steps", "100"],
         "--reweight-warmup-steps=100 >= --train-iters=100: the run would never reweight"),
    ],
)  # fmt: skip
def test_settings_it_cannot_honour_are_refused_naming_the_flag(argv, message):
    assert any(problem.startswith(message) for problem in refusals(parsed(*argv)))


@pytest.mark.parametrize("flag", ["hybrid_context_parallel", "sft", "use_legacy_models"])
def test_layouts_without_per_sample_losses_are_refused_naming_the_flag(flag):
    args = parsed()
    setattr(args, flag, True)
    assert [problem for problem in refusals(args) if "--" + flag.replace("_", "-") in problem]


def test_evaluation_gets_pretrain_gpts_own_loss_untouched():
    def plain_loss_func(loss_mask, output_tensor, model=None):
        return output_tensor.sum(), loss_mask.sum(), {"lm loss": output_tensor.sum().view(1)}

    mask, losses = torch.ones(2, 4), torch.rand(2, 4)
    with torch.no_grad():
        assert reweighted_loss_func(plain_loss_func)(mask, losses) == plain_loss_func(mask, losses)
