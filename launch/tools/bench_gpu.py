"""The GPU check in one command (`make bench-gpu`): speed, memory and bf16 numerics on this GPU.

    python -m launch.tools.bench_gpu            # on a machine with a GPU, a few minutes
    python -m launch.tools.bench_gpu --device cpu   # the same table for a tiny model on the CPU

One table, a row per case: GPT-2 124M in bf16 (micro-batch 8, seq 512) and a block of two
Llama-2 7B layers at seq 4096, each on the local layer (SDPA attention) and, where Transformer
Engine is installed, on its layer too. Per row: tokens/s, TFLOP/s, MFU (launch/throughput.py),
the peak of allocated memory against the dry run's estimate, the linupper/uniform step-time
ratio with its 95 % interval (launch.tools.bench's interleaved rounds), and the loss after N
steps beside an fp32 reference of the same steps, weights and batches on this machine's CPU
(computed meanwhile in a second process). Random tokens, one process, one GPU, no data files.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

from launch import quiet

quiet.install()  # before anything imports Megatron-Core (launch.config does)

import torch  # noqa: E402

from launch.config import load_config, validate  # noqa: E402
from launch.dry_run import count_parameters, estimate_memory  # noqa: E402
from launch.throughput import Throughput  # noqa: E402
from launch.tools.bench import measure  # noqa: E402
from launch.tools.stats import mean_and_interval  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ONE_MICRO_BATCH = ["train.global_batch_size={m}", "train.micro_batch_size={m}"]
# name: (config, settings on a GPU, sequences per step, one micro-batch); --device cpu shrinks
# every case alike (TINY, 2 sequences).
CASES = {
    "gpt2-124m": ("gpt2-124m.yaml", [], 8),  # seq 512
    "llama-7b block": (
        "llama-7b.yaml",
        ["model.num_layers=2", "parallel.tp=1", "parallel.sequence_parallel=false", "model.seq_length=4096"],
        1,
    ),
}
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=192"]
TINY += ["model.seq_length=32", "model.vocab_size=256", "model.num_query_groups=null"]
BATCH_POOL = 4  # seeded batches of random tokens, cycled through: the same in both processes


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.tools.bench_gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a tiny model, for CI")
    parser.add_argument("--pairs", type=int, default=20, help="timed rounds of a uniform and a linupper step")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default: 3)")
    parser.add_argument("--steps", type=int, default=5, help="steps before the loss is compared (default: 5)")
    parser.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)  # the fp32 CPU process
    args = parser.parse_args(argv)
    if args.pairs < 2 or args.warmup < 0 or args.steps < 1:
        parser.error("--pairs must be >= 2, --warmup >= 0 and --steps >= 1")
    return args


def case_config(name: str, *, tiny: bool, precision: str, impl: str = "local"):
    path, settings, rows = CASES[name]
    rows = 2 if tiny else rows
    batch = [setting.format(m=rows) for setting in ONE_MICRO_BATCH]
    overrides = [*settings, *(TINY if tiny else []), *batch, f"model.precision={precision}"]
    cfg = load_config(
        CONFIGS / path, [*overrides, f"model.transformer_impl={impl}", "parallel.distributed_optimizer=false"]
    )
    validate(cfg, 1)
    return cfg


class _Run:
    """A model, its engine and the loss it trains with: what launch.tools.bench's rounds step."""

    def __init__(self, cfg):
        from launch.engines import engine_class
        from launch.model import build_model
        from launch.sources import padded_vocab_size

        self.cfg, self.step = cfg, 0
        self.vocab = padded_vocab_size(cfg, cfg.model.vocab_size)
        self.model = build_model(cfg, self.vocab)
        self.engine = engine_class(cfg.engine)(cfg, [self.model], 1)
        self.loss = _loss("uniform")
        m, seq = cfg.train.micro_batch_size, cfg.model.seq_length
        generator = torch.Generator().manual_seed(cfg.train.seed)
        tokens = torch.randint(0, cfg.model.vocab_size, (BATCH_POOL, m, seq + 1), generator=generator)
        self.batches = [
            dict(
                tokens=t[:, :-1],
                labels=t[:, 1:],
                loss_mask=torch.ones(m, seq),
                position_ids=torch.arange(seq).expand(m, seq),
                domains=torch.zeros(m, dtype=torch.long),
            )
            for t in tokens
        ]

    def train_step(self) -> float:
        from launch.trainer import _forward_step

        batch = self.batches[self.step % BATCH_POOL]
        [report] = self.engine.forward_backward(partial(_forward_step, self.loss), iter([batch]), 1, forward_only=False)
        self.engine.step()
        return float(report["lm_loss"])


