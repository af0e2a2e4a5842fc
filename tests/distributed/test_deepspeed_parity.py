"""One ZeRO-2/ZeRO-3 step of `engine: deepspeed` (a real DeepSpeed engine on two gloo processes,
DP=2 or TP=2) on a global batch of two micro-batches with the reweighted loss gives the Megatron
engine's step from the same weights on the same batch: the same sample weights, gradient,
gradient norm and AdamW update.  The gradient that ZeRO reduces and partitions is read through
its optimizer: a plain SGD step with learning rate L moves every parameter by exactly -L·g."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from helpers import REPO
from helpers.megatron_harness import GLOBAL_MICRO_BATCH, SEQ, global_batch
from helpers.multiprocess import run_distributed

BATCH_SEEDS = (0, 1)  # two micro-batches per step, so DeepSpeed's accumulation scaling takes part


LAYOUTS = {"tp1-dp2": (1, 2), "tp2-dp1": (2, 1)}  # (tp, dp) on two processes


STAGES = (2, 3)


PROBE_LR = 1e4  # |L·g| >> |p|, so that p - L·g keeps g's digits in fp32


RTOL = 1e-5


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
