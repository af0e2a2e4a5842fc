"""`python -m launch.tools.study`: plan the runs, train them (or write a Slurm array), summarise."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_prep.files import write_text_atomically
from launch.config import ConfigError, load_config
from launch.metrics import MetricsFileError
from launch.tools.study.arms import parse_arm
from launch.tools.study.markdown import markdown
from launch.tools.study.plan import is_finished, plan
from launch.tools.study.plot import plot
from launch.tools.study.runner import run_all
from launch.tools.study.slurm import slurm_script
from launch.tools.study.summary import summarize

SUMMARY_FILES = ("summary.json", "summary.md", "summary.png")

EXAMPLES = """\
arms (the first is the baseline; each becomes OUT/<name>/seed<k>):
  STRATEGY[:TEMPERATURE]         uniform, linupper:0.5 (named linupper-r0.5), quadratic:1.0
  NAME=KEY=VALUE[,KEY=VALUE]     any config change; commas inside {...} or [...] stay in the value:
                                 'boilerplate-down=reweight.strategy=uniform,data.weights={boilerplate: 0.25, \
code: 1, docs: 1, licenses: 1, prose: 1}'
                                 an arm changes --config and keeps the rest: configs/demo_cpu.yaml
                                 reweights with linupper, so a mixture-only arm sets reweight.strategy=uniform
                                 'lin-r0.2-late=reweight.strategy=linupper,reweight.temperature=0.2,reweight.warmup_steps=100'

examples:
  # the default: uniform vs linupper:0.5 on the demo corpus (make demo-data), 5 seeds,
  # configs/demo_cpu.yaml's 200 steps, 2 processes per run (about 40 s a run on 2 CPU cores)
  python -m launch.tools.study --out runs/study
  python -m launch.tools.study --out runs/study3 --arm uniform --arm linupper:0.5 --arm quadratic:1.0 \\
      --arm 'boilerplate-down=reweight.strategy=uniform,data.weights={boilerplate: 0.25, code: 1, docs: 1, \
licenses: 1, prose: 1}'
  # your data: data_prep's DIR/train.blend.json, DIR/valid.blend.json, DIR/tokenizer.model
  python -m launch.tools.study --config configs/gpt2-124m.yaml --data data/mine --nproc 8 --seeds 3 \\
      --set train.steps=5000 --arm uniform --arm linupper:0.4 --out runs/mine
  # a cluster: one Slurm array task per run; then the same command again for the summary
  python -m launch.tools.study --config configs/paper/gpt2-124m-uniform.yaml --nproc 4 --slurm \\
      --arm uniform --arm quadratic:1.0 --out runs/paper124m