def _loss(strategy: str):
    from megatron_patches.loss import ReweightedLoss
    from megatron_patches.reweighting import ReweightSchedule

    return ReweightedLoss(ReweightSchedule(strategy=strategy, temperature=1.0))


def losses_after(run: _Run, steps: int) -> float:
    loss = float("nan")
    for _ in range(steps):
        loss = run.train_step()
        run.step += 1
    return loss


def reference(steps: int, tiny: bool) -> int:
    """Every case's fp32 loss after its first `steps` steps, as JSON on stdout: the CPU process's job."""
    from megatron_patches.parallel import initialize_parallel

    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))  # a core left for the GPU process
    initialize_parallel(seed=1)
    runs = {name: partial(case_config, name, tiny=tiny, precision="fp32") for name in CASES}
    print(json.dumps({name: losses_after(_Run(cfg()), steps) for name, cfg in runs.items()}))
    return 0


def _start_reference(args, tiny: bool) -> subprocess.Popen:
    command = [sys.executable, "-m", "launch.tools.bench_gpu", "--reference", "--steps", str(args.steps)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # this process's CPU, whatever the machine has
    if tiny:
        command += ["--device", "cpu"]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _reference_losses(process: subprocess.Popen) -> dict[str, float]:
    out, err = process.communicate()
    if process.returncode != 0:
        last = (err.strip().splitlines() or ["no message"])[-1]
        print(f"bench-gpu: the fp32 CPU reference failed: {last}", file=sys.stderr)
        return {}
    return json.loads(out.strip().splitlines()[-1])


def measure_case(name: str, impl: str, args, gpu: bool) -> dict:
    """One row: train `args.steps` uniform steps, then interleaved rounds of uniform and linupper."""
    cfg = case_config(name, tiny=not gpu, precision="bf16", impl=impl)
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    run = _Run(cfg)
    loss = losses_after(run, args.steps)
    times = measure(run, {"uniform": _loss("uniform"), "linupper": _loss("linupper")}, args.pairs, args.warmup)
    figures = Throughput(cfg, run.vocab, 1).row(sorted(times["uniform"])[len(times["uniform"]) // 2])
    ratio, interval = mean_and_interval([r / u for r, u in zip(times["linupper"], times["uniform"])])
    estimate = estimate_memory(cfg, count_parameters(cfg, cfg.model.vocab_size), 1, gpu=gpu).total / 2**30
    peak = (torch.cuda.max_memory_allocated() - start) / 2**30 if gpu else None
    del run
    gc.collect()
    return dict(
        case=name, impl=impl, loss=loss, ratio=ratio, interval=interval, peak=peak, estimate=estimate, **figures
    )


def table(rows: list[dict], references: dict, device_name: str, steps: int) -> str:
    lines = [
        f"bench-gpu on {device_name}: bf16, one process",
        f"{'case':<16} {'layer':<19} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB / est.':>16}"
        f" {'linupper/uniform [95% CI]':>27} {f'loss@{steps} bf16 / fp32 CPU':>24}",
    ]
    for row in rows:
        mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        peak = "n/a" if row["peak"] is None else f"{row['peak']:.2f}"
        memory = f"{peak} / {row['estimate']:.2f}"
        low, high = row["interval"]
        ratio = f"{row['ratio']:.3f} [{low:.3f}, {high:.3f}]"
        ref = references.get(row["case"])
        loss = f"{row['loss']:.4f} / " + ("failed" if ref is None else f"{ref:.4f}")
        lines.append(
            f"{row['case']:<16} {row['impl']:<19} {row['tokens_per_s']:>10,.0f} {row['tflops_per_device']:>8.1f}"
            f" {mfu:>6} {memory:>16} {ratio:>27} {loss:>24}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.reference:
        return reference(args.steps, tiny=args.device == "cpu")
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        print("bench-gpu: no CUDA GPU here (torch.cuda.is_available() is false); run it on a GPU machine,"
              " or --device cpu for the same table of a tiny model", file=sys.stderr)  # fmt: skip
        return 2
    if not gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything asks torch.cuda
    from megatron_patches.parallel import initialize_parallel
    from megatron_patches.specs import transformer_engine_available

    references = _start_reference(args, tiny=not gpu)  # meanwhile, on the CPU
    initialize_parallel(seed=1)
    impls = ["local", "transformer_engine"] if gpu and transformer_engine_available() else ["local"]
    rows = [measure_case(name, impl, args, gpu) for name in CASES for impl in impls]
    losses = _reference_losses(references)
    device_name = torch.cuda.get_device_name() if gpu else "CPU (tiny model: the table's plumbing only)"
    print(table(rows, losses, device_name, args.steps), flush=True)
    return 0 if losses else 1


if __name__ == "__main__":
    sys.exit(main())
