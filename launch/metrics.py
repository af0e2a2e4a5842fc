"""What a run reports: a console line, `metrics.jsonl` and TensorBoard, all from global rank 0."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

METRICS_FILE = "metrics.jsonl"


def reduce_to_rank0(values: torch.Tensor, contributes: bool) -> Optional[list[float]]:
    """Sum `values` over the ranks that contribute; rank 0 gets the list (others None).

    Statistics live on the last pipeline stage, and rank 0 sits on the first; a world
    all-reduce in which only the chosen ranks put non-zero values moves them there in one
    collective (called only at log time, so its host sync does not slow the steps).
    """
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    values = values.to(device=device, dtype=torch.float64, copy=True)
    if not contributes:
        values.zero_()
    dist.all_reduce(values)
    return values.tolist() if dist.get_rank() == 0 else None


class MetricsLog:
    """Appends one JSON object per logged row; resuming drops rows from after the checkpoint."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int):
        self.enabled = dist.get_rank() == 0
        self.path = Path(run_dir) / METRICS_FILE
        self.writer = None
        if not self.enabled:
            return
        self._truncate_after(resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)

    def _truncate_after(self, step: int) -> None:
        """Rows past the step we resume from would be logged again: drop them, atomically."""
        if not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if json.loads(line)["step"] <= step]
        if len(kept) != len(rows):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            prefix = row.get("kind", "train")
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self.writer.add_scalar(f"{prefix}/{key}", value, row["step"])
                elif isinstance(value, dict):
                    for name, v in value.items():
                        self.writer.add_scalar(f"{prefix}/{key}/{name}", v, row["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def console_line(row: dict, steps: int) -> str:
    return (
        f"step {row['step']:>6}/{steps} | loss {row['loss']:.4f} | weighted {row['weighted_loss']:.4f} | "
        f"lr {row['lr']:.2e} | grad {row['grad_norm']:.3f} | ess {row['weight_ess']:.3f} | "
        f"max w {row['weight_max']:.2f} | invalid {row['invalid_fraction']:.3f} | "
        f"{row['tokens_per_s']:.0f} tok/s | {row['step_time_s'] * 1000:.0f} ms/step"
    )
