"""The weights log's settings (refused where it cannot log, not an experiment change) and the report's refusals."""

from __future__ import annotations

import pytest
from helpers import REPO

from launch.config import ConfigError, experiment_changes, load_config, to_dict, validate

DEMO = REPO / "configs/demo_cpu.yaml"


def test_the_interval_must_be_positive():
    with pytest.raises(ConfigError, match="logging.weights_every=0 must be >= 1"):
        validate(load_config(DEMO, ["logging.weights_every=0"]), 1)


def test_turning_the_log_on_at_a_resume_is_the_same_experiment():
    saved = to_dict(load_config(DEMO))
    assert experiment_changes(saved, load_config(DEMO, ["logging.weights_every=4"]), saved_dp=1, dp=1) == []


def test_the_report_refuses_a_run_without_a_weights_log_and_runs_beside_it(tmp_path, capsys):
    from launch.tools.report import main

    assert main(["--weights", str(tmp_path)]) == 2
    assert "train with --set logging.weights_every=N" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        main(["--weights", str(tmp_path), str(tmp_path)])
    assert refused.value.code == 2
    assert "or --weights RUN" in capsys.readouterr().err


def test_the_dry_run_names_the_log_and_its_size():
    from launch.dry_run import describe_run

    lines = describe_run(load_config(DEMO, ["logging.weights_every=50"]), 2)
    assert (
        "weights log: every 50 steps, 8 samples to RUN/weights/ (python -m launch.tools.report --weights RUN)" in lines
    )
    assert not any(line.startswith("weights log") for line in describe_run(load_config(DEMO), 2))
    per_segment = describe_run(load_config(DEMO, ["logging.weights_every=50", "reweight.unit=document"]), 2)
    assert any(
        line.startswith("weights log: every 50 steps, the document segments of 8 samples") for line in per_segment
    )


def test_kind_shares_spread_each_weight_over_its_documents_by_their_tokens():
    from launch.tools.report import kind_shares

    kinds = {"web": {"informative": [0, 10], "boilerplate": [10, 20]}}
    rows = [  # one global micro-batch: weights sum to 1
        {"domain": "web", "documents": [3, 12], "document_tokens": [30, 10], "weight": 0.5},
        {"domain": "web", "documents": [15], "document_tokens": [40], "weight": 0.2},
        {"domain": "web", "documents": [25], "document_tokens": [20], "weight": 0.3},  # in no range
    ]
    shares = kind_shares(rows, kinds)["web"]
    assert shares["informative"] == pytest.approx((30 / 100, 0.5 * 30 / 40))
    assert shares["boilerplate"] == pytest.approx((50 / 100, 0.5 * 10 / 40 + 0.2))
    assert shares["other"] == pytest.approx((20 / 100, 0.3))
