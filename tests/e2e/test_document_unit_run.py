"""`reweight.unit: document` through the training entry point, under context parallelism, with
the documents kept apart in attention, positions and loss (`data.reset_*`, `data.eod_mask_loss`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO
from helpers.e2e import ENV, pretrain, rows

pytestmark = pytest.mark.e2e

CP2_UNIFORM = (
    "parallel.cp=2",
    "reweight.strategy=uniform",
    "data.reset_attention_mask=true",
    "data.reset_position_ids=true",
    "data.eod_mask_loss=true",
)
DOCUMENTS = ("reweight.unit=document", "reweight.max_segments_per_sample=2")


@pytest.fixture(scope="module")
def document_run(tmp_path_factory, demo_dir):
    run_dir = tmp_path_factory.mktemp("documents")
    pretrain(run_dir, demo_dir, *CP2_UNIFORM, *DOCUMENTS, "logging.weights_every=4")
    return run_dir


def test_a_document_run_logs_its_segments_and_uniform_weights_give_the_token_mean(document_run):
    documents = rows(document_run)
    assert [r["step"] for r in documents] == [2, 4, 6, 8]
    for row in documents:
        assert row["weighted_loss"] == pytest.approx(row["loss"], rel=1e-6)
        assert 1 <= row["segments_per_sample"] <= 2  # the bound caps what a sample can hold
        assert 0 <= row["segments_over_bound"] <= 1
    assert any(r["segments_per_sample"] > 1 for r in documents)


def test_the_weights_log_holds_every_segment_and_the_report_reads_it(document_run):
    for step in (4, 8):
        logged = [json.loads(line) for line in (document_run / f"weights/step_{step:08d}.jsonl").open()]
        assert {r["segment"] for r in logged} <= {0, 1} and sum(r["weight"] for r in logged) == pytest.approx(1.0)
        assert len({(r["domain"], r["dataset_sample"]) for r in logged}) == 2  # DP=1 (CP=2) x micro_batch_size 2
    command = [sys.executable, "-m", "launch.tools.report", "--weights", str(document_run)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stderr
    assert "document segments at 2 logged steps" in result.stdout


def test_a_resume_that_changes_the_unit_is_refused(demo_dir, document_run):
    result = pretrain(document_run, demo_dir, *CP2_UNIFORM, check=False)
    assert result.returncode != 0
    assert "reweight.unit: 'document' -> 'sequence'" in result.stdout + result.stderr


@pytest.mark.slow
def test_a_stopped_document_run_resumes_exactly(tmp_path, demo_dir, document_run):
    pretrain(tmp_path, demo_dir, *CP2_UNIFORM, *DOCUMENTS, "train.exit_after=3")  # mid log interval
    pretrain(tmp_path, demo_dir, *CP2_UNIFORM, *DOCUMENTS)
    keys = ("step", "loss", "weighted_loss", "weight_ess", "segments_per_sample", "segments_over_bound")
    assert [[r[k] for k in keys] for r in rows(tmp_path)] == [[r[k] for k in keys] for r in rows(document_run)]
