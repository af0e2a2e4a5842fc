"""The interleaved pipeline schedule in a real run (`launch.pretrain`, 2 processes, PP=2 with two
model chunks per rank): the same losses as the plain pipeline, checkpoints of the model chunks,
and a resume of them without the interleaving (Megatron's shards are keyed by global layer)."""

from __future__ import annotations

import pytest
from helpers.e2e import pretrain, rows

# Four layers, one per model chunk; DP=1, so 4 micro-batches a step, a multiple of PP.
PIPELINE = ("model.num_layers=4", "parallel.pp=2", "train.micro_batch_size=2")
INTERLEAVED = (*PIPELINE, "parallel.virtual_pipeline_size=2")


def _losses(run_dir, last_step: int = 8) -> dict[str, float]:
    logged = [r for r in rows(run_dir) if r["step"] <= last_step]
    return {f"{key}@{r['step']}": r[key] for r in logged for key in ("loss", "weighted_loss")}


@pytest.fixture(scope="module")
def plain(tmp_path_factory, demo_dir):
    run_dir = tmp_path_factory.mktemp("plain-pipeline")
    pretrain(run_dir, demo_dir, *PIPELINE)
    return run_dir


@pytest.mark.slow  # two 2-process runs; tests/distributed/test_performance_knobs.py is the fast check
def test_an_interleaved_run_follows_the_plain_pipelines_losses(tmp_path, demo_dir, plain):
    result = pretrain(tmp_path, demo_dir, *INTERLEAVED, "train.exit_after=4")
    assert "interleaved pipeline, 2 model chunks per pipeline rank" in result.stdout
    assert _losses(tmp_path) == pytest.approx(_losses(plain, last_step=4), rel=1e-6)


@pytest.mark.slow
def test_an_interleaved_checkpoint_resumes_in_the_plain_pipeline(tmp_path, demo_dir, plain):
    pretrain(tmp_path, demo_dir, *INTERLEAVED, "train.exit_after=4")
    result = pretrain(tmp_path, demo_dir, *PIPELINE)
    assert "resuming from" in result.stdout and "step_00000004" in result.stdout
    assert _losses(tmp_path) == pytest.approx(_losses(plain), rel=1e-6)
