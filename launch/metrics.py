"""What a run reports: step statistics gathered on the device, then a console line,
`metrics.jsonl` and TensorBoard, all from global rank 0."""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from data_prep.files import write_text_atomically
from launch.console import say
from megatron_patches.device import device

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id.txt"

# Row names of the per-step statistics and the loss-report keys they come from, in row order.
STEP_STATISTICS = (
    ("loss", "lm_loss"),
    ("weighted_loss", "weighted_loss"),
    ("weight_ess", "ess"),
    ("weight_max", "max_weight"),
    ("weight_entropy", "entropy"),
    ("invalid_fraction", "invalid_fraction"),
    ("loss_top_weighted_quarter", "loss_top_quarter"),
    ("loss_bottom_weighted_quarter", "loss_bottom_quarter"),
)
# With `reweight.unit: document` the weights, ESS, entropy and shares above are per document
# segment; these rows add how many segments a sample holds and the share of samples whose
# segments passed `reweight.max_segments_per_sample` (their tail merged into one slot).
DOCUMENT_STATISTICS = (
    ("segments_per_sample", "units_per_sample"),
    ("segments_over_bound", "units_over_bound"),
)
# Per-domain figures: the loss reports one value per domain id; rows and checkpoints carry
# them by domain name (row name = report key).
DOMAIN_STATISTICS = ("domain_weight_share", "domain_sample_share")


def is_reporter() -> bool:
    """The one rank whose loss reports are logged: last stage, first TP/CP/DP rank."""
    return (
        ps.is_pipeline_last_stage()
        and ps.get_tensor_model_parallel_rank() == 0
        and ps.get_context_parallel_rank() == 0
        and ps.get_data_parallel_rank() == 0
    )


class IntervalMeans(NamedTuple):
    statistics: dict[str, float]  # STEP_STATISTICS by row name
    grad_norm: float
    step_time_s: float
    domain_weight_share: dict[str, float]
    domain_sample_share: dict[str, float]


