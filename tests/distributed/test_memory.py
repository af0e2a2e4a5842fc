"""The dry run's memory model against real steps (fp32): the activations a layer keeps for its
backward pass, counted exactly as autograd saves them, and the memory a whole training step takes
(the allocator's peak on a GPU, the resident set's on a CPU), for a GPT-2 and a Llama model."""

from __future__ import annotations

import pytest
from helpers.e2e import REPO
from helpers.multiprocess import run_distributed

# Model and optimizer state dominate, as in pretraining. The activation term is Korthikanti et
# al.'s for flash attention; the CPU's math attention and allocator keep about 1.5x that
# (measured: 150-170 MiB against 106 estimated at 6 x 512 hidden, seq 128, 4 samples). Measured
# here: 1794-1864 MiB against 1640 estimated, the higher ones with a second test running.
SHAPE = [
    "model.num_layers=8",
    "model.hidden_size=1024",
    "model.num_attention_heads=16",
    "model.seq_length=64",
    "model.vocab_size=2048",
    "model.precision=fp32",
    "train.micro_batch_size=2",
    "train.global_batch_size=2",
]
# A Llama-style layer (RoPE, RMSNorm, SwiGLU, no biases, untied), on top of SHAPE.
LLAMA = [
    "model.position_embedding=rope",
    "model.normalization=RMSNorm",
    "model.activation=swiglu",
    "model.add_bias_linear=false",
    "model.untie_embeddings=true",
]


def _resident_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak so far) of this process, in KiB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


class _Memory:
    """What the training state takes where it lives, in bytes: the CUDA allocator's count on a GPU;
    on a CPU, the resident set, with the building's freed copies given back to the system."""

    def __init__(self, gpu: bool):
        self.gpu = gpu
        self.start = self._now()

    def _now(self) -> int:
        import torch

        return torch.cuda.memory_allocated() if self.gpu else _resident_kib("VmRSS") * 1024

    def restart_peak(self) -> None:
        import ctypes
        from pathlib import Path

        import torch

        if self.gpu:
            torch.cuda.reset_peak_memory_stats()
        else:  # Megatron's CPU initialisation copies each weight once
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")

    def peak_growth(self) -> int:
        import torch

        peak = torch.cuda.max_memory_allocated() if self.gpu else _resident_kib("VmHWM") * 1024
        return peak - self.start


def _saved_per_layer(cases: dict[str, list[str]]) -> dict:
    """For each case, the bytes this rank's layer keeps for its backward pass (the storages
    autograd saves in a forward, weights aside; a layer's share is the difference of a 2- and a
    1-layer model) and the dry run's estimate of them, under TP 2."""
    import torch

    from launch.config import load_config
    from launch.model import build_model
    from launch.models import family_of
    from launch.sources import padded_vocab_size
    from megatron_patches.parallel import destroy_parallel, initialize_parallel

    torch.set_num_threads(1)
    initialize_parallel(tp=2, seed=1)

    def saved(overrides: list[str]) -> int:
        cfg = load_config(REPO / "configs/demo_cpu.yaml", overrides)
        model = build_model(cfg, padded_vocab_size(cfg, cfg.model.vocab_size))
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        m, seq = cfg.train.micro_batch_size, cfg.model.seq_length
        tokens = torch.randint(0, cfg.model.vocab_size, (m, seq))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(tokens, torch.arange(seq).expand(m, seq), None, labels=tokens)
        return sum(storages.values())

    results = {}
    for name, overrides in cases.items():
        overrides = [*overrides, "parallel.tp=2"]
        measured = saved([*overrides, "model.num_layers=2"]) - saved([*overrides, "model.num_layers=1"])
        cfg = load_config(REPO / "configs/demo_cpu.yaml", overrides)
        per_token = family_of(cfg.model).activation_bytes(cfg.model, gpu=False)
        tokens = cfg.train.micro_batch_size * cfg.model.seq_length
        estimate = 2 * tokens * (per_token.replicated + per_token.sharded / 2)  # fp32: twice bf16
        results[name] = dict(measured=measured, estimate=estimate)
    destroy_parallel()
    return results


