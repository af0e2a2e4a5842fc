"""The summary as Markdown: held-out loss with paired differences, and where the weight went."""

from __future__ import annotations


def _diff_text(entry: dict) -> str:
    if entry["diff_mean"] is None:
        return ""
    if entry["diff_ci95"] is None:
        return f"{entry['diff_mean']:+.4f} (one seed: no interval)"
    low, high = entry["diff_ci95"]
    return f"{entry['diff_mean']:+.4f} [{low:+.4f}, {high:+.4f}]"


def _interval(confidence: float, n: int) -> str:
    if n == 1:
        return "(one seed: no interval)"
    return f"[{confidence:.0%} Student t-interval, n − 1 = {n - 1} degree{'' if n == 2 else 's'} of freedom]"


def _few_seeds_caution(n: int) -> list[str]:
    """Below 3 seeds an interval rests on the spread of one or two differences."""
    if n >= 3:
        return []
    if n == 1:
        return [
            "Caution: one seed gives no interval and says nothing about seed-to-seed noise; use 3 seeds or more.",
            "",
        ]
    return [
        "Caution: 2 seeds give 1 degree of freedom: each interval's width comes from the spread of just two"
        " differences, which can be small by chance, so an interval can look tight (and exclude 0) by chance"
        " alone; use 3 seeds or more.",
        "",
    ]


def markdown(summary: dict) -> str:
    """Two tables: held-out loss with paired differences, and where the weight went."""
    arms, baseline, n = summary["arms"], summary["baseline"], len(summary["seeds"])
    others = arms[1:]
    header = ["domain", baseline] + [c for a in others for c in (a["name"], f"Δ {a['name']}")]
    settings = "; ".join(f"{a['name']}: {' '.join(a['settings'])}" for a in arms)
    lines = [
        f"Arms, as changes to {summary['config']}: {settings}.",
        "",
        f"Held-out loss, mean over n = {n} paired seeds {summary['seeds']}; Δ = arm − {baseline} per seed,"
        f" mean {_interval(summary['confidence'], n)}; lower is better.",
        "",
        *_few_seeds_caution(n),
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
    natural = summary["natural_weights"]["weights"]
    mix = ", ".join(f"{d} {w:.3f}" for d, w in natural.items())
    apart = [d for d in domains if d not in natural]
    lines += [
        "",
        f"Natural mixture: the held-out losses weighted by the train blend's token shares ({mix})"
        + (f"; {', '.join(apart)}: not in the train blend, so not in the mixture." if apart else "."),
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
