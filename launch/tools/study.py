"""Does reweighting help on your data? Arms over paired seeds, with confidence intervals.

Every arm (a set of config changes) is trained once per seed with `train.seed` = that seed,
so for one seed all arms start from the same initial weights and see the same data order:
the arm-minus-baseline differences are paired and their spread over seeds says how much of
a gain is noise. Runs go one after another (or one Slurm array task each), each as

    torchrun --standalone --nproc-per-node N -m launch.pretrain --config C \\
        --run-dir OUT/<arm>/seed<k> --set ... train.seed=<k>

and a finished run is reused, an unfinished one resumed (the trainer resumes from the run
directory's newest checkpoint), so an interrupted study goes on by running the same command.
The summary (OUT/summary.json, .md, .png) is computed from the runs' own config.yaml and
metrics.jsonl and the train blend file only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional

import yaml

from launch.config import ConfigError, load_config, to_dict, validate
from launch.tools.stats import CONFIDENCE, mean_and_interval, t_quantile

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
SUMMARY_FILES = ("summary.json", "summary.md", "summary.png")


# --------------------------------------------------------------------------- arms


class Arm(NamedTuple):
    """One treatment: a name (its folder under OUT) and `--set` overrides."""

    name: str
    settings: tuple[str, ...]


def parse_arm(text: str) -> Arm:
    """`STRATEGY[:TEMPERATURE]` (named STRATEGY or STRATEGY-rTEMPERATURE) or
    `NAME=KEY=VALUE[,KEY=VALUE...]`, where commas inside {...}, [...] or quotes belong to
    the value."""
    if "=" not in text:
        strategy, colon, temperature = text.partition(":")
        if not NAME.fullmatch(strategy):
            raise ValueError(f"--arm {text!r}: expected STRATEGY[:TEMPERATURE], e.g. linupper:0.5")
        if not colon:
            return Arm(strategy, (f"reweight.strategy={strategy}",))
        try:
            float(temperature)
        except ValueError:
            raise ValueError(
                f"--arm {text!r}: the temperature {temperature!r} is not a number, e.g. linupper:0.5"
            ) from None
        settings = (f"reweight.strategy={strategy}", f"reweight.temperature={temperature}")
        return Arm(f"{strategy}-r{temperature}", settings)
    name, _, rest = text.partition("=")
    if not NAME.fullmatch(name):
        raise ValueError(
            f"--arm {text!r}: the name {name!r} must be letters, digits, '.', '_', '+' or '-'"
            " (it names the arm's folder), e.g. boilerplate-down=data.weights={...}"
        )
    settings = tuple(item.strip() for item in split_top_level(rest))
    for item in settings:
        key, equals, _ = item.partition("=")
        if not equals or not KEY.fullmatch(key.strip()):
            raise ValueError(
                f"--arm {text!r}: {item!r} is not KEY=VALUE with a dotted key; write"
                " NAME=section.key=value[,section.key=value], e.g."
                " r0.2=reweight.strategy=linupper,reweight.temperature=0.2"
            )
    return Arm(name, settings)


def split_top_level(text: str) -> list[str]:
    """Split at commas that are outside brackets, braces and quotes."""
    parts, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "{[(":
            depth += 1
        elif char in "}])":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


# --------------------------------------------------------------------------- the plan


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
    old, new = _flatten(yaml.safe_load(saved.read_text())), _flatten(expected)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k, "(absent)") != new.get(k, "(absent)"))
    if changed:
        shown = ", ".join(f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}" for k in changed[:5])
        raise ConfigError(
            f"{run.run_dir} was trained with other settings ({shown}): give another --out, or"
            f" delete {run.run_dir} to train it again"
        )


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl rows; a line cut short by a kill is ignored."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


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


# --------------------------------------------------------------------------- running


def run_all(config: str, runs: list[Run], nproc: int) -> bool:
    """Train the unfinished runs one after another; False at the first failure."""
    timings = []
    for index, run in enumerate(runs, 1):
        head = f"[{index}/{len(runs)}] {run.arm} seed {run.seed}"
        if is_finished(run):
            print(f"{head}: finished earlier, reused ({run.run_dir})", flush=True)
            continue
        trained = [r["step"] for r in read_metrics(run.run_dir) if r.get("kind") == "train"]
        state = f"resuming after step {trained[-1]}" if trained else "training"
        log = run.run_dir / "study.log"
        print(f"{head}: {state} (log: {log})", flush=True)
        run.run_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with log.open("a") as stream:
            result = subprocess.run(pretrain_command(config, run, nproc), stdout=stream, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - start
        if result.returncode != 0 or not is_finished(run):
            tail = "\n".join(log.read_text().splitlines()[-20:])
            why = f"failed (exit {result.returncode})" if result.returncode else (
                f"stopped without a held-out loss at step {run.steps} (train.exit_after set? no validation data?)"
            )
            print(
                f"{tail}\n{head}: {why} after {seconds:.0f} s; full log {log}."
                " Fix the cause and run the same command again: finished runs are reused.",
                file=sys.stderr,
            )
            return False
        timings.append(seconds)
        left = sum(not is_finished(r) for r in runs[index:])
        eta = f", about {_duration(left * sum(timings) / len(timings))} for the {left} left" if left else ""
        print(f"{head}: done in {seconds:.0f} s{eta}", flush=True)
    return True


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def slurm_script(config: str, runs: list[Run], nproc: int, out: Path) -> str:
    """A Slurm array script, task i = runs[i] on one node (launch/slurm/pretrain.sbatch's
    conventions). Written for clusters but not tested on a real one."""
    listing = "\n".join(f"#   {i:>3}  {r.arm} seed {r.seed} -> {r.run_dir}" for i, r in enumerate(runs))
    cases = "\n".join(
        f"  {i}) args=({' '.join(shlex.quote(a) for a in pretrain_args(config, r))}) ;;"
        for i, r in enumerate(runs)
    )
    return f"""#!/usr/bin/env bash