@pytest.mark.slow
def test_the_activation_estimate_is_what_a_layer_keeps_for_its_backward_pass():
    # Left out of the estimate: per-sequence RoPE tables and per-token norm statistics (< 2 %).
    shape = [*SHAPE, "model.hidden_size=256", "model.num_attention_heads=8", "model.ffn_hidden_size=768"]
    cases = {
        "gpt2": shape,
        "llama": [*shape, *LLAMA],
        "llama, GQA": [*shape, *LLAMA, "model.num_query_groups=4"],
    }
    for rank in run_distributed(_saved_per_layer, 2, cases):
        for name, result in rank.items():
            print(f"{name}: a layer keeps {result['measured']:,} bytes, estimated {result['estimate']:,.0f}")
            assert result["measured"] == pytest.approx(result["estimate"], rel=0.02), name


def _measure(overrides: list[str]) -> dict:
    """Peak growth of the memory the run holds over two steps, and the dry run's estimate, in bytes."""
    from functools import partial

    import torch

    from launch.config import load_config
    from launch.dry_run import count_parameters, estimate_memory
    from launch.engines import engine_class
    from launch.model import build_model
    from launch.sources import padded_vocab_size
    from launch.trainer import _forward_step
    from megatron_patches.device import on_gpu
    from megatron_patches.loss import ReweightedLoss
    from megatron_patches.parallel import destroy_parallel, initialize_parallel
    from megatron_patches.reweighting import ReweightSchedule

    torch.set_num_threads(1)
    cfg = load_config(REPO / "configs/demo_cpu.yaml", [*SHAPE, *overrides])
    initialize_parallel(seed=1)
    engine_class(cfg.engine)  # its imports are not the model's memory
    memory = _Memory(on_gpu())
    model = build_model(cfg, padded_vocab_size(cfg, cfg.model.vocab_size))
    engine = engine_class(cfg.engine)(cfg, [model], 1)
    memory.restart_peak()  # only what the run keeps counts, not what building it freed
    loss = ReweightedLoss(ReweightSchedule("linupper", 1.0))
    m, seq = cfg.train.micro_batch_size, cfg.model.seq_length
    for _ in range(2):
        tokens = torch.randint(0, cfg.model.vocab_size, (m, seq + 1))
        batch = dict(
            tokens=tokens[:, :-1],
            labels=tokens[:, 1:],
            loss_mask=torch.ones(m, seq),
            position_ids=torch.arange(seq).expand(m, seq),
            domains=torch.zeros(m, dtype=torch.long),
        )
        engine.forward_backward(partial(_forward_step, loss), iter([batch]), 1, forward_only=False)
        engine.step()
    measured = memory.peak_growth()
    estimate = estimate_memory(cfg, count_parameters(cfg, cfg.model.vocab_size), 1, gpu=on_gpu())
    destroy_parallel()
    return dict(measured=measured, estimate=estimate._asdict(), total=estimate.total)


@pytest.mark.parametrize("overrides", [[], LLAMA], ids=["gpt2", "llama"])
def test_the_memory_estimate_is_within_20_percent_of_a_real_step(monkeypatch, overrides):
    # Fewer malloc arenas: the resident set then follows what the tensors take, not how many
    # threads happened to allocate (an unbounded count of arenas varied it by ~100 MiB).
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    [result] = run_distributed(_measure, 1, overrides)
    print(
        f"measured {result['measured'] / 2**20:.0f} MiB, estimated {result['total'] / 2**20:.0f} MiB:"
        f" { {k: round(v / 2**20) for k, v in result['estimate'].items()} }"
    )
    assert result["measured"] == pytest.approx(result["total"], rel=0.2)