class StepStatistics:
    """Averages the loss reports of the steps between two log lines.

    Reports are summed on the device, so a step costs no host sync; `means()` reads them
    once, on global rank 0, at log time.  Ranks without reports (earlier pipeline stages) add
    zeros.  On the device the figures are one flat vector (one addition a step, one
    collective a log); `_by_name` and `_flat` are the only places that know its order.
    """

    def __init__(self, domains: list[str], documents: bool = False):
        self.domains = list(domains)
        self.rows = STEP_STATISTICS + (DOCUMENT_STATISTICS if documents else ())
        self._sums = torch.zeros(
            len(self.rows) + len(DOMAIN_STATISTICS) * len(self.domains), dtype=torch.float64, device=device()
        )
        self._steps, self._seconds, self._grad_norm = 0, 0.0, 0.0

    def _report_vector(self, report: dict) -> torch.Tensor:
        scalars = torch.stack([report[key].to(torch.float64) for _, key in self.rows])
        return torch.cat([scalars, *(report[key].to(torch.float64) for key in DOMAIN_STATISTICS)])

    def _by_name(self, values: list[float]) -> dict:
        """{row name: value}, and {row name: {domain: value}} for the per-domain figures."""
        figures = {name: value for (name, _), value in zip(self.rows, values)}
        per_domain = values[len(self.rows) :]
        for i, name in enumerate(DOMAIN_STATISTICS):
            figures[name] = dict(zip(self.domains, per_domain[i * len(self.domains) : (i + 1) * len(self.domains)]))
        return figures

    def _flat(self, figures: dict) -> list[float]:
        """The inverse of `_by_name`; a row or domain the figures lack is an error that names it."""
        rows = [name for name, _ in self.rows if name not in figures]
        if rows:
            raise ValueError(f"saved step statistics have no row {rows[0]!r} (another reweight.unit?)")
        missing = [d for d in self.domains for name in DOMAIN_STATISTICS if d not in figures[name]]
        if missing:
            raise ValueError(
                f"saved step statistics have no figures of domain {missing[0]!r} (domains now: {self.domains})"
            )
        scalars = [figures[name] for name, _ in self.rows]
        return scalars + [figures[name][d] for name in DOMAIN_STATISTICS for d in self.domains]

    def add(self, reports: list[dict], grad_norm: float, seconds: float) -> None:
        """One optimizer step: its micro-batches' reports, its gradient norm and wall time."""
        if reports:
            self._sums += torch.stack([self._report_vector(r) for r in reports]).mean(0)
        self._steps += 1
        self._seconds += seconds
        self._grad_norm += grad_norm

    def state_dict(self) -> dict | None:
        """The open interval, for a checkpoint (rank 0; a collective: every rank calls it)."""
        sums = reduce_to_rank0(self._sums, is_reporter())
        if sums is None:
            return None
        return {
            "sums": self._by_name(sums),
            "steps": self._steps,
            "seconds": self._seconds,
            "grad_norm": self._grad_norm,
        }

    def load_state_dict(self, state: dict) -> None:
        """`sums` by name, or as the flat list that checkpoints before names were written."""
        if is_reporter():
            sums = state["sums"] if isinstance(state["sums"], list) else self._flat(state["sums"])
            self._sums = torch.tensor(sums, dtype=torch.float64, device=device())
        self._steps, self._seconds, self._grad_norm = state["steps"], state["seconds"], state["grad_norm"]

    def means(self) -> IntervalMeans | None:
        """The interval's means on rank 0 (None elsewhere), and a fresh interval."""
        values = reduce_to_rank0(self._sums / self._steps, is_reporter())
        steps, seconds, grad_norm = self._steps, self._seconds, self._grad_norm
        self._sums.zero_()
        self._steps, self._seconds, self._grad_norm = 0, 0.0, 0.0
        if values is None:
            return None
        figures = self._by_name(values)
        return IntervalMeans(
            statistics={name: figures[name] for name, _ in self.rows},
            grad_norm=grad_norm / steps,
            step_time_s=seconds / steps,
            domain_weight_share=figures["domain_weight_share"],
            domain_sample_share=figures["domain_sample_share"],
        )


def reduce_to_rank0(values: torch.Tensor, contributes: bool) -> list[float] | None:
    """Sum `values` over the ranks that contribute; rank 0 gets the list (others None).

    Statistics live on the last pipeline stage, and rank 0 sits on the first; a world
    all-reduce in which only the chosen ranks put non-zero values moves them there in one
    collective (called only at log time, so its host sync does not slow the steps).
    """
    values = values.to(device=device(), dtype=torch.float64, copy=True)
    if not contributes:
        values.zero_()
    dist.all_reduce(values)
    return values.tolist() if dist.get_rank() == 0 else None


class MetricsFileError(ValueError):
    """A metrics file with a broken line before its last one; the message names the file and line."""


def parse_metrics(path: Path) -> tuple[list[tuple[str, dict]], int]:
    """Every row of a metrics file with its line, and the size in bytes of a torn last line (a
    write cut short by a kill or a full disk), which is left out. A broken line anywhere else
    is corruption, not a torn write: refused, naming the file and line."""
    lines = Path(path).read_text().splitlines()
    rows, torn = [], 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if number < len(lines):
                raise MetricsFileError(f"{path}:{number} is not a JSON row; repair or remove that line") from None
            torn = len(line.encode())
    return rows, torn


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of RUN/metrics.jsonl (none before it exists), read as `parse_metrics` reads them."""
    path = Path(run_dir) / METRICS_FILE
    return [row for _, row in parse_metrics(path)[0]] if path.is_file() else []


def after_warmup(train: list[dict], warmup_steps: int) -> list[dict]:
    """Train rows whose logging interval lies wholly after the reweighting warm-up: the row
    before (step 0 for the first) is at or after warmup_steps. The window the report's and
    the study's weight statistics average over."""
    previous = [0] + [r["step"] for r in train[:-1]]
    return [r for r, before in zip(train, previous) if before >= warmup_steps]