# Paired-seed study, one array task per unfinished run, written by `python -m launch.tools.study`.
# Not tested on a real cluster. Submit from the directory the study was planned in:
#   sbatch {out}/study.sbatch
# When every task is done, run the same `python -m launch.tools.study ...` command again: it reuses
# the finished runs and writes the summary (a failed task is resumed by resubmitting it).
# Environment (all optional): IMAGE (pyxis container), CONTAINER_MOUNTS, PYTHON.
# Tasks:
{listing}
#SBATCH --job-name=study
#SBATCH --array=0-{len(runs) - 1}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={nproc}
#SBATCH --time=48:00:00
#SBATCH --output={out}/slurm-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
set -euo pipefail

REPO="${{SLURM_SUBMIT_DIR:-$PWD}}"
cd "$REPO"
PYTHON="${{PYTHON:-python}}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${{TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}}"
export NCCL_DEBUG="${{NCCL_DEBUG:-WARN}}"
export CUDA_DEVICE_MAX_CONNECTIONS="${{CUDA_DEVICE_MAX_CONNECTIONS:-1}}"

case "$SLURM_ARRAY_TASK_ID" in
{cases}
  *) echo "no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;
esac

srun_args=(--ntasks-per-node=1 --kill-on-bad-exit=1)
if [[ -n "${{IMAGE:-}}" ]]; then
  srun_args+=(--container-image "$IMAGE" --container-mounts "${{CONTAINER_MOUNTS:-$REPO:$REPO}}" --container-workdir "$REPO")
fi
echo "array task $SLURM_ARRAY_TASK_ID: ${{args[*]}}"
source "$REPO/launch/slurm/step.sh"  # stop signals save a checkpoint; USR1 requeues the task
run_step srun "${{srun_args[@]}}" "$PYTHON" -m launch.torchrun --standalone --nproc-per-node {nproc} "${{args[@]}}"
"""


# --------------------------------------------------------------------------- summary


def natural_weights(blend_path: str, domains: list[str]) -> dict[str, float]:
    """The blend file's own weights (token shares) of `domains`, renormalised to sum to 1."""
    blend = json.loads(Path(blend_path).read_text())["domains"]
    missing = [d for d in domains if d not in blend]
    if missing:
        raise ConfigError(
            f"held-out domains {missing} are not in the train blend {blend_path}: the natural"
            " mixture needs a token share for every held-out domain"
        )
    total = sum(blend[d]["weight"] for d in domains)
    return {d: blend[d]["weight"] / total for d in domains}


