"""`engine: deepspeed` computes the Megatron engine's step, and trains end to end like it.

* One ZeRO-2/ZeRO-3 step (a real DeepSpeed engine on two gloo processes, DP=2 or TP=2) on
  a global batch of two micro-batches with the reweighted loss gives the Megatron engine's
  step from the same weights on the same batch: the same sample weights, gradient, gradient
  norm and AdamW update.  The gradient that ZeRO reduces and partitions is read through its
  optimizer: a plain SGD step with learning rate L moves every parameter by exactly -L·g.
* `torchrun -m launch.pretrain --config configs/demo_cpu_deepspeed.yaml` logs the Megatron
  engine's rows with the same losses, and stops and resumes exactly.
* A DeepSpeed JSON may add settings but not contradict the run config.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from helpers.e2e import pretrain, rows
from helpers.megatron_harness import GLOBAL_MICRO_BATCH, SEQ, global_batch
from helpers.multiprocess import run_distributed

REPO = Path(__file__).resolve().parent.parent
BATCH_SEEDS = (0, 1)  # two micro-batches per step, so DeepSpeed's accumulation scaling takes part
LAYOUTS = {"tp1-dp2": (1, 2), "tp2-dp1": (2, 1)}  # (tp, dp) on two processes
STAGES = (2, 3)
PROBE_LR = 1e4  # |L·g| >> |p|, so that p - L·g keeps g's digits in fp32
RTOL = 1e-5


# ---- one step of each engine ----------------------------------------------------------------


def _config(tp: int, dp: int, *overrides: str):
    """The DeepSpeed demo config sized to the harness batch (GLOBAL_MICRO_BATCH samples per micro-step);
    its train, optim and deepspeed sections are what the engines read, the model is the harness's."""
    from launch.config import load_config

    sizes = [
        f"parallel.tp={tp}",
        f"train.micro_batch_size={GLOBAL_MICRO_BATCH // dp}",
        f"train.global_batch_size={GLOBAL_MICRO_BATCH * len(BATCH_SEEDS)}",
        "optim.warmup_steps=0",
    ]
    return load_config(REPO / "configs/demo_cpu_deepspeed.yaml", [*sizes, *overrides])


def _reweighted_loss():
    from megatron_patches.loss import ReweightedLoss
    from megatron_patches.reweighting import ReweightSchedule

    return ReweightedLoss(ReweightSchedule("linupper", 0.5), num_domains=2)


def _batches():
    from helpers.megatron_harness import local_batch

    return iter([local_batch(global_batch(seed)) for seed in BATCH_SEEDS])


def _full_tensors(model, read=lambda p: p):
    """Every parameter as a full (TP-gathered) tensor, by global name."""
    from helpers.megatron_harness import full_gradients

    return full_gradients(model, grad_of=read)


def _megatron_step(cfg, full_state):
    """One step of the Megatron engine, built as launch.engines.megatron builds it."""
    from helpers.megatron_harness import forward_step, full_gradients, load_full_state, tiny_gpt
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from launch.engines.megatron import megatron_optimizer_config
    from launch.trainer import lr_scheduler

    model = tiny_gpt()
    load_full_state(model, full_state)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    optimizer = get_megatron_optimizer(megatron_optimizer_config(cfg), [ddp])
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.grad_scale_func = optimizer.scale_loss
    lr_scheduler(cfg, optimizer)
    reports = get_forward_backward_func()(
        forward_step_func=partial(forward_step, _reweighted_loss()),
        data_iterator=_batches(),
        model=[ddp],
        num_microbatches=len(BATCH_SEEDS),
        seq_length=SEQ,
        micro_batch_size=cfg.train.micro_batch_size,
    )
    grads = full_gradients(model)  # before the step clips them
    _, grad_norm, _ = optimizer.step()
    return dict(weights=[r["weights"] for r in reports], grads=grads, grad_norm=grad_norm, params=_full_tensors(model))


