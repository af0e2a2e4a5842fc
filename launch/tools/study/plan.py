"""The study's runs: one per arm and seed, each checked before anything starts."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

import yaml

from launch.config import ConfigError, flatten, load_config, to_dict, validate
from launch.metrics import read_metrics
from launch.tools.study.arms import Arm


class Run(NamedTuple):
    arm: str
    seed: int
    run_dir: Path
    settings: tuple[str, ...]  # every --set passed to launch.pretrain, train.seed last
    steps: int  # train.steps: the run is finished when the held-out loss at this step is logged


def plan(config: str, arms: list[Arm], seeds: list[int], out: Path, common: list[str], nproc: int) -> list[Run]:
    """Every run, seed-major (each seed's arms together, so early results are already paired),
    each config loaded and validated for `nproc` processes before anything starts."""
    for arm in arms:
        if any(s.split("=", 1)[0].strip() == "train.seed" for s in arm.settings):
            raise ConfigError(f"arm {arm.name} sets train.seed: the study sets it per seed (--seeds)")
    load_config(config)  # a config that cannot load is refused as itself
    try:  # a key or value of --set is wrong in every arm: say so, not "arm <the first>"
        load_config(config, common)
    except ConfigError as error:
        raise ConfigError(f"--set: {error}") from None
    runs = []
    for seed in seeds:
        for arm in arms:
            settings = (*common, *arm.settings, f"train.seed={seed}")
            try:
                cfg = load_config(config, settings)
                validate(cfg, nproc)
                _check_inputs_exist(cfg)
            except ConfigError as error:
                hint = " (the demo corpus: make demo-data)" if "data_prep" in str(error) else ""
                raise ConfigError(f"arm {arm.name}: {error}{hint}") from None
            runs.append(Run(arm.name, seed, out / arm.name / f"seed{seed}", settings, cfg.train.steps))
            _check_same_settings(runs[-1], to_dict(cfg))
    return runs


def _check_inputs_exist(cfg) -> None:
    """The data files are there (each run checks them fully as it starts)."""
    data = cfg.data
    missing = [p for p in (data.blend, data.valid_blend, data.tokenizer_model) if p and not Path(p).exists()]
    if missing:
        raise ConfigError(f"{', '.join(missing)} not found: prepare the data with `python -m data_prep`")


def _check_same_settings(run: Run, expected: dict) -> None:
    """A run directory trained with other settings would silently break the pairing."""
    saved = run.run_dir / "config.yaml"
    if not saved.is_file():
        return
    old, new = flatten(yaml.safe_load(saved.read_text())), flatten(expected)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k, "(absent)") != new.get(k, "(absent)"))
    if changed:
        shown = ", ".join(f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}" for k in changed[:5])
        raise ConfigError(
            f"{run.run_dir} was trained with other settings ({shown}): give another --out, or"
            f" delete {run.run_dir} to train it again"
        )


def is_finished(run: Run) -> bool:
    """Finished = the last held-out evaluation is at train.steps."""
    valid = [r for r in read_metrics(run.run_dir) if r.get("kind") == "valid"]
    return bool(valid) and valid[-1]["step"] == run.steps


def pretrain_args(config: str, run: Run) -> list[str]:
    """What torchrun runs for one run."""
    return ["-m", "launch.pretrain", "--config", config, "--run-dir", str(run.run_dir), "--set", *run.settings]


def pretrain_command(config: str, run: Run, nproc: int) -> list[str]:
    torchrun = [sys.executable, "-m", "launch.torchrun", "--standalone", f"--nproc-per-node={nproc}"]
    return torchrun + pretrain_args(config, run)
