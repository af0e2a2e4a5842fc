"""The summary's numbers: held-out losses, paired differences to the baseline with their
t-intervals, the natural mixture, and the weight statistics after warm-up."""

from __future__ import annotations

from pathlib import Path

import yaml

from data_prep.blend import BlendFileError, read_blend_file
from launch.config import ConfigError
from launch.metrics import after_warmup, read_metrics
from launch.tools.stats import CONFIDENCE, mean_and_interval, t_quantile
from launch.tools.study.arms import Arm
from launch.tools.study.plan import Run


def natural_weights(blend_path: str, domains: list[str]) -> dict[str, float]:
    """The blend file's own weights (token shares) of those of `domains` it has, renormalised
    to sum to 1; a held-out domain the train blend lacks (a slice of a training domain, such as
    the web demo's `web-informative`) is reported on its own only."""
    try:
        blend = read_blend_file(blend_path).domains
    except BlendFileError as error:
        raise ConfigError(str(error)) from None
    mixed = [d for d in domains if d in blend]
    if not mixed:
        raise ConfigError(
            f"none of the held-out domains {domains} is in the train blend {blend_path}: the natural"
            " mixture needs the token share of at least one"
        )
    total = sum(blend[d].weight for d in mixed)
    return {d: blend[d].weight / total for d in mixed}


def _final_valid(run_dir: Path, steps: int) -> dict[str, float]:
    valid = [r for r in read_metrics(run_dir) if r.get("kind") == "valid"]
    if not valid or valid[-1]["step"] != steps:
        raise ConfigError(f"{run_dir} has no held-out loss at step {steps}: the run is not finished")
    return valid[-1]["valid_loss_per_domain"]


def _after_warmup(run_dir: Path, warmup_steps: int) -> list[dict]:
    """Train rows after the warm-up (launch.metrics.after_warmup); none is an error."""
    rows = after_warmup([r for r in read_metrics(run_dir) if r.get("kind") == "train"], warmup_steps)
    if not rows:
        raise ConfigError(
            f"{run_dir} logged no train row after its {warmup_steps} warm-up steps: raise"
            " train.steps or lower reweight.warmup_steps"
        )
    return rows


def _paired(per_seed: list[float], baseline: list[float] | None) -> dict:
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
        return sum(weight * finals[run.run_dir][d] for d, weight in natural.items())

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
