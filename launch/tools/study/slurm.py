"""The study as a Slurm array script: one task per unfinished run."""

from __future__ import annotations

import shlex
from pathlib import Path

from launch.tools.study.plan import Run, pretrain_args


def slurm_script(config: str, runs: list[Run], nproc: int, out: Path) -> str:
    """A Slurm array script, task i = runs[i] on one node (launch/slurm/pretrain.sbatch's
    conventions). Written for clusters but not tested on a real one."""
    listing = "\n".join(f"#   {i:>3}  {r.arm} seed {r.seed} -> {r.run_dir}" for i, r in enumerate(runs))
    cases = "\n".join(
        f"  {i}) args=({' '.join(shlex.quote(a) for a in pretrain_args(config, r))}) ;;" for i, r in enumerate(runs)
    )
    container_args = (
        '--container-image "$IMAGE" --container-mounts "${CONTAINER_MOUNTS:-$REPO:$REPO}" --container-workdir "$REPO"'
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
  srun_args+=({container_args})
fi
echo "array task $SLURM_ARRAY_TASK_ID: ${{args[*]}}"
source "$REPO/launch/slurm/step.sh"  # stop signals save a checkpoint; USR1 requeues the task
run_step srun "${{srun_args[@]}}" "$PYTHON" -m launch.torchrun --standalone --nproc-per-node {nproc} "${{args[@]}}"
"""