Runs go one after another. Interrupted? Run the same command again: finished runs are
reused, unfinished ones resume from their last checkpoint. The summary (OUT/summary.json,
summary.md, summary.png) gives, per arm, the held-out loss per domain and for the natural
mixture (domains weighted by the train blend's token shares), the mean paired difference
to the baseline with its 95% Student t-interval over seeds, and the weight statistics after
warm-up; every number is recomputable from the runs' config.yaml and metrics.jsonl.
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m launch.tools.study",
        description="Train arms (config variants) over paired seeds and summarise the held-out"
        " loss differences to the first arm with 95% confidence intervals.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default="configs/demo_cpu.yaml", help="base config (default: %(default)s)")
    parser.add_argument(
        "--data",
        type=Path,
        help="a data_prep folder with train.blend.json, valid.blend.json and"
        " tokenizer.model (default: the config's own data settings)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/study"), help="study folder (default: %(default)s)")
    parser.add_argument(
        "--arm", dest="arms", action="append", metavar="ARM",
        help="STRATEGY[:TEMPERATURE] or NAME=KEY=VALUE[,KEY=VALUE]; repeat; the first is the"
        " baseline (default: --arm uniform --arm linupper:0.5)",
    )  # fmt: skip
    parser.add_argument(
        "--seeds", type=int, default=5,
        help="seeds 1..N, the same for every arm; 3 or more for intervals to mean much (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--nproc", type=int, default=2, help="processes per run (default: %(default)s)")
    parser.add_argument(
        "--set", dest="common", metavar="KEY=VALUE", action="extend", nargs="+", default=[],
        help="a config change for every arm, e.g. --set train.steps=100 (arms' own settings win)",
    )  # fmt: skip
    parser.add_argument(
        "--slurm", action="store_true",
        help="write OUT/study.sbatch (one array task per unfinished run) instead of training here",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        args.arms = [parse_arm(text) for text in args.arms or ["uniform", "linupper:0.5"]]
    except ValueError as error:
        parser.error(str(error))
    names = [arm.name for arm in args.arms]
    if len(set(names)) != len(names):
        parser.error(f"arm names must differ, got {names}: name them, e.g. --arm 'low-r=reweight.temperature=0.1'")
    if len(args.arms) < 2:
        parser.error("give at least two arms: the baseline first, then what to compare with it")
    if args.seeds < 1 or args.nproc < 1:
        parser.error("--seeds and --nproc must be >= 1")
    if args.data is not None:
        data = [f"data.blend={args.data / 'train.blend.json'}", f"data.valid_blend={args.data / 'valid.blend.json'}"]
        args.common = [*data, f"data.tokenizer_model={args.data / 'tokenizer.model'}", *args.common]
    return args


def describe(cfg) -> str:
    """What an arm trains, in one line: arms change the config, so a setting an arm does
    not name (e.g. the config's own reweighting) still applies."""
    rw = cfg.reweight
    text = "uniform weights" if rw.strategy == "uniform" else f"{rw.strategy} r={rw.temperature}"
    if rw.strategy != "uniform" and rw.warmup_steps:
        start = "uniform" if rw.warmup_temperature is None else f"r={rw.warmup_temperature}"
        text += f" after {rw.warmup_steps} {start} steps"
    if rw.unit == "document":
        text += f", per document segment (at most {rw.max_segments_per_sample} a sample)"
    mixture = "natural mixture" if cfg.data.weights is None else f"data.weights {cfg.data.weights}"
    if cfg.data.mixing != "fixed":
        mixture = f"{cfg.data.mixing} mixing from the {mixture}"
    return f"{text}; {mixture}; {cfg.train.steps} steps"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return study(args)
    except MetricsFileError as error:  # a run's metrics.jsonl broken mid-file: repaired by hand
        print(f"cannot read a run's metrics: {error}", file=sys.stderr)
        return 2


def study(args: argparse.Namespace) -> int:
    """Plan, train what is unfinished (or write the Slurm array), summarise; the exit status."""
    seeds = list(range(1, args.seeds + 1))
    try:
        runs = plan(args.config, args.arms, seeds, args.out, args.common, args.nproc)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    unfinished = [r for r in runs if not is_finished(r)]
    print(
        f"study {args.out}: {len(args.arms)} arms x {len(seeds)} seeds = {len(runs)} runs of {args.config},"
        f" {len(runs) - len(unfinished)} finished earlier",
        flush=True,
    )
    for arm, run in zip(args.arms, runs):  # the first seed's runs, one per arm
        print(f"  {arm.name}: {describe(load_config(args.config, run.settings))}", flush=True)
    if len(seeds) < 3:  # said before the runs, not only in the summary after them
        print(f"  caution: {len(seeds)} seed(s) give intervals that can look tight by chance; --seeds 3 or more")
    if args.slurm and unfinished:
        args.out.mkdir(parents=True, exist_ok=True)
        script = args.out / "study.sbatch"
        write_text_atomically(script, slurm_script(args.config, unfinished, args.nproc, args.out))
        print(
            f"wrote {script}: sbatch {script}  ({len(unfinished)} array tasks;"
            " rerun this command afterwards for the summary)"
        )
        return 0
    if not run_all(args.config, runs, args.nproc):
        return 1
    try:
        summary = summarize(runs, seeds, args.arms, args.config)
    except ConfigError as error:
        print(f"cannot summarise: {error}", file=sys.stderr)
        return 2
    print(write_summary(summary, args.out))
    print("summary: " + ", ".join(str(args.out / name) for name in SUMMARY_FILES))
    return 0


def write_summary(summary: dict, out: Path) -> str:
    """OUT/summary.json, .md and .png; returns the Markdown."""
    table = markdown(summary)
    write_text_atomically(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    write_text_atomically(out / "summary.md", table)
    plot(summary, out / "summary.png")
    return table