def _deepspeed_step(cfg, full_state, sgd_probe: bool = False):
    """One step of the DeepSpeed engine as launch.engines.deepspeed builds it, or with plain SGD."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    from helpers.megatron_harness import forward_step, load_full_state, tiny_gpt

    from launch.engines.deepspeed import build_engine, deepspeed_config
    from launch.trainer import lr_scheduler
    from megatron_patches.deepspeed import MegatronMPU, forward_backward

    model = tiny_gpt()
    load_full_state(model, full_state)
    micro_batches = len(BATCH_SEEDS)
    if sgd_probe:
        sgd = torch.optim.SGD(model.parameters(), lr=PROBE_LR)
        config = {
            **deepspeed_config(cfg, micro_batches),
            "zero_allow_untested_optimizer": True,
        }  # SGD is not on ZeRO's list
        engine, *_ = deepspeed.initialize(model=model, optimizer=sgd, config=config, mpu=MegatronMPU())
    else:
        engine, optimizer = build_engine(cfg, model, micro_batches)
        lr_scheduler(cfg, optimizer)
    reports = forward_backward(engine, partial(forward_step, _reweighted_loss()), _batches(), micro_batches)
    engine.step()
    params = _full_tensors(model, safe_get_full_fp32_param)
    if sgd_probe:
        return {name: (full_state[name] - value) / PROBE_LR for name, value in params.items()}
    return dict(weights=[r["weights"] for r in reports], grad_norm=engine.get_global_grad_norm(), params=params)


def _parity_worker() -> dict:
    """Both layouts in the same two processes: only Megatron's model-parallel groups change."""
    from helpers.megatron_harness import tiny_gpt
    from megatron.core import parallel_state as ps

    from megatron_patches.parallel import destroy_parallel, initialize_parallel

    out = {}
    for layout, (tp, dp) in LAYOUTS.items():
        initialize_parallel(tp, seed=7)
        full_state = _full_tensors(tiny_gpt())  # the same on every rank: one seed, CPU initialisation
        out[layout] = {"megatron": _megatron_step(_config(tp, dp), full_state)}
        for stage in STAGES:
            out[layout][stage] = _deepspeed_step(_config(tp, dp, f"deepspeed.zero_stage={stage}"), full_state)
            probe = _config(tp, dp, f"deepspeed.zero_stage={stage}", "optim.clip_grad=0")
            out[layout][stage]["grads"] = _deepspeed_step(probe, full_state, sgd_probe=True)
        ps.destroy_model_parallel()
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def parity():
    return run_distributed(_parity_worker, 2)


