"""What reading the data costs the training thread, per micro-batch, with and without workers.

    python -m launch.tools.loader_bench --config configs/demo_cpu.yaml \\
        --set train.micro_batch_size=8 --set model.seq_length=512

One process reads the run's first training steps through `launch.data.MicroBatchLoader` once
per `--workers` setting, and between micro-batches waits `--compute-ms`, as the host of a GPU
does while the step computes; the figure is the time `next()` holds the training thread
(the first micro-batch, which starts the workers, is reported apart).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

from launch import quiet

quiet.install()  # before anything imports Megatron-Core (launch.config does)

from launch.config import load_config  # noqa: E402
from launch.data import MicroBatchLoader, build_train_dataset  # noqa: E402
from launch.sources import DataSources, check_files  # noqa: E402
from megatron_patches.parallel import initialize_parallel  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.tools.loader_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/demo_cpu.yaml")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="data.num_workers to compare")
    parser.add_argument("--steps", type=int, default=20, help="training steps read per setting (default: 20)")
    parser.add_argument("--compute-ms", type=float, default=10.0, help="the step's compute per micro-batch")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="extend", nargs="+", default=[])
    return parser.parse_args(argv)


def training_thread_ms(loader: MicroBatchLoader, steps: int, compute_ms: float) -> tuple[float, list[float]]:
    """The first micro-batch's wait, and every later one's, in milliseconds."""
    waits = []
    for step in range(steps):
        batches = loader.micro_batches(step)
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            waits.append(1e3 * (time.perf_counter() - start))
            if batch is None:
                break
            time.sleep(compute_ms / 1e3)
        waits.pop()  # the end of the step's micro-batches
    loader.close()
    return waits[0], waits[1:]


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, [f"train.steps={args.steps}", *args.overrides])
    check_files(cfg)
    initialize_parallel()
    with tempfile.TemporaryDirectory() as cache:
        dataset = build_train_dataset(cfg, DataSources.open(cfg), Path(cache))
        t = cfg.train
        print(
            f"{t.micro_batch_size} x {cfg.model.seq_length} tokens per micro-batch, {args.compute_ms:g} ms of compute"
        )
        print("data.num_workers | training thread per micro-batch: median, mean (ms) | first micro-batch (ms)")
        for workers in args.workers:
            run = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=workers))
            first, waits = training_thread_ms(MicroBatchLoader(dataset, run, args.steps), args.steps, args.compute_ms)
            print(f"{workers:>16} | {statistics.median(waits):>26.3f}, {statistics.fmean(waits):.3f} | {first:.1f}")


if __name__ == "__main__":
    main()
