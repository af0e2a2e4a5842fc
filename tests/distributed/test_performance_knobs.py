"""Megatron-LM's performance features change how a step runs, never what it computes.

Each knob runs through the project's Megatron engine (`launch.engines.megatron`) on real gloo
groups, with the reweighted loss, and is compared with the same run without it, in the same
processes (fp32): the losses of every step, the reduced gradients, the gradient norms and the
parameters after the optimizer steps. Activation recomputation must also lower the measured
peak memory of a forward and backward pass.
"""

from __future__ import annotations

import pytest
import torch
from helpers.multiprocess import run_distributed

SEQ, VOCAB, GLOBAL_MICRO_BATCH = 32, 128, 4
STEPS, MICRO_BATCHES = 2, 4  # 4 = 2 x PP: the interleaved schedule's steady state sends both ways
SMALL_BUCKETS = 5000  # parameters per bucket: the tiny model's ~220k make many buckets


def _config(overrides: dict, world_size: int):
    from launch.config import from_dict

    parallel = {"tp": 1, "pp": 1, **overrides.get("parallel", {})}
    dp = world_size // (parallel["tp"] * parallel["pp"])
    return from_dict(
        {
            "model": {
                "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "seq_length": SEQ,
                "vocab_size": VOCAB, "precision": "fp32", "transformer_impl": "local",
                **overrides.get("model", {}),
            },
            "parallel": parallel,
            "train": {
                "micro_batch_size": GLOBAL_MICRO_BATCH // dp,
                "global_batch_size": MICRO_BATCHES * GLOBAL_MICRO_BATCH,
            },
            "optim": {"lr": 1e-2, "warmup_steps": 0},
        }
    )  # fmt: skip


def _train(overrides: dict) -> dict:
    """This rank's losses, full gradients, grad norms and parameters over STEPS steps."""
    import os
    from functools import partial

    from helpers.megatron_harness import (
        _named_local_parameters,
        forward_step,
        full_gradients,
        global_batch,
        local_batch,
    )
    from megatron.core import parallel_state as ps

    from launch.engines.megatron import Engine
    from launch.model import build_model_chunks
    from megatron_patches.loss import ReweightedLoss
    from megatron_patches.parallel import initialize_parallel
    from megatron_patches.reweighting import ReweightSchedule

    cfg = _config(overrides, int(os.environ["WORLD_SIZE"]))
    p = cfg.parallel
    initialize_parallel(p.tp, p.pp, seed=7, vpp=p.virtual_pipeline_size)
    chunks = build_model_chunks(cfg, VOCAB)
    engine = Engine(cfg, chunks, MICRO_BATCHES)
    loss = ReweightedLoss(ReweightSchedule("linupper", 0.5))
    out = {"losses": [], "grads": [], "grad_norms": [], "chunks": len(chunks)}
    out["buckets"] = sum(len(chunk.bucket_groups) for chunk in engine.wrapped_chunks)
    for step in range(STEPS):
        batches = [local_batch(global_batch(seed=10 * step + i)) for i in range(MICRO_BATCHES)]
        reports = engine.forward_backward(partial(forward_step, loss), iter(batches), MICRO_BATCHES, forward_only=False)
        out["losses"].append([float(r["weighted_loss"]) for r in reports])
        if not p.distributed_optimizer:  # the distributed optimizer keeps only its shard reduced
            out["grads"].append({k: v for chunk in chunks for k, v in full_gradients(chunk).items()})
        out["grad_norms"].append(engine.step())
    if p.overlap_param_gather:  # the last step's all-gather waits for a next forward pass
        for chunk in engine.wrapped_chunks:
            chunk.start_param_sync(force_sync=True)
    out["params"] = {name: param.detach().clone() for chunk in chunks for name, param in _named_local_parameters(chunk)}
    ps.destroy_model_parallel()  # the next setting builds its own groups in the same world
    return out


def _train_each(*settings: dict) -> list[dict]:
    """`_train` under each setting in turn, in one set of processes."""
    return [_train(overrides) for overrides in settings]


def _merged(results: list[dict], key: str, step: int | None = None) -> dict:
    """One dict over the ranks of a pipeline (each holds its own layers)."""
    merged = {}
    for rank in results:
        merged.update(rank[key] if step is None else rank[key][step])
    return merged