def _assert_tensors_match(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for name, value in actual.items():
        scale = expected[name].abs().max()
        torch.testing.assert_close(
            value, expected[name], rtol=RTOL, atol=RTOL * scale, msg=lambda m, name=name: f"{name}: {m}"
        )


def _assert_adam_steps_match(actual: dict, expected: dict, grads: dict, optim) -> None:
    """Parameters after one AdamW step. The step moves an element by lr·g/(|g| + eps): where
    |g| is near eps, last-bit differences between the engines' gradient sums (summation order,
    which depends on the machine's kernels) change the update by up to lr, so there the
    engines must only agree within one step size; elsewhere they must agree tightly."""
    assert set(actual) == set(expected)
    for name, value in actual.items():
        reference, noisy = expected[name], grads[name].abs() < 1e4 * optim.eps
        scale = reference.abs().max()
        close = torch.isclose(value, reference, rtol=RTOL, atol=RTOL * scale)
        within_a_step = (value - reference).abs() <= optim.lr * (1 + RTOL)
        assert torch.where(noisy, within_a_step, close).all(), f"{name}: {(~close & ~noisy).sum()} elements differ"


@pytest.mark.distributed
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_zero_step_equals_megatron_step(parity, layout, stage):
    for rank in parity:
        megatron, zero = rank[layout]["megatron"], rank[layout][stage]
        for expected, actual in zip(megatron["weights"], zero["weights"], strict=True):
            assert torch.equal(actual, expected)  # bit-identical sample weights
        _assert_tensors_match(zero["grads"], megatron["grads"])
        assert float(zero["grad_norm"]) == pytest.approx(megatron["grad_norm"], rel=RTOL)
        _assert_adam_steps_match(zero["params"], megatron["params"], megatron["grads"], _config(1, 1).optim)


# ---- the DeepSpeed JSON ----------------------------------------------------------------------


def _config_with_json(tmp_path, settings: dict):
    from launch.config import load_config

    path = tmp_path / "deepspeed.json"
    path.write_text(json.dumps(settings))
    return load_config(REPO / "configs/demo_cpu_deepspeed.yaml", [f"deepspeed.config={path}"])


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

    cfg = _config(1, 2, "model.precision=bf16", f"deepspeed.zero_stage={stage}")
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


# ---- end to end: torchrun -m launch.pretrain --config configs/demo_cpu_deepspeed.yaml -----------


DEEPSPEED = "configs/demo_cpu_deepspeed.yaml"


def small(cache_dir: Path) -> tuple[str, ...]:
    """Six steps, Megatron's sample indices shared by every run."""
    return (f"data.cache_dir={cache_dir}", "train.steps=6")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")  # Megatron's sample indices, built once for all runs


@pytest.fixture(scope="module", params=STAGES, ids=lambda stage: f"zero{stage}")
def deepspeed_run(request, tmp_path_factory, demo_dir, cache_dir):
    """(ZeRO stage, run directory) of an uninterrupted run."""
    run_dir = tmp_path_factory.mktemp(f"zero{request.param}")
    pretrain(run_dir, demo_dir, *small(cache_dir), f"deepspeed.zero_stage={request.param}", config=DEEPSPEED)
    return request.param, run_dir


@pytest.fixture(scope="module")
def megatron_run(tmp_path_factory, demo_dir, cache_dir):
    run_dir = tmp_path_factory.mktemp("megatron")
    pretrain(run_dir, demo_dir, *small(cache_dir))
    return run_dir


@pytest.mark.e2e
def test_deepspeed_run_logs_the_megatron_rows_and_trains_alike(deepspeed_run, megatron_run):
    _, run_dir = deepspeed_run
    for kind, loss in (("train", "loss"), ("valid", "valid_loss")):
        ours, theirs = rows(run_dir, kind), rows(megatron_run, kind)
        assert [r["step"] for r in ours] == [r["step"] for r in theirs] == ([2, 4, 6] if kind == "train" else [4, 6])
        for row, expected in zip(ours, theirs):
            assert set(row) == set(expected)
            assert math.isfinite(row[loss])
            assert row[loss] == pytest.approx(expected[loss], rel=1e-5)  # the same steps, up to reduction order
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000006"]


@pytest.mark.e2e
def test_stop_and_resume_continues_exactly(tmp_path, demo_dir, cache_dir, deepspeed_run):
    stage, unbroken = deepspeed_run
    pretrain(
        tmp_path, demo_dir, *small(cache_dir), f"deepspeed.zero_stage={stage}", "train.exit_after=4", config=DEEPSPEED
    )
    assert [r["step"] for r in rows(tmp_path, "train")] == [2, 4]
    result = pretrain(tmp_path, demo_dir, *small(cache_dir), f"deepspeed.zero_stage={stage}", config=DEEPSPEED)
    assert "resuming from" in result.stdout and "step_00000004" in result.stdout
    for kind, keys in (
        ("train", ("step", "loss", "weighted_loss", "lr", "grad_norm")),
        ("valid", ("step", "valid_loss")),
    ):
        expected = [[r[k] for k in keys] for r in rows(unbroken, kind)]
        assert [[r[k] for k in keys] for r in rows(tmp_path, kind)] == expected


def test_a_contradicting_deepspeed_json_is_refused_before_any_process_starts(tmp_path):
    """validate (and so --dry-run) finds what building the engine would refuse."""
    from launch.config import ConfigError, validate

    cfg = _config_with_json(tmp_path, {"zero_optimization": {"stage": 3}})
    with pytest.raises(ConfigError, match="zero_optimization.stage"):
        validate(cfg, 2)
    validate(_config_with_json(tmp_path, {"zero_optimization": {"reduce_bucket_size": 1000}}), 2)