def _final_valid(run_dir: Path, steps: int) -> dict[str, float]:
    valid = [r for r in read_metrics(run_dir) if r.get("kind") == "valid"]
    if not valid or valid[-1]["step"] != steps:
        raise ConfigError(f"{run_dir} has no held-out loss at step {steps}: the run is not finished")
    return valid[-1]["valid_loss_per_domain"]


def _after_warmup(run_dir: Path, warmup_steps: int) -> list[dict]:
    """Train rows whose logging interval lies wholly after the warm-up: the row before
    (step 0 for the first) is at or after warmup_steps."""
    train = [r for r in read_metrics(run_dir) if r.get("kind") == "train"]
    previous = [0] + [r["step"] for r in train[:-1]]
    rows = [r for r, before in zip(train, previous) if before >= warmup_steps]
    if not rows:
        raise ConfigError(
            f"{run_dir} logged no train row after its {warmup_steps} warm-up steps: raise"
            " train.steps or lower reweight.warmup_steps"
        )
    return rows


def _paired(per_seed: list[float], baseline: Optional[list[float]]) -> dict:
    entry = {"per_seed": per_seed, "mean": _mean(per_seed)}
    if baseline is None:
        entry.update(diff_per_seed=None, diff_mean=None, diff_ci95=None)
    else:
        diffs = [a - b for a, b in zip(per_seed, baseline)]
        entry["diff_per_seed"] = diffs
        entry["diff_mean"], entry["diff_ci95"] = mean_and_interval(diffs)
    return entry