def _assert_same_run(off: list[dict], on: list[dict]) -> None:
    """Per rank: the same losses and grad norms at every step, the same gradients and parameters."""
    for rank_off, rank_on in zip(off, on):
        assert [len(losses) for losses in rank_on["losses"]] == [len(losses) for losses in rank_off["losses"]]
        assert sum(rank_on["losses"], []) == pytest.approx(sum(rank_off["losses"], []), rel=1e-6)
        assert rank_on["grad_norms"] == pytest.approx(rank_off["grad_norms"], rel=1e-6)
    for step in range(len(off[0]["grads"])):
        torch.testing.assert_close(_merged(on, "grads", step), _merged(off, "grads", step), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(_merged(on, "params"), _merged(off, "params"), rtol=1e-6, atol=1e-7)


def test_overlapped_grad_reduce_in_small_buckets_equals_one_reduce_after_the_backward():
    off, on = zip(
        *run_distributed(_train_each, 2, {}, {"parallel": {"overlap_grad_reduce": True, "bucket_size": SMALL_BUCKETS}})
    )
    assert on[0]["buckets"] > 4 and off[0]["buckets"] == 1
    assert all(loss for rank in off for loss in rank["losses"])  # every step reported its micro-batches
    _assert_same_run(list(off), list(on))


@pytest.mark.slow
def test_overlapped_param_gather_equals_the_distributed_optimizer_without_overlap():
    # The second step's losses are computed with the parameters the overlapped all-gather brought.
    sharded = {"distributed_optimizer": True}
    overlapped = {**sharded, "overlap_grad_reduce": True, "overlap_param_gather": True, "bucket_size": SMALL_BUCKETS}
    off, on = zip(*run_distributed(_train_each, 2, {"parallel": sharded}, {"parallel": overlapped}))
    assert on[0]["buckets"] > 4
    _assert_same_run(list(off), list(on))


@pytest.mark.slow
def test_the_interleaved_pipeline_schedule_equals_the_plain_one():
    plain, interleaved = ({"parallel": {"pp": 2}}, {"parallel": {"pp": 2, "virtual_pipeline_size": 2}})
    off, on = zip(*run_distributed(_train_each, 2, plain, interleaved))
    assert [rank["chunks"] for rank in on] == [2, 2]
    assert on[0]["losses"] == [[], []] and all(len(losses) == MICRO_BATCHES for losses in on[1]["losses"])
    assert set(_merged(list(on), "params")) == set(_merged(list(off), "params"))  # every layer, once
    _assert_same_run(list(off), list(on))


RECOMPUTE = {
    "full-uniform": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    "full-block": {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 2},
    "selective": {"recompute_granularity": "selective"},
}


def test_recomputation_gives_the_same_losses_and_gradients_dropout_included():
    # Dropout on: the recomputed forward must draw the masks the first forward drew.
    dropout = {"hidden_dropout": 0.1, "attention_dropout": 0.1}
    off, *ons = run_distributed(
        _train_each, 1, {"model": dropout}, *({"model": {**dropout, **knob}} for knob in RECOMPUTE.values())
    )[0]
    for on in ons:
        _assert_same_run([off], [on])


# Activations dominate: 4 layers of 256 hidden over 8 x 512 tokens keep ~70 MiB each in fp32.
MEMORY_SHAPE = {"num_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "seq_length": 512}
MEMORY_BATCH = 8


def _resident_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _peak_memory(settings: dict[str, dict]) -> dict[str, int]:
    """Per setting, the peak growth of the resident set over one forward and backward pass, in
    bytes (the least of two passes). The parent fixes malloc's mmap threshold, so every tensor
    above 64 KiB is mapped when made and unmapped when freed: the resident set follows the
    live tensors."""
    import ctypes
    from pathlib import Path

    from launch.model import build_model
    from megatron_patches.parallel import destroy_parallel, initialize_parallel

    torch.set_num_threads(1)
    initialize_parallel(seed=7)
    models = {
        name: build_model(_config({"model": {**MEMORY_SHAPE, **knob}}, 1), VOCAB) for name, knob in settings.items()
    }
    seq = MEMORY_SHAPE["seq_length"]
    tokens = torch.randint(0, VOCAB, (MEMORY_BATCH, seq + 1), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(seq).expand(MEMORY_BATCH, seq)
    # One document per sample, as data.reset_attention_mask hands it: SDPA then takes an explicit mask.
    documents = torch.zeros(MEMORY_BATCH, seq, dtype=torch.long)
    peaks = {name: [] for name in settings}
    for _ in range(2):
        for name, model in models.items():
            model.zero_grad(set_to_none=True)
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # restarts the peak (VmHWM) at the current size
            start = _resident_kib("VmRSS")
            model(tokens[:, :-1], positions, documents, labels=tokens[:, 1:]).sum().backward()
            peaks[name].append((_resident_kib("VmHWM") - start) * 1024)
    destroy_parallel()
    return {name: min(values) for name, values in peaks.items()}


@pytest.mark.slow
def test_recomputation_lowers_the_measured_peak_memory(monkeypatch):
    # With the document mask (data.reset_attention_mask) SDPA keeps what selective recomputation
    # saves; with the causal mask alone torch's flash kernel keeps only its output, so selective
    # recomputation saves nothing there (measured: 278 MiB either way, full recomputation 102 MiB).
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))  # also switches off its dynamic growth
    monkeypatch.setenv("MALLOC_ARENA_MAX", "1")
    settings = {"none": {}, "selective": RECOMPUTE["selective"], "full": RECOMPUTE["full-uniform"]}
    [peak] = run_distributed(_peak_memory, 1, settings)
    print({name: f"{value / 2**20:.0f} MiB" for name, value in peak.items()})
    assert peak["full"] < 0.5 * peak["none"]  # measured: 109 against 310 MiB
    assert peak["selective"] < peak["none"] - 8 * 2**20  # measured: 32 MiB less
