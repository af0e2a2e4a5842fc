"""`engine: deepspeed`'s configuration: a DeepSpeed JSON may add settings but not contradict the run
config, and gradients accumulate and reduce in fp32, overlapping communication where DeepSpeed can."""

from __future__ import annotations

import json

import pytest
from helpers import REPO


def _config(*overrides: str):
    from launch.config import load_config

    return load_config(REPO / "configs/demo_cpu_deepspeed.yaml", list(overrides))


def _config_with_json(tmp_path, settings: dict):
    path = tmp_path / "deepspeed.json"
    path.write_text(json.dumps(settings))
    return _config(f"deepspeed.config={path}")


def test_deepspeed_json_adds_settings(tmp_path):
    from launch.engines.deepspeed import deepspeed_config

    cfg = _config_with_json(tmp_path, {"zero_optimization": {"reduce_bucket_size": 1000}, "log_level": "info"})
    settings = deepspeed_config(cfg, micro_batches_per_step=2)
    assert settings["zero_optimization"] == {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 1000}
    assert settings["log_level"] == "info"
    assert settings["gradient_accumulation_steps"] == 2 and settings["train_batch_size"] == cfg.train.global_batch_size


@pytest.mark.parametrize("stage", (0, 1, 2, 3))
def test_gradients_accumulate_and_reduce_in_fp32_and_overlap_where_deepspeed_can(tmp_path, stage):
    from launch.engines.deepspeed import deepspeed_config

    cfg = _config("model.precision=bf16", f"deepspeed.zero_stage={stage}")
    settings = deepspeed_config(cfg, micro_batches_per_step=2)
    assert settings["bf16"] == {"enabled": True}
    assert settings["data_types"] == {"grad_accum_dtype": "fp32"} and settings["communication_data_type"] == "fp32"
    # DeepSpeed refuses overlap_comm without its own accumulation below stage 2.
    assert settings["zero_optimization"].get("overlap_comm", False) == (stage >= 2)
    # A JSON may turn the overlap off (a performance choice), not the fp32 accumulation.
    off = _config_with_json(tmp_path, {"zero_optimization": {"overlap_comm": False}})
    assert deepspeed_config(off, micro_batches_per_step=2)["zero_optimization"]["overlap_comm"] is False


@pytest.mark.parametrize(
    "settings, named",
    [
        ({"gradient_accumulation_steps": 3}, "gradient_accumulation_steps"),
        ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage"),
        ({"optimizer": {"type": "Adam"}}, "'optimizer'"),
        ({"data_types": {"grad_accum_dtype": "bf16"}}, "data_types.grad_accum_dtype"),
    ],
)
def test_deepspeed_json_may_not_contradict_the_run_config(tmp_path, settings, named):
    from launch.config import ConfigError
    from launch.engines.deepspeed import deepspeed_config

    with pytest.raises(ConfigError, match=named):
        deepspeed_config(_config_with_json(tmp_path, settings), micro_batches_per_step=2)


def test_a_contradicting_deepspeed_json_is_refused_before_any_process_starts(tmp_path):
    """validate (and so --dry-run) finds what building the engine would refuse."""
    from launch.config import ConfigError, validate

    cfg = _config_with_json(tmp_path, {"zero_optimization": {"stage": 3}})
    with pytest.raises(ConfigError, match="zero_optimization.stage"):
        validate(cfg, 2)
    validate(_config_with_json(tmp_path, {"zero_optimization": {"reduce_bucket_size": 1000}}), 2)
