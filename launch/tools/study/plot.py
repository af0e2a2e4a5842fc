"""The summary as a figure: paired differences with their intervals, weight against sample share."""

from __future__ import annotations

from pathlib import Path

from data_prep.files import replaced_atomically


def plot(summary: dict, out: Path) -> None:
    """Paired differences with their intervals, and weight share against sample share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms, n = summary["arms"], len(summary["seeds"])
    fig, (diff_ax, share_ax) = plt.subplots(1, 2, figsize=(13, 5))
    labels = list(arms[0]["held_out"]) + ["natural mixture"]
    offsets = [0.0] if len(arms) < 3 else [0.3 * (i / (len(arms) - 2) - 0.5) for i in range(len(arms) - 1)]
    for arm, offset in zip(arms[1:], offsets):
        entries = [arm["held_out"][d] for d in labels[:-1]] + [arm["natural_mixture"]]
        x = [i + offset for i in range(len(labels))]
        y = [e["diff_mean"] for e in entries]
        errors = [
            [0, 0]
            if e["diff_ci95"] is None
            else [e["diff_mean"] - e["diff_ci95"][0], e["diff_ci95"][1] - e["diff_mean"]]
            for e in entries
        ]
        diff_ax.errorbar(x, y, yerr=list(zip(*errors)), fmt="o", capsize=4, label=arm["name"])
    diff_ax.axhline(0.0, color="grey", linewidth=1)
    diff_ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    diff_ax.set(
        title=f"held-out loss − {summary['baseline']} (n = {n} paired seeds, "
        + (f"{summary['confidence']:.0%} t-interval, {n - 1} df)" if n > 1 else "no interval)"),
        ylabel="Δ loss (below 0 = better)",
    )
    domains = sorted({d for a in arms for d in a["weights"]["domain_sample_share"]})
    width = 0.8 / (len(arms) + 1)
    for i, arm in enumerate(arms):
        shares = arm["weights"]["domain_weight_share"]
        share_ax.bar(
            [p + i * width for p in range(len(domains))],
            [shares.get(d, 0.0) for d in domains],
            width,
            label=f"{arm['name']}: weight",
        )
    sample = arms[0]["weights"]["domain_sample_share"]
    share_ax.bar(
        [p + len(arms) * width for p in range(len(domains))],
        [sample.get(d, 0.0) for d in domains],
        width,
        color="lightgrey",
        label=f"{arms[0]['name']}: samples",
    )
    share_ax.set_xticks([p + len(arms) * width / 2 for p in range(len(domains))], domains, rotation=30, ha="right")
    share_ax.set(title="share of weight per domain after warm-up", ylabel="share")
    for ax in (diff_ax, share_ax):
        ax.legend(fontsize=8)
    fig.tight_layout()
    with replaced_atomically(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
