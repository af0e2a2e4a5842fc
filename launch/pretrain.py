"""Entry point: `torchrun --nproc-per-node N -m launch.pretrain --config C --run-dir D [--set k=v ...]`."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from launch import quiet, stopping

stopping.catch_stop_signals()  # first: a stop signal during the slow imports below is honoured, not fatal
quiet.install()  # before anything imports Megatron-Core or DeepSpeed (launch.config does)

import yaml  # noqa: E402

from data_prep.files import write_text_atomically  # noqa: E402
from data_prep.lock import LockHeld, exclusive_lock  # noqa: E402
from launch.config import ConfigError, load_config, to_dict, validate  # noqa: E402
from launch.console import say  # noqa: E402
from launch.dry_run import dry_run  # noqa: E402
from launch.sources import check_files  # noqa: E402
from megatron_patches.reweighting import STRATEGIES, STRATEGY_ALIASES  # noqa: E402


def strategy_table() -> str:
    aliases = {name: [a for a, target in STRATEGY_ALIASES.items() if target == name] for name in STRATEGIES}
    return "\n".join(
        f"  {name:<10} f = {s.formula:<14} {s.effect}"
        + (f" (alias: {', '.join(aliases[name])})" if aliases[name] else "")
        for name, s in STRATEGIES.items()
    )


_EXAMPLES = """\
examples:
  python -m launch.pretrain --config configs/demo_cpu.yaml --run-dir runs/demo
  python -m launch.pretrain --config configs/gpt2-124m.yaml --run-dir runs/gpt2 \\
      --set reweight.strategy=linupper --set reweight.temperature=0.4 \\
      --set data.weights='{code: 2.0, prose: 1.0}' --set checkpoint.keep=null
  python -m launch.pretrain --config configs/llama-7b.yaml --dry-run --world-size 64 --no-data

--set values are YAML: 3, 1e-4, true, null, [a, b], {k: v}. Every field of the config
(see configs/*.yaml and launch/config.py) can be set; a wrong key or type is refused
with the valid alternatives.

reweight.strategy (f of the loss x normalised to [-delta, delta]):
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line of `python -m launch.pretrain`."""
    parser = argparse.ArgumentParser(
        prog="python -m launch.pretrain",
        description="Pretrain a GPT/Llama model with loss-based sample reweighting.",
        epilog=_EXAMPLES + strategy_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/demo_cpu.yaml")
    parser.add_argument("--run-dir", help="where logs, metrics and checkpoints go (required unless --dry-run)")
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="extend",
        nargs="+",
        default=[],
        help="override a config field, e.g. --set train.steps=100 (repeatable)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config and print layout, parameter count, memory and a verdict; no training,"
        " no torchrun needed (--world-size says how many processes to check)",
    )
    parser.add_argument(
        "--no-data",
        action="store_true",
        help="with --dry-run: check the layout alone, without the data files (exit 0 when it holds)",
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="number of processes to check a --dry-run against (default: $WORLD_SIZE or 1)",
    )
    parser.add_argument(
        "--gpu-memory-gib",
        type=float,
        default=None,
        help="with --dry-run: the GPU memory to check the estimate against, e.g. 80 on a login node"
        " (default: this machine's GPU, none on a CPU)",
    )
    args = parser.parse_args(argv)
    if args.run_dir is None and not args.dry_run:
        parser.error("--run-dir is required (or pass --dry-run)")
    if args.no_data and not args.dry_run:
        parser.error("--no-data goes with --dry-run: a training run needs its data")
    if args.gpu_memory_gib is not None and (not args.dry_run or args.gpu_memory_gib <= 0):
        parser.error("--gpu-memory-gib goes with --dry-run and is a positive size in GiB, e.g. 80")
    if args.world_size is None:
        args.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            return _dry_run(cfg, args.world_size, not args.no_data, args.gpu_memory_gib)
        validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # before any process group starts
        check_files(cfg)
        if cfg.logging.wandb and importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                "logging.wandb=true needs wandb: `pip install wandb` (or `pip install -e '.[wandb]'`),"
                " or set logging.wandb=false"
            )
    except ConfigError as error:
        return _refuse(error)
    from launch.checkpoint import DiskFullError
    from launch.trainer import Trainer

    run_dir = Path(args.run_dir)
    rank = int(os.environ.get("RANK", "0"))
    try:
        with _one_job_per_run_dir(run_dir, rank):
            try:
                trainer = Trainer(cfg, run_dir)
            except ConfigError as error:  # found while building, e.g. a resume that changes the experiment
                return _refuse(error)
            if rank == 0:
                _keep_config(run_dir, cfg)
            stopped_on = trainer.train()
    except DiskFullError as error:
        if rank == 0:
            say(f"error: {error}", file=sys.stderr)
        return stopping.EXIT_DISK_FULL
    except KeyboardInterrupt:
        if rank == 0:
            say(
                "interrupted (Ctrl-C); rerun with the same --run-dir to resume from the last checkpoint",
                file=sys.stderr,
            )
        return 130
    except LockHeld as held:
        return _refuse(
            ConfigError(
                f"another job is training in {run_dir} ({held.holder}; lock file {held.path}):"
                " wait for it to end or stop it, or choose another --run-dir"
            )
        )
    return stopping.EXIT_STOPPED_ON_SIGNAL if stopped_on and stopped_on.startswith("SIG") else 0


def _dry_run(cfg, world_size: int, check_data: bool, gpu_memory_gib: float | None) -> int:
    """Rank 0 prints the account (under torchrun every rank would); 0 when all holds, else 1, and
    under torchrun 2: the refusal that launch.torchrun neither restarts nor explains again."""
    report, holds = dry_run(cfg, world_size, check_data, gpu_memory_gib)
    if int(os.environ.get("RANK", "0")) == 0:
        print(report, flush=True)
    if holds:
        return 0
    return stopping.EXIT_REFUSED if "RANK" in os.environ else 1


def _keep_config(run_dir: Path, cfg) -> None:
    """RUN/config.yaml is this start's config; RUN/configs/start-N.yaml keeps every start's."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    starts = run_dir / "configs"
    starts.mkdir(parents=True, exist_ok=True)
    number = 1 + sum(1 for _ in starts.glob("start-*.yaml"))
    for path in (starts / f"start-{number}.yaml", run_dir / "config.yaml"):
        write_text_atomically(path, text)


@contextlib.contextmanager
def _one_job_per_run_dir(run_dir: Path, rank: int):
    """Rank 0 holds RUN/run.lock for the whole job; the kernel frees it when the job dies."""
    if rank != 0:
        yield
        return
    with exclusive_lock(str(run_dir / "run.lock")):
        yield


def _refuse(error: ConfigError) -> int:
    """Every rank refuses; rank 0 says why.  The others wait a moment before exiting, since plain
    torchrun stops the whole job at the first failed process and would cut rank 0 short; a stop
    signal (launch.torchrun's, once rank 0 has spoken) ends that wait at once."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"config error: {error}", file=sys.stderr, flush=True)
    else:
        for number in stopping.STOP_SIGNALS:
            signal.signal(number, signal.SIG_DFL)
        time.sleep(5)
    return stopping.EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
