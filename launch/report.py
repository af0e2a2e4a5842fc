"""Compare runs: a table of per-domain validation loss and a figure of curves and weight statistics.

    python -m launch.report runs/demo/uniform runs/demo/linupper --out runs/demo/report.png
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from launch.metrics import METRICS_FILE


def read_rows(run_dir: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (Path(run_dir) / METRICS_FILE).read_text().splitlines() if line.strip()]
    return [r for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "valid"]


def validation_table(runs: dict[str, Path]) -> str:
    """Final held-out loss per domain, one column per run, and the mean."""
    finals = {name: read_rows(path)[1][-1] for name, path in runs.items()}
    domains = sorted(next(iter(finals.values()))["valid_loss_per_domain"])
    width = max(map(len, [*domains, "domain"])) + 2
    header = "domain".ljust(width) + "".join(name.rjust(12) for name in runs)
    lines = [f"held-out loss per domain at step {next(iter(finals.values()))['step']}", header, "-" * len(header)]
    for domain in domains:
        lines.append(domain.ljust(width) + "".join(f"{finals[n]['valid_loss_per_domain'][domain]:12.4f}" for n in runs))
    lines.append("mean".ljust(width) + "".join(f"{finals[n]['valid_loss']:12.4f}" for n in runs))
    return "\n".join(lines)


def plot(runs: dict[str, Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (loss_ax, valid_ax), (ess_ax, share_ax) = axes
    for name, path in runs.items():
        train, valid = read_rows(path)
        steps = [r["step"] for r in train]
        loss_ax.plot(steps, [r["loss"] for r in train], label=f"{name}: LM loss")
        loss_ax.plot(steps, [r["weighted_loss"] for r in train], "--", label=f"{name}: weighted loss")
        valid_ax.plot([r["step"] for r in valid], [r["valid_loss"] for r in valid], marker="o", label=name)
        ess_ax.plot(steps, [r["weight_ess"] for r in train], label=f"{name}: ESS")
        ess_ax.plot(steps, [r["weight_entropy"] for r in train], ":", label=f"{name}: normalised entropy")
    loss_ax.set(title="training loss", xlabel="step")
    valid_ax.set(title="held-out loss (mean over domains)", xlabel="step")
    ess_ax.set(title="weight statistics (1 = uniform)", xlabel="step", ylim=(0, 1.05))

    # Weight share against sample share per domain, after warm-up, for the last run.
    name, path = list(runs.items())[-1]
    train, _ = read_rows(path)
    late = train[len(train) // 2 :]
    domains = sorted(late[0]["domain_weight_share"])
    weight = [sum(r["domain_weight_share"][d] for r in late) / len(late) for d in domains]
    sample = [sum(r["domain_sample_share"][d] for r in late) / len(late) for d in domains]
    positions = range(len(domains))
    share_ax.bar([p - 0.2 for p in positions], sample, width=0.4, label="share of samples")
    share_ax.bar([p + 0.2 for p in positions], weight, width=0.4, label="share of weight")
    share_ax.set_xticks(list(positions), domains)
    share_ax.set(title=f"{name}: where the weight goes (second half of training)")
    for ax in axes.flat:
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp" + out.suffix)
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories; each column is named after its directory")
    parser.add_argument("--out", type=Path, help="write the figure here (PNG)")
    args = parser.parse_args(argv)
    runs = {path.name: path for path in args.runs}
    print(validation_table(runs))
    if args.out:
        plot(runs, args.out)
        print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
