"""What reweighting costs: training steps of `uniform`, a reweighted strategy per sequence and the
same per document segment (`reweight.unit: document`), interleaved.

    torchrun --standalone --nproc-per-node 2 -m launch.tools.bench --config configs/demo_cpu.yaml

One process group and one model: rounds of steps alternate the loss between the three (each
round in another order), so warm-up, caches, clock drift and other load fall on all alike.
Every batch carries its document segments, found on the host as a document run finds them, so
the arms differ in the loss alone. An overhead is the mean of the per-round ratios of step
times to uniform's, with a 95 % Student t-interval over the rounds. The model trains on as
usual (the figures are of speed, not of the model); checkpoints and metrics go to a
temporary directory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from launch import quiet

quiet.install()  # before anything imports Megatron-Core (launch.config does)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from launch.config import ConfigError, load_config, validate  # noqa: E402
from launch.console import say  # noqa: E402
from launch.sources import check_files  # noqa: E402
from launch.throughput import Throughput  # noqa: E402
from launch.tools.stats import mean_and_interval  # noqa: E402
from megatron_patches.device import on_gpu  # noqa: E402
from megatron_patches.loss import ReweightedLoss  # noqa: E402
from megatron_patches.reweighting import ReweightSchedule, check_strategy  # noqa: E402

EXAMPLE = """\
example (the demo model on 2 CPU processes; make demo-data first):
  python -m launch.torchrun --standalone --nproc-per-node 2 -m launch.tools.bench --config configs/demo_cpu.yaml \\
      --pairs 30
on a GPU node, the same with a model config and --nproc-per-node 8.
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m launch.tools.bench",
        description=__doc__.split("\n\n")[0],
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="the run's YAML config")
    parser.add_argument("--strategy", default="linupper", help="the reweighted strategy (default: linupper)")
    parser.add_argument("--temperature", type=float, default=1.0, help="its temperature (default: 1.0)")
    parser.add_argument("--pairs", type=int, default=30, help="timed rounds, a step of each arm (default: 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default: 3)")
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="extend",
        nargs="+",
        default=[],
        help="override a config field, as for launch.pretrain",
    )
    args = parser.parse_args(argv)
    if args.pairs < 2 or args.warmup < 0:
        parser.error("--pairs must be >= 2 and --warmup >= 0")
    if args.strategy == "uniform":
        parser.error("--strategy uniform: uniform is the baseline every arm is compared with; name a reweighting")
    return args


def _timed_step(trainer) -> float:
    if on_gpu():
        torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    trainer.train_step()
    if on_gpu():
        torch.cuda.synchronize()
    dist.barrier()  # a step is as slow as its slowest rank
    trainer.step += 1
    return time.perf_counter() - start


class _PerSequence:
    """A loss of one unit per row, on batches that also carry document segments (it leaves them)."""

    def __init__(self, loss: ReweightedLoss):
        self.loss, self.schedule = loss, loss.schedule  # the trainer's after-step hook reads .schedule

    def __call__(self, loss_mask, domains, token_losses, **units):
        return self.loss(loss_mask, domains, token_losses)


def arms(trainer, strategy: str, temperature: float) -> dict:
    """The losses compared, by label: uniform and `strategy` per sequence, `strategy` per document."""
    rw, domains = trainer.cfg.reweight, trainer.loss.num_domains

    def loss(name: str, units_per_row: int = 1) -> ReweightedLoss:
        schedule = ReweightSchedule(strategy=name, temperature=1.0 if name == "uniform" else temperature)
        return ReweightedLoss(schedule, delta=rw.delta, num_domains=domains, units_per_row=units_per_row)

    return {
        "uniform": _PerSequence(loss("uniform")),
        strategy: _PerSequence(loss(strategy)),
        f"{strategy}-document": loss(strategy, rw.max_segments_per_sample),
    }


def measure(trainer, losses: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Step times of every loss, `rounds` each after `warmup` untimed rounds."""
    names = list(losses)
    times = {name: [] for name in names}
    for round_ in range(warmup + rounds):
        shift = round_ % len(names)  # each arm goes first, second and last alike
        for name in names[shift:] + names[:shift]:
            trainer.loss = losses[name]
            seconds = _timed_step(trainer)
            if round_ >= warmup:
                times[name].append(seconds)
    return times


def report(times: dict[str, list[float]], throughput: Throughput) -> str:
    (baseline, base_times), *reweighted = times.items()
    lines = [
        f"{'loss':<20} {'step ms (median, IQR)':>24} {'tokens/s':>11} {'TFLOP/s/dev':>12} {'MFU':>7} {'peak GiB':>9}"
    ]
    for label, values in times.items():
        median = statistics.median(values)
        q1, _, q3 = statistics.quantiles(values, n=4)
        figures = throughput.row(median)
        mfu = "n/a" if figures["mfu"] is None else f"{100 * figures['mfu']:.1f}%"
        lines.append(
            f"{label:<20} {1e3 * median:>10.1f} [{1e3 * q1:.1f}, {1e3 * q3:.1f}]".ljust(45)
            + (
                f" {figures['tokens_per_s']:>11,.0f} {figures['tflops_per_device']:>12.4f}"
                f" {mfu:>7} {figures['peak_memory_gib']:>9.2f}"
            )
        )
    for name, values in reweighted:
        ratios = [r / u for r, u in zip(values, base_times)]
        overhead, interval = mean_and_interval(ratios)
        lines.append(
            f"overhead {name}/{baseline}: {overhead:.4f} [{interval[0]:.4f}, {interval[1]:.4f}]"
            f" (mean of {len(ratios)} paired step-time ratios, 95% t-interval)"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    # reweight.unit=document: every batch carries its segments, whichever arm steps on it.
    settings = [
        *args.overrides,
        "checkpoint.interval=1000000000",
        "train.eval_interval=1000000000",
        "reweight.unit=document",
    ]
    try:
        check_strategy(args.strategy, args.temperature)
        cfg = load_config(args.config, settings)
        steps = 3 * (args.warmup + args.pairs)
        if cfg.train.steps < steps:  # the LR schedule must last the whole measurement
            cfg = load_config(args.config, [*settings, f"train.steps={steps}"])
        validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        check_files(cfg)
    except (ConfigError, ValueError) as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    from launch.trainer import Trainer

    # One directory for the ranks of this job (torchrun's run id; the pid without torchrun), so
    # that they share Megatron's sample-index cache; on several nodes set data.cache_dir.
    run_dir = Path(tempfile.gettempdir()) / f"launch-bench-{os.environ.get('TORCHELASTIC_RUN_ID', os.getpid())}"
    trainer = Trainer(cfg, run_dir)
    times = measure(trainer, arms(trainer, args.strategy, args.temperature), args.pairs, args.warmup)
    throughput = Throughput(cfg, trainer.sources.padded_vocab_size, dist.get_world_size())
    dist.barrier()
    if dist.get_rank() == 0:
        say(report(times, throughput))
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