def summarize(runs: list[Run], seeds: list[int], arms: list[Arm], config: str) -> dict:
    """Every number of the summary, from the runs' config.yaml and metrics.jsonl and the blend file."""
    saved = {r.run_dir: yaml.safe_load((r.run_dir / "config.yaml").read_text()) for r in runs}
    by_arm = {arm.name: [r for r in runs if r.arm == arm.name] for arm in arms}
    finals = {r.run_dir: _final_valid(r.run_dir, r.steps) for r in runs}
    baseline_runs = by_arm[arms[0].name]
    domains = sorted(finals[baseline_runs[0].run_dir])
    for run in runs:
        if sorted(finals[run.run_dir]) != domains:
            raise ConfigError(
                f"{run.run_dir} has held-out domains {sorted(finals[run.run_dir])}, the baseline"
                f" {domains}: paired differences need the same held-out data in every arm"
            )
    blend = saved[baseline_runs[0].run_dir]["data"]["blend"]
    natural = natural_weights(blend, domains)

    def natural_loss(run: Run) -> float:
        return sum(natural[d] * finals[run.run_dir][d] for d in domains)

    baseline_loss = {d: [finals[r.run_dir][d] for r in baseline_runs] for d in domains}
    baseline_natural = [natural_loss(r) for r in baseline_runs]
    summary_arms = []
    for index, arm in enumerate(arms):
        arm_runs = by_arm[arm.name]
        is_baseline = index == 0
        held_out = {
            d: _paired([finals[r.run_dir][d] for r in arm_runs], None if is_baseline else baseline_loss[d])
            for d in domains
        }
        mixture = _paired([natural_loss(r) for r in arm_runs], None if is_baseline else baseline_natural)
        rows = [_after_warmup(r.run_dir, saved[r.run_dir]["reweight"]["warmup_steps"]) for r in arm_runs]
        ess = [sum(row["weight_ess"] for row in run_rows) / len(run_rows) for run_rows in rows]
        shares = {}
        for key in ("domain_weight_share", "domain_sample_share"):
            names = sorted({d for run_rows in rows for row in run_rows for d in row[key]})
            shares[key] = {
                d: _mean([sum(row[key].get(d, 0.0) for row in run_rows) / len(run_rows) for run_rows in rows])
                for d in names
            }
        summary_arms.append(
            {
                "name": arm.name,
                "settings": list(arm.settings),
                "runs": [str(r.run_dir) for r in arm_runs],
                "held_out": held_out,
                "natural_mixture": mixture,
                "weights": {
                    "rows_after_warmup": [len(run_rows) for run_rows in rows],
                    "ess": {"per_seed": ess, "mean": _mean(ess)},
                    **shares,
                },
            }
        )
    return {
        "config": config,
        "baseline": arms[0].name,
        "seeds": seeds,
        "confidence": CONFIDENCE,
        "t_quantile": t_quantile(0.5 + CONFIDENCE / 2, len(seeds) - 1) if len(seeds) > 1 else None,
        "natural_weights": {"blend": blend, "weights": natural},
        "arms": summary_arms,
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _diff_text(entry: dict) -> str:
    if entry["diff_mean"] is None:
        return ""
    if entry["diff_ci95"] is None:
        return f"{entry['diff_mean']:+.4f} (one seed: no interval)"
    low, high = entry["diff_ci95"]
    return f"{entry['diff_mean']:+.4f} [{low:+.4f}, {high:+.4f}]"


def markdown(summary: dict) -> str:
    """Two tables: held-out loss with paired differences, and where the weight went."""
    arms, baseline, n = summary["arms"], summary["baseline"], len(summary["seeds"])
    others = arms[1:]
    header = ["domain", baseline] + [c for a in others for c in (a["name"], f"Δ {a['name']}")]
    settings = "; ".join(f"{a['name']}: {' '.join(a['settings'])}" for a in arms)
    lines = [
        f"Arms, as changes to {summary['config']}: {settings}.",
        "",
        f"Held-out loss, mean over {n} paired seeds {summary['seeds']}; Δ = arm − {baseline} per seed,"
        f" mean [{summary['confidence']:.0%} Student t-interval]; lower is better.",
        "",
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
    ]
    domains = list(arms[0]["held_out"])
    for label, pick in [(d, lambda a, d=d: a["held_out"][d]) for d in domains] + [
        ("natural mixture", lambda a: a["natural_mixture"])
    ]:
        cells = [label, f"{pick(arms[0])['mean']:.4f}"]
        for arm in others:
            cells += [f"{pick(arm)['mean']:.4f}", _diff_text(pick(arm))]
        lines.append("| " + " | ".join(cells) + " |")
    mix = ", ".join(f"{d} {w:.3f}" for d, w in summary["natural_weights"]["weights"].items())
    lines += [
        "",
        f"Natural mixture: the held-out losses weighted by the train blend's token shares ({mix}).",
        "",
        "Weights after warm-up, mean over logged steps and seeds: effective sample size (1 = uniform)"
        " and, per domain, share of weight / share of samples.",
        "",
        "| | " + " | ".join(a["name"] for a in arms) + " |",
        "|---|" + "---:|" * len(arms),
        "| ESS | " + " | ".join(f"{a['weights']['ess']['mean']:.3f}" for a in arms) + " |",
    ]
    train_domains = sorted({d for a in arms for d in a["weights"]["domain_sample_share"]})
    for d in train_domains:
        cells = []
        for arm in arms:
            w, s = arm["weights"]["domain_weight_share"].get(d), arm["weights"]["domain_sample_share"].get(d)
            cells.append("" if w is None else f"{w:.1%} / {s:.1%}")
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, out: Path) -> None:
    """Paired differences with their intervals, and weight share against sample share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = summary["arms"]
    fig, (diff_ax, share_ax) = plt.subplots(1, 2, figsize=(13, 5))
    labels = list(arms[0]["held_out"]) + ["natural mixture"]
    offsets = [0.0] if len(arms) < 3 else [0.3 * (i / (len(arms) - 2) - 0.5) for i in range(len(arms) - 1)]
    for arm, offset in zip(arms[1:], offsets):
        entries = [arm["held_out"][d] for d in labels[:-1]] + [arm["natural_mixture"]]
        x = [i + offset for i in range(len(labels))]
        y = [e["diff_mean"] for e in entries]
        errors = [[0, 0] if e["diff_ci95"] is None else [e["diff_mean"] - e["diff_ci95"][0], e["diff_ci95"][1] - e["diff_mean"]] for e in entries]
        diff_ax.errorbar(x, y, yerr=list(zip(*errors)), fmt="o", capsize=4, label=arm["name"])
    diff_ax.axhline(0.0, color="grey", linewidth=1)
    diff_ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    diff_ax.set(
        title=f"held-out loss − {summary['baseline']} (paired, {summary['confidence']:.0%} t-interval)",
        ylabel="Δ loss (below 0 = better)",
    )
    domains = sorted({d for a in arms for d in a["weights"]["domain_sample_share"]})
    width = 0.8 / (len(arms) + 1)
    for i, arm in enumerate(arms):
        shares = arm["weights"]["domain_weight_share"]
        share_ax.bar([p + i * width for p in range(len(domains))], [shares.get(d, 0.0) for d in domains], width, label=f"{arm['name']}: weight")
    sample = arms[0]["weights"]["domain_sample_share"]
    share_ax.bar([p + len(arms) * width for p in range(len(domains))], [sample.get(d, 0.0) for d in domains], width, color="lightgrey", label=f"{arms[0]['name']}: samples")
    share_ax.set_xticks([p + len(arms) * width / 2 for p in range(len(domains))], domains, rotation=30, ha="right")
    share_ax.set(title="share of weight per domain after warm-up")
    for ax in (diff_ax, share_ax):
        ax.legend(fontsize=8)
    fig.tight_layout()
    _replace(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def _replace(path: Path, write) -> None:
    """Write through a temporary name and rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_summary(summary: dict, out: Path) -> str:
    table = markdown(summary)
    _replace(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=1) + "\n"))
    _replace(out / "summary.md", lambda tmp: tmp.write_text(table))
    plot(summary, out / "summary.png")
    return table


