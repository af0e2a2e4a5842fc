"""End to end: `torchrun -m launch.pretrain` on the demo corpus, as a user runs it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from helpers.e2e import ENV, REPO, pretrain, rows

from launch.checkpoint import MANIFEST, STATE_FILE, file_manifest
from launch.config import load_config
from launch.dry_run import count_parameters
from launch.metrics import STEP_STATISTICS
from launch.sources import Tokenizer
from launch.throughput import peak_tflops

TRAIN_KEYS = {
    "step", "loss", "weighted_loss", "lr", "grad_norm", "step_time_s", "tokens_per_s", "weight_ess",
    "weight_max", "weight_entropy", "invalid_fraction", "domain_weight_share", "domain_sample_share",
    "tflops_per_device", "mfu", "peak_memory_gib",
}  # fmt: skip
DOMAINS = {"boilerplate", "code", "docs", "licenses", "prose"}


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, demo_dir):
    run_dir = tmp_path_factory.mktemp("unbroken")
    pretrain(run_dir, demo_dir)
    return run_dir


def test_two_process_run_logs_every_metric_and_saves_checkpoints(unbroken):
    train = rows(unbroken)
    assert [r["step"] for r in train] == [2, 4, 6, 8]
    peak = peak_tflops(load_config(unbroken / "config.yaml"))
    for row in train:
        assert TRAIN_KEYS <= set(row)
        assert set(row["domain_weight_share"]) == DOMAINS
        assert sum(row["domain_weight_share"].values()) == pytest.approx(1.0)
        assert 0 < row["weight_ess"] <= 1 and row["invalid_fraction"] == 0
        assert row["tflops_per_device"] > 0
        assert (row["mfu"] is None) == (peak is None)  # no MFU without a known peak (a CPU)
    assert train[0]["weight_ess"] == pytest.approx(1.0)  # uniform warm-up
    assert train[-1]["weight_ess"] < 1.0  # linupper weights differ
    assert train[-1]["loss"] < train[0]["loss"]
    valid = rows(unbroken, "valid")
    assert [r["step"] for r in valid] == [4, 8]
    assert set(valid[0]["valid_loss_per_domain"]) == DOMAINS
    # demo_cpu.yaml keeps the last two checkpoints
    assert sorted(p.name for p in (unbroken / "checkpoints").iterdir()) == ["step_00000006", "step_00000008"]
    assert any((unbroken / "tensorboard").iterdir())
    assert (unbroken / "config.yaml").is_file()


def test_peak_memory_is_that_of_the_process_holding_the_model(unbroken):
    """The logged peak is rank 0's, in GiB: its resident set on a CPU, the CUDA allocator's on a GPU.

    Both bounds hold on either: the state is at least 16 bytes a parameter (fp32 weights,
    gradients and Adam's m and v; bf16 adds its 2-byte copy), and neither measure exceeds the
    imports plus 64 times the state."""
    peaks = [r["peak_memory_gib"] for r in rows(unbroken)]
    assert peaks == sorted(peaks)  # a peak never falls
    cfg = load_config(unbroken / "config.yaml")
    parameters = count_parameters(cfg, Tokenizer.from_model(cfg.data.tokenizer_model).vocab_size).total
    state = 16 * parameters / 2**30
    # The same imports in a fresh interpreter: what the process holds before it builds anything.
    code = "import resource, launch.pretrain, launch.trainer; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    imported = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, check=True
    )
    imports = int(imported.stdout.split()[-1]) / 2**20  # KiB on Linux
    # The footprint of the same imports in a fresh interpreter is no lower bound: it varies with
    # what each start imports lazily (measured: the run's rank 0 at 0.46 GiB, a fresh interpreter
    # at 0.68). Above the imports, the model's state, activations, data and gloo buffers stay far
    # below 64 times the state; a unit slip is a factor of 1024.
    assert peaks[0] >= state
    assert peaks[-1] <= imports + 64 * state


# The first half of `unbroken` under other layouts.  Reweighting normalises over a global
# micro-batch (micro-batch x DP): one process takes `unbroken`'s 2 x 2 samples at once.
@pytest.mark.slow
def test_worker_processes_read_on_from_a_checkpoint_with_the_same_losses(tmp_path, demo_dir, unbroken):
    """`unbroken` reads on the training thread (data.num_workers: null on a CPU); two worker
    processes per rank, resumed from its step 6, train and validate to the same numbers, bit for bit."""
    result = pretrain(
        tmp_path, demo_dir, "data.num_workers=2", f"checkpoint.load={unbroken / 'checkpoints' / 'step_00000006'}"
    )
    assert "data: read 2 worker processes per rank, each up to 2 micro-batches ahead" in result.stdout
    step_8 = [r for r in rows(unbroken) if r["step"] == 8]
    assert [(r["loss"], r["weighted_loss"], r["lr"]) for r in rows(tmp_path)] == [
        (r["loss"], r["weighted_loss"], r["lr"]) for r in step_8
    ]
    assert [r["valid_loss_per_domain"] for r in rows(tmp_path, "valid")] == [
        r["valid_loss_per_domain"] for r in rows(unbroken, "valid") if r["step"] == 8
    ]


FIRST_HALF = ("train.exit_after=4", "train.micro_batch_size=4")


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, demo_dir):
    run_dir = tmp_path_factory.mktemp("single")
    pretrain(run_dir, demo_dir, *FIRST_HALF, nproc=1)
    return run_dir


def _curve(run_dir) -> dict[str, float]:
    """The logged losses and LR of the first four steps, by name and step."""
    curve = {}
    for kind, keys in (("train", ("loss", "weighted_loss", "lr")), ("valid", ("valid_loss",))):
        for r in rows(run_dir, kind):
            if r["step"] <= 4:
                curve.update({f"{key}@{r['step']}": r[key] for key in keys})
    return curve


def test_single_process_run(single_process):
    assert [r["step"] for r in rows(single_process)] == [2, 4]


def test_data_parallel_run_from_scratch_follows_the_single_process_curve(single_process, unbroken):
    """Two DP ranks, one seed: the same initial weights and the same losses."""
    assert _curve(unbroken) == pytest.approx(_curve(single_process), rel=1e-5)


@pytest.mark.slow
def test_pipeline_parallel_run_from_scratch_follows_the_single_process_curve(tmp_path, demo_dir, single_process):
    """Two stages of one model (megatron_patches/init.py), not two draws from one stream: the
    same losses over four steps, to floating-point order (measured: within 1e-8)."""
    pretrain(tmp_path, demo_dir, *FIRST_HALF, "parallel.pp=2")
    assert _curve(tmp_path) == pytest.approx(_curve(single_process), rel=1e-5)


@pytest.mark.slow
def test_stop_and_resume_continues_exactly(tmp_path, demo_dir, unbroken):
    pretrain(tmp_path, demo_dir, "train.exit_after=4")
    assert [r["step"] for r in rows(tmp_path)] == [2, 4]
    result = pretrain(tmp_path, demo_dir)
    assert "resuming from" in result.stdout and "step_00000004" in result.stdout
    expected = [(r["step"], r["loss"], r["weighted_loss"], r["lr"]) for r in rows(unbroken)]
    assert [(r["step"], r["loss"], r["weighted_loss"], r["lr"]) for r in rows(tmp_path)] == expected
    assert [r["valid_loss"] for r in rows(tmp_path, "valid")] == [r["valid_loss"] for r in rows(unbroken, "valid")]


@pytest.mark.slow
def test_asynchronous_checkpoints_commit_and_resume_exactly(tmp_path, demo_dir, unbroken):
    pretrain(tmp_path, demo_dir, "train.exit_after=4", "checkpoint.async_save=true")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert all((tmp_path / f"checkpoints/{p}/manifest.json").is_file() for p in ("step_00000002", "step_00000004"))
    result = pretrain(tmp_path, demo_dir, "checkpoint.async_save=true")
    assert "resuming from" in result.stdout and "step_00000004" in result.stdout
    expected = [(r["step"], r["loss"], r["weighted_loss"], r["lr"]) for r in rows(unbroken)]
    assert [(r["step"], r["loss"], r["weighted_loss"], r["lr"]) for r in rows(tmp_path)] == expected


def test_a_checkpoint_of_the_earlier_trainer_state_format_resumes_exactly(tmp_path, demo_dir, unbroken):
    """Checkpoints written before the trainer state was keyed by name hold the step statistics
    under `log_interval` with their sums as one flat list, and a `consumed_samples` that is
    never read.  The fixture is such a trainer_state.json, of step 3 of
    `pretrain(run_dir, demo_dir, "train.exit_after=3")` at commit cbd5647, with the demo
    directory written DEMO_DIR (to regenerate: run that at that commit and copy
    run_dir/checkpoints/step_00000003/trainer_state.json).  This run's own state, rewritten
    in that format, must resume as exactly as a checkpoint of the current format does."""
    earlier = json.loads((REPO / "tests/fixtures/trainer_state_log_interval.json").read_text())
    assert set(earlier) == {
        "scheduler",
        "reweight_schedule",
        "log_interval",
        "consumed_samples",
        "config",
        "step",
        "layout",
    }
    pretrain(tmp_path, demo_dir, "train.exit_after=3")  # step 3: mid-interval, the statistics carry over
    checkpoint = tmp_path / "checkpoints" / "step_00000003"
    state = json.loads((checkpoint / STATE_FILE).read_text())
    statistics = state.pop("step_statistics")
    sums = statistics["sums"]  # by name; the earlier format: the statistics, then per domain in blend order
    flat = [sums[name] for name, _ in STEP_STATISTICS]
    flat += [*sums["domain_weight_share"].values(), *sums["domain_sample_share"].values()]
    assert len(flat) == len(earlier["log_interval"]["sums"])
    rewritten = {**earlier, **state, "log_interval": {**statistics, "sums": flat}}
    (checkpoint / STATE_FILE).write_text(json.dumps(rewritten, indent=2))
    (checkpoint / MANIFEST).write_text(json.dumps({"files": file_manifest(checkpoint)}))

    result = pretrain(tmp_path, demo_dir)
    assert "resuming from" in result.stdout and "step_00000003" in result.stdout
    expected = [(r["step"], r["loss"], r["weighted_loss"], r["lr"]) for r in rows(unbroken)]
    assert [(r["step"], r["loss"], r["weighted_loss"], r["lr"]) for r in rows(tmp_path)] == expected
    assert [r["valid_loss"] for r in rows(tmp_path, "valid")] == [r["valid_loss"] for r in rows(unbroken, "valid")]
    written = json.loads((tmp_path / "checkpoints" / "step_00000008" / STATE_FILE).read_text())
    assert "step_statistics" in written and not {"log_interval", "consumed_samples"} & set(written)


@pytest.mark.slow
def test_resume_under_another_dp_keeping_the_global_micro_batch_is_accepted(tmp_path, demo_dir):
    """Weights are normalised over DP x micro_batch_size samples: DP 1 x 8 -> DP 2 x 4 is the same experiment."""
    batch = "train.global_batch_size=16"
    pretrain(tmp_path / "dp1", demo_dir, batch, "train.micro_batch_size=8", "train.exit_after=2", nproc=1)
    shutil.copytree(tmp_path / "dp1", tmp_path / "refused")
    result = pretrain(tmp_path / "dp1", demo_dir, batch, "train.micro_batch_size=4", "train.exit_after=1")
    assert "resuming from" in result.stdout and "step_00000002" in result.stdout
    assert [r["step"] for r in rows(tmp_path / "dp1")] == [2]
    assert (tmp_path / "dp1" / "checkpoints" / "step_00000003").is_dir()

    refused = pretrain(tmp_path / "refused", demo_dir, batch, "train.micro_batch_size=8", check=False)
    assert refused.returncode != 0
    assert "global micro-batch (DP x train.micro_batch_size): 1 x 8 = 8 -> 2 x 8 = 16" in refused.stderr
    assert "train.micro_batch_size=4 keeps it under DP 2" in refused.stderr


@pytest.mark.slow
def test_incomplete_latest_checkpoint_is_skipped_with_a_warning(tmp_path, demo_dir):
    pretrain(tmp_path, demo_dir, "train.exit_after=4")
    (tmp_path / "checkpoints" / "step_00000004" / "trainer_state.json").unlink()
    result = pretrain(tmp_path, demo_dir, "train.exit_after=1")
    assert "step_00000004 is incomplete" in result.stderr
    assert "resuming from" in result.stdout and "step_00000002" in result.stdout


@pytest.mark.slow
def test_tensor_parallel_checkpoint_resumes_without_tensor_parallelism(tmp_path, demo_dir, single_process, unbroken):
    # One DP rank throughout, with `unbroken`'s global micro-batch (see FIRST_HALF).
    pretrain(tmp_path, demo_dir, "parallel.tp=2", *FIRST_HALF)
    # From scratch, TP=2 shards the single process's model: the same first half (within 1e-8).
    assert _curve(tmp_path) == pytest.approx(_curve(single_process), rel=1e-5)
    result = pretrain(tmp_path, demo_dir, "parallel.tp=1", "train.micro_batch_size=4", nproc=1)
    assert "resharding checkpoint" in result.stderr
    resumed = {r["step"]: r["loss"] for r in rows(tmp_path)}
    reference = {r["step"]: r["loss"] for r in rows(unbroken)}  # TP=1 throughout
    # Measured: 1.2e-8 relative at step 8 (floating-point order of TP's sums).  Adam's moments
    # lost in the resharding would move step 6 by about 1e-3.
    for step in (6, 8):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5)


def test_impossible_config_fails_before_training_with_what_to_change(tmp_path, demo_dir):
    result = pretrain(tmp_path, demo_dir, "train.global_batch_size=6", check=False)
    assert result.returncode != 0
    assert "train.global_batch_size=6" in result.stderr and "multiple of 4" in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_unknown_key_is_refused_with_a_suggestion(tmp_path, demo_dir):
    result = pretrain(tmp_path, demo_dir, "train.step=3", check=False)
    assert result.returncode != 0 and "did you mean 'train.steps'" in result.stderr


def test_dry_run_reports_layout_without_training(tmp_path, demo_dir):
    command = [
        sys.executable,
        "-m",
        "launch.pretrain",
        "--config",
        "configs/demo_cpu.yaml",
        "--dry-run",
        "--world-size",
        "2",
    ]
    command += [
        "--set",
        f"data.blend={demo_dir / 'train.blend.json'}",
        f"data.valid_blend={demo_dir / 'valid.blend.json'}",
    ]
    command += [f"data.tokenizer_model={demo_dir / 'tokenizer.model'}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "TP 1 x PP 1 x CP 1 x DP 2" in result.stdout
    assert "parameters: 1,071,872" in result.stdout
    assert "problems: none" in result.stdout
    assert not any(tmp_path.iterdir())
