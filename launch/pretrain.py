"""Entry point: `torchrun --nproc-per-node N -m launch.pretrain --config C --run-dir D [--set k=v ...]`."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import yaml

from launch.config import ConfigError, data_file_problems, load_config, parse_args, to_dict, validate
from launch.dry_run import dry_run_report


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            print(dry_run_report(cfg, args.world_size))
            return 1 if data_file_problems(cfg) else 0
        validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # before any process group starts
    except ConfigError as error:
        return _refuse(error)
    if cfg.engine == "deepspeed":
        from launch.deepspeed_trainer import DeepSpeedTrainer as Trainer
    else:
        from launch.trainer import Trainer
    run_dir = Path(args.run_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    try:
        trainer = Trainer(cfg, run_dir)
    except ConfigError as error:  # found while building, e.g. a DeepSpeed JSON at odds with the config
        return _refuse(error)
    trainer.train()
    return 0


def _refuse(error: ConfigError) -> int:
    """Every rank refuses; rank 0 says why.  The others wait a moment before exiting, since
    torchrun stops the whole job at the first failed process and would cut rank 0 short."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"config error: {error}", file=sys.stderr, flush=True)
    else:
        time.sleep(5)
    return 2


if __name__ == "__main__":
    sys.exit(main())