# --------------------------------------------------------------------------- command line

EXAMPLES = """\
arms (the first is the baseline; each becomes OUT/<name>/seed<k>):
  STRATEGY[:TEMPERATURE]         uniform, linupper:0.5 (named linupper-r0.5), quadratic:1.0
  NAME=KEY=VALUE[,KEY=VALUE]     any config change; commas inside {...} or [...] stay in the value:
                                 'boilerplate-down=data.weights={boilerplate: 0.25, code: 1, docs: 1, licenses: 1, prose: 1}'
                                 'lin-r0.2-late=reweight.strategy=linupper,reweight.temperature=0.2,reweight.warmup_steps=100'

examples:
  # the default: uniform vs linupper:0.5 on the demo corpus (make demo-data), 5 seeds,
  # configs/demo_cpu.yaml's 200 steps, 2 processes per run (about 40 s a run on 2 CPU cores)
  python -m launch.tools.study --out runs/study
  python -m launch.tools.study --out runs/study3 --arm uniform --arm linupper:0.5 --arm quadratic:1.0 \\
      --arm 'boilerplate-down=data.weights={boilerplate: 0.25, code: 1, docs: 1, licenses: 1, prose: 1}'
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
        "--data", type=Path, help="a data_prep folder with train.blend.json, valid.blend.json and"
        " tokenizer.model (default: the config's own data settings)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/study"), help="study folder (default: %(default)s)")
    parser.add_argument(
        "--arm", dest="arms", action="append", metavar="ARM",
        help="STRATEGY[:TEMPERATURE] or NAME=KEY=VALUE[,KEY=VALUE]; repeat; the first is the"
        " baseline (default: --arm uniform --arm linupper:0.5)",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, default=5, help="seeds 1..N, the same for every arm (default: %(default)s)")
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
    mixture = "natural mixture" if cfg.data.weights is None else f"data.weights {cfg.data.weights}"
    return f"{text}; {mixture}; {cfg.train.steps} steps"


def main(argv=None) -> int:
    args = parse_args(argv)
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
    if args.slurm and unfinished:
        args.out.mkdir(parents=True, exist_ok=True)
        script = args.out / "study.sbatch"
        _replace(script, lambda tmp: tmp.write_text(slurm_script(args.config, unfinished, args.nproc, args.out)))
        print(f"wrote {script}: sbatch {script}  ({len(unfinished)} array tasks; rerun this command afterwards for the summary)")
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


if __name__ == "__main__":
    sys.exit(main())
