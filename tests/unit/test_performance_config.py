"""Megatron-LM's performance features in the config: the combinations Megatron-Core cannot run
refused with what to change, the accepted ones handed to Megatron-Core as its own settings
(validated by its config classes), and the run's account and saved config naming them."""

from __future__ import annotations

import pytest
from helpers import REPO

from launch.config import ConfigError, from_dict, load_config, to_dict, validate
from launch.dry_run import describe_run
from launch.engines.megatron import ddp_config
from launch.model import gradient_accumulation_fusion, transformer_config


def demo(*overrides: str):
    return load_config(REPO / "configs/demo_cpu.yaml", overrides)


@pytest.mark.parametrize(
    "overrides, fix",
    [
        (["parallel.overlap_param_gather=true", "parallel.overlap_grad_reduce=true"],
         "set parallel.distributed_optimizer=true or parallel.overlap_param_gather=false"),
        (["parallel.overlap_param_gather=true", "parallel.distributed_optimizer=true"],
         "needs parallel.overlap_grad_reduce=true"),
        (["parallel.overlap_grad_reduce=true", "parallel.bucket_size=0"], "parallel.bucket_size=0 must be >= 1"),
        (["parallel.virtual_pipeline_size=2"], "set parallel.pp >= 2 or parallel.virtual_pipeline_size=null"),
        (["parallel.virtual_pipeline_size=1", "parallel.pp=2"], "give 2 or more model chunks per pipeline rank"),
        (["parallel.virtual_pipeline_size=4", "parallel.pp=2"],
         "model.num_layers=4 is not divisible by parallel.pp*virtual_pipeline_size = 2*4 = 8"),
        (["parallel.virtual_pipeline_size=2", "parallel.pp=2", "train.global_batch_size=4"],
         "a step has 1: set train.global_batch_size so that global_batch_size / (micro_batch_size x DP)"),
        (["model.recompute_method=uniform"],
         "model.recompute_method=uniform choose the layers that recompute_granularity=full recomputes"),
        (["model.recompute_granularity=selective", "model.recompute_num_layers=1"],
         "set model.recompute_granularity=full or model.recompute_num_layers=null"),
        (["model.recompute_granularity=full"],
         "needs model.recompute_method (uniform or block) and model.recompute_num_layers"),
        (["model.recompute_granularity=full", "model.recompute_method=block", "model.recompute_num_layers=3",
          "parallel.pp=2"],
         "model.recompute_num_layers=3 must be >= 1 and at most 2"),
        (["model.fp8=e4m3", "model.transformer_impl=local"], "set model.transformer_impl=transformer_engine"),
        (["model.fp8=hybrid", "model.precision=fp32"], "set model.precision=bf16 (or auto), or model.fp8=null"),
        (["engine=deepspeed", "parallel.overlap_grad_reduce=true"], "configure Megatron DDP's buckets"),
    ],
)  # fmt: skip
def test_combinations_megatron_core_cannot_run_are_refused_with_the_fix(overrides, fix):
    with pytest.raises(ConfigError) as error:
        validate(demo(*overrides), 2)
    assert fix in str(error.value)


ACCEPTED = {
    "overlap": ["parallel.overlap_grad_reduce=true", "parallel.bucket_size=1000000"],
    "overlap-gather": ["parallel.distributed_optimizer=true", "parallel.overlap_grad_reduce=true",
                       "parallel.overlap_param_gather=true"],
    "interleaved": ["parallel.pp=2", "parallel.virtual_pipeline_size=2"],
    "full-uniform": ["model.recompute_granularity=full", "model.recompute_method=uniform",
                     "model.recompute_num_layers=2"],
    "full-block-interleaved": ["model.recompute_granularity=full", "model.recompute_method=block",
                               "model.recompute_num_layers=1", "parallel.pp=2", "parallel.virtual_pipeline_size=2"],
    "selective": ["model.recompute_granularity=selective"],
}  # fmt: skip


@pytest.mark.parametrize("name", ACCEPTED)
def test_accepted_settings_reach_megatron_core_under_its_own_names(name):
    cfg = demo(*ACCEPTED[name])
    validate(cfg, 2)
    config = transformer_config(cfg, gpu=False, te=False)  # TransformerConfig validates them
    ddp = ddp_config(cfg)
    m, p = cfg.model, cfg.parallel
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == (
        m.recompute_granularity, m.recompute_method, m.recompute_num_layers)  # fmt: skip
    assert config.virtual_pipeline_model_parallel_size == p.virtual_pipeline_size
    assert (ddp.overlap_grad_reduce, ddp.overlap_param_gather, ddp.bucket_size) == (
        p.overlap_grad_reduce, p.overlap_param_gather, p.bucket_size)  # fmt: skip
    # The saved config holds them, and reads back as the same config.
    saved = to_dict(cfg)
    assert from_dict(saved) == cfg
    assert saved["parallel"]["virtual_pipeline_size"] == p.virtual_pipeline_size
    assert saved["model"]["recompute_granularity"] == m.recompute_granularity


def test_the_default_path_is_megatron_cores_default():
    cfg = demo()
    config, ddp = transformer_config(cfg, gpu=False, te=False), ddp_config(cfg)
    assert config.recompute_granularity is None and config.virtual_pipeline_model_parallel_size is None
    assert config.fp8 is None and not config.gradient_accumulation_fusion
    assert not ddp.overlap_grad_reduce and not ddp.overlap_param_gather and ddp.bucket_size is None


def test_fp8_is_refused_where_transformer_engine_is_not():
    cfg = demo("model.fp8=e4m3", "model.precision=bf16")
    for device, why in ((dict(gpu=False, te=False), "no GPU here"),
                        (dict(gpu=True, te=False), "transformer_engine not installed")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"model.fp8=e4m3 runs through Transformer Engine's layers.*{why}"):
            transformer_config(cfg, **device)


@pytest.mark.parametrize(
    "overrides, device, on, why",
    [
        ([], dict(gpu=True, te=True), True, "Transformer Engine's linears"),
        ([], dict(gpu=True, te=False), False, "need apex's fused_weight_gradient_mlp_cuda, not installed"),
        ([], dict(gpu=False, te=False), False, "none on a CPU"),
        (["model.gradient_accumulation_fusion=false"], dict(gpu=True, te=True), False, "=false"),
        (["engine=deepspeed"], dict(gpu=True, te=True), False, "DeepSpeed keeps no fp32 gradient buffers"),
    ],
)  # fmt: skip
def test_gradient_accumulation_fusion_is_on_where_its_kernel_is_and_says_why_not(overrides, device, on, why):
    cfg = demo(*overrides)
    used, reason = gradient_accumulation_fusion(cfg, **device)
    assert used is on and why in reason


def test_the_run_account_names_every_knob():
    cfg = demo(*ACCEPTED["overlap-gather"], "parallel.pp=2", "parallel.virtual_pipeline_size=2",
               "model.recompute_granularity=selective", "parallel.bucket_size=1000000")  # fmt: skip
    [line] = [line for line in describe_run(cfg, 4) if line.startswith("performance: ")]
    for part in ("selective recomputation (core attention)", "gradient reduction overlapped with the backward",
                 "in buckets of 1,000,000 parameters", "parameter all-gather overlapped with the forward",
                 "interleaved pipeline, 2 model chunks per pipeline rank", "gradient accumulation fusion off",
                 "fp8 off"):  # fmt: skip
        assert part in line, line
    [default] = [line for line in describe_run(demo(), 2) if line.startswith("performance: ")]
    assert default.startswith(
        "performance: no activation recomputation; gradient reduction after the backward; no pipeline"
    )
