"""The weights log's settings (refused where it cannot log, not an experiment change) and the report's refusals."""

from __future__ import annotations

import pytest
from helpers import REPO

from launch.config import ConfigError, experiment_changes, load_config, to_dict, validate

DEMO = REPO / "configs/demo_cpu.yaml"


def test_the_interval_must_be_positive_and_weights_per_sequence():
    for overrides, expected in [
        (["logging.weights_every=0"], "logging.weights_every=0 must be >= 1"),
        (["logging.weights_every=2", "reweight.unit=document"], "logs one weight per sequence"),
    ]:
        with pytest.raises(ConfigError, match=expected):
            validate(load_config(DEMO, overrides), 1)


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
