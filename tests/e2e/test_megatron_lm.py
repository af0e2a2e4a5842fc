"""Megatron-LM's own training loop (`pretrain_gpt.py` from $MEGATRON_LM) with the reweighted
loss: the drop-in `python -m megatron_patches.megatron_lm` and a fork with the README's lines,
against the unmodified script, each on 2 CPU processes through the CPU layer for Megatron-LM.

One tiny model, 6 iterations, the demo corpus; runs are shared between tests (module cache).
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
from helpers import REPO

MEGATRON_LM = os.environ.get("MEGATRON_LM")


RUNNER = REPO / "tests" / "helpers" / "megatron_lm_on_cpu.py"


pytestmark = pytest.mark.skipif(
    not MEGATRON_LM, reason="MEGATRON_LM is unset: the folder of Megatron-LM core_v0.16.1 (.ci/run sets it)"
)


ITERATIONS = 6


WARMUP = 2


LINUPPER = ["--reweight-strategy", "linupper", "--reweight-temperature", "0.4", "--reweight-warmup-steps", str(WARMUP)]


LAYOUTS = {"dp2": [], "tp2": ["--tensor-model-parallel-size", "2"], "pp2": ["--pipeline-model-parallel-size", "2"]}


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
def checkpoints(tmp_path_factory) -> Path:
    """Where the linupper run saves at iterations 3 and 6, and the resumed run loads from."""
    return tmp_path_factory.mktemp("checkpoints")


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


@pytest.mark.parametrize(
    "layout", [pytest.param(name, marks=[] if name == "dp2" else pytest.mark.slow) for name in LAYOUTS]
)
def test_uniform_logs_megatron_lms_own_loss_at_every_iteration(runs, layout):
    plain = runs("plain", *LAYOUTS[layout])
    uniform = runs("drop-in", "--reweight-strategy", "uniform", *LAYOUTS[layout])
    assert uniform.column("lm loss") == plain.column("lm loss")
    assert uniform.column("grad norm") == plain.column("grad norm")
    # Evaluations at iterations 3 and 6, and pretrain()'s final one.
    assert uniform.validations == plain.validations and len(plain.validations) == 3
    assert set(uniform.column("weight ess")) == {"1.000000E+00"}


def test_linupper_differs_after_its_warm_up_and_logs_its_statistics(runs, checkpoints):
    plain = runs("plain")
    linupper = runs("fork", *LINUPPER, "--save", str(checkpoints), "--save-interval", "3")
    losses, plain_losses = linupper.column("lm loss"), plain.column("lm loss")
    # Iteration WARMUP + 1 is the first reweighted one; its weights change the parameters after it.
    assert losses[: WARMUP + 1] == plain_losses[: WARMUP + 1]
    assert all(a != b for a, b in zip(losses[WARMUP + 1 :], plain_losses[WARMUP + 1 :]))
    ess = [float(value) for value in linupper.column("weight ess")]
    assert ess[:WARMUP] == [1.0] * WARMUP and all(0 < value < 1 for value in ess[WARMUP:])
    assert all(float(value) > 1 for value in linupper.column("max weight")[WARMUP:])
    assert all(0 < float(value) < 1 for value in linupper.column("weight entropy")[WARMUP:])
    assert linupper.column("inverse temperature")[WARMUP:] == ["2.500000E+00"] * (ITERATIONS - WARMUP)
    assert all(value is not None for value in linupper.column("weighted loss"))
    # Evaluation reports the plain loss only: no reweighting statistics.
    assert [set(row) for row in linupper.validations] == [{"lm loss value", "lm loss PPL"}] * 3


@pytest.mark.slow
def test_a_resumed_run_continues_the_reweighting_schedule(runs, checkpoints):
    """The drop-in loads the fork's checkpoint of iteration 3: iteration 4 is the unbroken
    run's, and iterations 4-6 are reweighted at the target temperature (no second warm-up)."""
    unbroken = runs("fork", *LINUPPER, "--save", str(checkpoints), "--save-interval", "3")
    resumed = runs("drop-in", *LINUPPER, "--load", str(checkpoints), "--ckpt-step", "3")
    assert len(resumed.iterations) == 3
    assert resumed.iterations[0]["lm loss"] == unbroken.iterations[3]["lm loss"]
    assert resumed.iterations[0]["weight ess"] == unbroken.iterations[3]["weight ess"]
    assert resumed.column("inverse temperature") == ["2.500000E+00"] * 3
    assert all(0 < float(value) < 1 for value in resumed.column("weight ess"))


def test_the_drop_in_refuses_before_initialising(megatron_lm, demo_dir):
    result = run(
        ["-m", "megatron_patches.megatron_lm"], model_args(demo_dir) + ["--reweight-temperature", "0"], nproc=1
    )
    assert result.returncode != 0
    assert "megatron_patches.megatron_lm: --reweight-temperature=0.0 must be > 0" in result.stderr
    assert "initializing torch distributed" not in result.stdout