def rows_up_to(path: Path, step: int) -> tuple[list[str], int]:
    """The lines of a metrics file whose rows are at or before `step`, and the size in bytes of
    a torn last line, which is left out (see `parse_metrics`)."""
    rows, torn = parse_metrics(path)
    return [line for line, row in rows if row["step"] <= step], torn


class MetricsLog:
    """Appends one JSON object per logged row; resuming drops rows from after the checkpoint."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int, wandb: dict | None = None):
        """`wandb`: None, or the keyword arguments of `wandb.init` (project, mode, config, ...)."""
        self.enabled = dist.get_rank() == 0
        self.path = Path(run_dir) / METRICS_FILE
        self.writer = None
        self.wandb_run = None
        if not self.enabled:
            return
        self._truncate_after(resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)
        if wandb is not None:
            self.wandb_run = start_wandb(Path(run_dir), wandb)

    def _truncate_after(self, step: int) -> None:
        """Rows past the step we resume from would be logged again: drop them, atomically."""
        if not self.path.exists():
            return
        kept, torn = rows_up_to(self.path, step)
        if torn:
            say(f"warning: dropped a torn last line of {self.path} ({torn} bytes)", file=sys.stderr)
        text = "".join(line + "\n" for line in kept)
        if text != self.path.read_text():
            write_text_atomically(self.path, text)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for tag, value in flat_scalars(row).items():
                self.writer.add_scalar(tag, value, row["step"])
            self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(flat_scalars(row), step=row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def flat_scalars(row: dict) -> dict[str, float]:
    """`train/loss`, `valid/valid_loss_per_domain/code`, ...: the TensorBoard tags, for W&B."""
    prefix = row.get("kind", "train")
    scalars = {}
    for key, value in row.items():
        if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
            scalars[f"{prefix}/{key}"] = value
        elif isinstance(value, dict):
            scalars.update({f"{prefix}/{key}/{name}": v for name, v in value.items()})
    return scalars


def start_wandb(run_dir: Path, settings: dict):
    """A W&B run in RUN/wandb/ (unless WANDB_DIR says otherwise), resumed by the run dir's id."""
    try:
        import wandb
    except ImportError as error:
        raise RuntimeError(
            "logging.wandb is true but wandb is not installed: `pip install wandb`"
            " (or `pip install -e '.[wandb]'`), or set logging.wandb=false"
        ) from error
    directory = Path(os.environ.get("WANDB_DIR") or run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    id_file = run_dir / WANDB_ID_FILE  # a resumed run continues the same W&B run
    if not id_file.exists():
        id_file.write_text(uuid.uuid4().hex[:12] + "\n")
    return wandb.init(dir=str(directory), id=id_file.read_text().strip(), resume="allow", **settings)


def console_line(row: dict, steps: int, mixture: bool = False) -> str:
    """`mixture`: add the domain weights that drew the step (online mixing moves them)."""
    mfu = "" if row["mfu"] is None else f" | MFU {100 * row['mfu']:.1f}%"
    weights = " | mixture " + " ".join(f"{d} {w:.3f}" for d, w in row["domain_mixture"].items()) if mixture else ""
    return (
        f"step {row['step']:>6}/{steps} | loss {row['loss']:.4f} | weighted {row['weighted_loss']:.4f} | "
        f"lr {row['lr']:.2e} | grad {row['grad_norm']:.3f} | ess {row['weight_ess']:.3f} | "
        f"max w {row['weight_max']:.2f} | invalid {row['invalid_fraction']:.3f} | "
        f"{row['tokens_per_s']:.0f} tok/s | {row['step_time_s'] * 1000:.0f} ms/step | "
        f"{row['tflops_per_device']:.3g} TFLOP/s/dev{mfu} | peak {row['peak_memory_gib']:.2f} GiB{weights}"
    )
