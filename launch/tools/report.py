"""Compare runs: a table of per-domain validation loss and a figure of curves and weight statistics.

python -m launch.tools.report runs/demo/uniform runs/demo/linupper --out runs/demo/report.png

With --weights RUN (a run with logging.weights_every): per domain its most and least weighted
units (samples, or document segments) with a snippet of their first document, and
RUN/weights/weights.png, weight against loss.  With --kinds FILE too (JSON: domain -> kind ->
[first, end) of document indices, as data_prep.demo's web variant writes), per domain each
kind's share of the logged tokens beside its share of the weight.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import yaml

from launch import quiet

quiet.install()  # before launch.metrics imports Megatron-Core

from data_prep.files import replaced_atomically  # noqa: E402
from launch.config import from_dict  # noqa: E402
from launch.metrics import METRICS_FILE, MetricsFileError, after_warmup, read_metrics  # noqa: E402
from launch.sources import Tokenizer, train_blend  # noqa: E402
from launch.weights_log import WEIGHTS_DIR, read_weights  # noqa: E402

SNIPPET_CHARACTERS = 80
SAMPLES_SHOWN = 3  # of each end, per domain


def read_rows(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows); a torn last line is left out."""
    rows = read_metrics(run_dir)
    return [r for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "valid"]


def labels(paths: list[Path]) -> list[str]:
    """The shortest trailing part of each path that tells it apart from the others
    (a/linupper and b/linupper, not linupper twice)."""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    names = []
    for own in parts:
        for depth in range(1, len(own) + 1):
            if sum(other[-depth:] == own[-depth:] for other in parts) == 1:
                break
        names.append("/".join(own[-depth:]) if depth < len(own) else str(Path(*own)))
    return names


def validation_table(runs: dict[str, Path]) -> str:
    """Last held-out loss per domain, one column per run: every domain of any run, blank
    where a run has no such domain (or no held-out loss yet), and each run's own mean."""
    finals = {name: (read_rows(path)[1] or [None])[-1] for name, path in runs.items()}
    per_domain = {name: row["valid_loss_per_domain"] if row else {} for name, row in finals.items()}
    domains = sorted({d for losses in per_domain.values() for d in losses})
    width = max(map(len, [*domains, "domain", "mean of its domains"])) + 2
    column = max(12, *(len(name) + 2 for name in runs))
    header = "domain".ljust(width) + "".join(name.rjust(column) for name in runs)

    def cell(value) -> str:
        return ("" if value is None else f"{value:.4f}").rjust(column)

    lines = ["held-out loss per domain, last evaluation", header, "-" * len(header)]
    lines.append(
        "step".ljust(width) + "".join(("" if r is None else str(r["step"])).rjust(column) for r in finals.values())
    )
    for domain in domains:
        lines.append(domain.ljust(width) + "".join(cell(per_domain[n].get(domain)) for n in runs))
    lines.append("mean of its domains".ljust(width) + "".join(cell(r and r["valid_loss"]) for r in finals.values()))
    return "\n".join(lines)


def warmup_steps(run_dir: Path) -> int:
    """The run's reweighting warm-up, from the config it saved (0 for a folder without one)."""
    saved = run_dir / "config.yaml"
    return yaml.safe_load(saved.read_text())["reweight"]["warmup_steps"] if saved.is_file() else 0


def _same(first: list, second: list) -> bool:
    """Equal within 1e-6 everywhere (uniform weights make the loss and the weighted loss one)."""
    return all(
        a == b or (a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6)) for a, b in zip(first, second)
    )


def _plot_pair(ax, steps: list[int], name: str, solid: tuple[str, list], dashed: tuple[str, list], style: str) -> None:
    """Two series of one run in its colour; one line, labelled for both, where they coincide."""
    (solid_label, solid_values), (dashed_label, dashed_values) = solid, dashed
    if _same(solid_values, dashed_values):
        ax.plot(steps, solid_values, label=f"{name}: {solid_label} = {dashed_label}")
        return
    (line,) = ax.plot(steps, solid_values, label=f"{name}: {solid_label}")
    ax.plot(steps, dashed_values, style, color=line.get_color(), label=f"{name}: {dashed_label}")


def _plot_mixtures(ax, runs: dict[str, Path]) -> None:
    """The domain weights that drew each logged step (data.mixing): a colour per domain, a line style per run."""
    styles = ["-", "--", ":", "-."]
    colours = {}
    for number, (name, path) in enumerate(runs.items()):
        train = [r for r in read_rows(path)[0] if "domain_mixture" in r]
        for domain in train[0]["domain_mixture"]:
            colour = colours.setdefault(domain, f"C{len(colours) % 10}")
            values = [r["domain_mixture"][domain] for r in train]
            label = f"{name}: {domain}" if len(runs) > 1 else domain
            ax.plot([r["step"] for r in train], values, styles[number % len(styles)], color=colour, label=label)
    ax.set(title="domain mixture (weights that drew each step)", xlabel="step", ylabel="share of samples")


def plot(runs: dict[str, Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixing = [name for name, path in runs.items() if any("domain_mixture" in r for r in read_rows(path)[0])]
    fig, axes = plt.subplots(3 if mixing else 2, 2, figsize=(12, 12 if mixing else 8))
    (loss_ax, valid_ax), (ess_ax, share_ax) = axes[:2]
    if mixing:  # one wide panel: each run's domain weights over the steps
        for ax in axes[2]:
            ax.remove()
        _plot_mixtures(fig.add_subplot(axes[0, 0].get_gridspec()[2, :]), {name: runs[name] for name in mixing})
    for name, path in runs.items():
        train, valid = read_rows(path)
        steps = [r["step"] for r in train]
        column = {key: [r[key] for r in train] for key in ("loss", "weighted_loss", "weight_ess", "weight_entropy")}
        _plot_pair(loss_ax, steps, name, ("LM loss", column["loss"]), ("weighted loss", column["weighted_loss"]), "--")
        valid_ax.plot([r["step"] for r in valid], [r["valid_loss"] for r in valid], marker="o", label=name)
        _plot_pair(
            ess_ax, steps, name, ("ESS", column["weight_ess"]), ("normalised entropy", column["weight_entropy"]), ":"
        )
    loss_ax.set(title="training loss", xlabel="step", ylabel="loss (nats per token)")
    valid_ax.set(title="held-out loss (mean over domains)", xlabel="step", ylabel="loss (nats per token)")
    ess_ax.set(title="weight statistics (1 = uniform)", xlabel="step", ylabel="ESS, entropy", ylim=(0, 1.05))

    # Weight share against sample share per domain for the last run, over the window the
    # study and the README use: the logged steps after the reweighting warm-up.
    name, path = list(runs.items())[-1]
    train, _ = read_rows(path)
    late = after_warmup(train, warmup_steps(path))
    window = "no logged step after the warm-up"
    if late:
        skipped = len(train) - len(late)  # the rows after the warm-up are the last ones
        first = (train[skipped - 1]["step"] if skipped else 0) + 1
        window = f"mean over steps {first}-{late[-1]['step']}, after the warm-up"
        domains = sorted(late[0]["domain_weight_share"])
        weight = [sum(r["domain_weight_share"][d] for r in late) / len(late) for d in domains]
        sample = [sum(r["domain_sample_share"][d] for r in late) / len(late) for d in domains]
        positions = range(len(domains))
        share_ax.bar([p - 0.2 for p in positions], sample, width=0.4, label="share of samples")
        share_ax.bar([p + 0.2 for p in positions], weight, width=0.4, label="share of weight")
        share_ax.set_xticks(list(positions), domains)
    share_ax.set(title=f"{name}: where the weight goes\n({window})", xlabel="domain", ylabel="share")
    for ax in fig.axes:
        if ax.get_legend_handles_labels()[0]:  # a run without train rows has nothing to label
            ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(out) as tmp:
        fig.savefig(tmp, dpi=100)


def _snippet(documents, tokenizer, document: int) -> str:
    """The document's first characters on one line (a few more tokens than characters suffice)."""
    text = tokenizer.decode(documents[document][:SNIPPET_CHARACTERS].tolist())
    return " ".join(text.split())[:SNIPPET_CHARACTERS]


def weights_table(run_dir: Path) -> str:
    """Per domain the samples of most and least weight in the run's weights log, each with its
    first document (the one it starts in) read from the domain's dataset and decoded."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    rows = read_weights(run_dir)
    cfg = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    blend = train_blend(cfg)
    prefixes = dict(zip(blend.domains, blend.prefixes))
    tokenizer = Tokenizer.of(cfg)
    steps = sorted({r["step"] for r in rows})
    unit = "document segments" if "segment" in rows[0] else "samples"
    lines = [
        f"weights of {len(rows)} {unit} at {len(steps)} logged steps ({steps[0]}-{steps[-1]});"
        " a weight is a share of its global micro-batch"
    ]
    for domain in [d for d in blend.domains if any(r["domain"] == d for r in rows)]:
        documents = IndexedDataset(prefixes[domain])
        ranked = sorted((r for r in rows if r["domain"] == domain), key=lambda r: r["weight"], reverse=True)
        most = ranked[:SAMPLES_SHOWN]
        least = ranked[len(most) :][::-1][:SAMPLES_SHOWN]  # a unit is shown once
        for end, chosen in (("most", most), ("least", least)):
            lines.append(f"{domain}: {end} weighted" + ("" if chosen else ": all shown above"))
            lines += [
                f"  weight {r['weight']:.4f}  loss {r['loss']:.3f}  step {r['step']:>6}"
                f"  document {r['documents'][0]:>6}  {_snippet(documents, tokenizer, r['documents'][0])!r}"
                for r in chosen
            ]
    return "\n".join(lines)


def kind_shares(rows: list[dict], kinds: dict[str, dict[str, list[int]]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Domain -> kind -> (share of the domain's logged input tokens, share of its weight).
    A row's weight is spread over its documents by their input tokens, as the token-mean loss
    of the row spreads it; documents outside every range of `kinds` are of kind "other"."""
    tokens, weight = {}, {}
    for row in rows:
        ranges = kinds.get(row["domain"], {})
        total = sum(row["document_tokens"])
        for document, count in zip(row["documents"], row["document_tokens"]):
            kind = next((k for k, (first, end) in ranges.items() if first <= document < end), "other")
            key = (row["domain"], kind)
            tokens[key] = tokens.get(key, 0) + count
            weight[key] = weight.get(key, 0.0) + row["weight"] * count / max(total, 1)
    shares = {}
    for domain in sorted({domain for domain, _ in tokens}):
        keys = [key for key in tokens if key[0] == domain]
        all_tokens, all_weight = sum(tokens[k] for k in keys), sum(weight[k] for k in keys)
        shares[domain] = {
            kind: (tokens[(domain, kind)] / all_tokens, weight[(domain, kind)] / all_weight) for _, kind in sorted(keys)
        }
    return shares


def kinds_table(run_dir: Path, kinds_file: Path) -> str:
    """Over the logged steps after the reweighting warm-up (all of them if none is after it)."""
    warmup, rows = warmup_steps(run_dir), read_weights(run_dir)
    late = [r for r in rows if r["step"] > warmup] or rows
    steps = sorted({r["step"] for r in late})
    lines = [
        f"share of the logged tokens / share of the weight, per domain and kind of document"
        f" (steps {steps[0]}-{steps[-1]}, after a warm-up of {warmup})"
    ]
    for domain, kinds in kind_shares(late, json.loads(kinds_file.read_text())).items():
        cells = [f"{kind} {tokens:.1%} / {weight:.1%}" for kind, (tokens, weight) in kinds.items()]
        lines.append(f"{domain}: " + ", ".join(cells))
    return "\n".join(lines)


def plot_weights(run_dir: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_weights(run_dir)
    fig, ax = plt.subplots(figsize=(8, 6))
    for domain in sorted({r["domain"] for r in rows}):
        chosen = [r for r in rows if r["domain"] == domain]
        ax.scatter([r["loss"] for r in chosen], [r["weight"] for r in chosen], s=12, alpha=0.7, label=domain)
    ax.set(title=f"{run_dir.name}: weight against loss", xlabel="sample loss (nats per token)", ylabel="weight")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with replaced_atomically(out) as tmp:
        fig.savefig(tmp, dpi=100)


def _weights_main(run_dir: Path, kinds_file: Path | None) -> int:
    if not any((run_dir / WEIGHTS_DIR).glob("step_*.jsonl")):
        print(
            f"python -m launch.tools.report: error: {run_dir}: no weights log ({WEIGHTS_DIR}/step_*.jsonl):"
            " train with --set logging.weights_every=N",
            file=sys.stderr,
        )
        return 2
    print(weights_table(run_dir))
    if kinds_file:
        print(kinds_table(run_dir, kinds_file))
    out = run_dir / WEIGHTS_DIR / "weights.png"
    plot_weights(run_dir, out)
    print(f"figure: {out}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.tools.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "runs",
        nargs="*",
        type=Path,
        help=(
            "run directories (launch.pretrain's --run-dir);"
            " each column is named by the shortest distinct end of its path"
        ),
    )
    parser.add_argument("--out", type=Path, help="write the figure here (PNG)")
    parser.add_argument("--weights", type=Path, metavar="RUN", help="the weights log of one run, instead")
    parser.add_argument(
        "--kinds",
        type=Path,
        metavar="FILE",
        help="with --weights: JSON domain -> kind -> [first, end) of document indices (data/demo-web/train.kinds.json)",
    )
    args = parser.parse_args(argv)
    if bool(args.weights) == bool(args.runs):
        parser.error("give run directories to compare, or --weights RUN")
    if args.kinds and not args.weights:
        parser.error("--kinds goes with --weights RUN")
    if args.kinds and not args.kinds.is_file():
        parser.error(f"--kinds {args.kinds}: no such file")
    if args.weights:
        return _weights_main(args.weights, args.kinds)
    for path in args.runs:
        problem = None
        if not path.is_dir():
            problem = "no such directory"
        elif not (path / METRICS_FILE).is_file():
            problem = f"not a run directory (no {METRICS_FILE}): give the --run-dir of a launch.pretrain run"
        if problem:
            print(f"python -m launch.tools.report: error: {path}: {problem}", file=sys.stderr)
            return 2
    if len({os.path.abspath(p) for p in args.runs}) != len(args.runs):
        print("python -m launch.tools.report: error: a run directory is given twice", file=sys.stderr)
        return 2
    runs = dict(zip(labels(args.runs), args.runs))
    try:
        print(validation_table(runs))
        if args.out:
            plot(runs, args.out)
            print(f"figure: {args.out}")
    except MetricsFileError as error:
        print(f"python -m launch.tools.report: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
