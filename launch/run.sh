#!/usr/bin/env bash
# Pretrain on this machine: one torchrun process per GPU (or CPU process for the demo).
#
#   ./launch/run.sh                                              # the CPU demo, 2 processes
#   CONFIG=configs/gpt2-124m.yaml NGPU=8 ./launch/run.sh --set reweight.strategy=linupper
#   DRY_RUN=1 NGPU=64 CONFIG=configs/llama-7b.yaml ./launch/run.sh   # check a 64-GPU job
#
# Environment (all optional):
#   CONFIG   config file                      (default configs/demo_cpu.yaml)
#   RUN_DIR  logs, metrics, checkpoints       (default runs/<config name>)
#   NGPU     processes on this machine; NPROC is the same (default: GPUs found, else 2)
#   DRY_RUN  1 = validate and report for NGPU processes, start nothing
#   PYTHON   interpreter                      (default .venv/bin/python if present, else python)
#   CUDA_DEVICE_MAX_CONNECTIONS               (default 1, set by launch.torchrun: Megatron-Core's
#            communication/compute overlap needs kernels started in the order they are issued)
# Other arguments go to `python -m launch.pretrain` unchanged (e.g. --set key=value).
set -euo pipefail
cd "$(dirname "$0")/.."

default_nproc() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --list-gpus >/dev/null 2>&1; then
    nvidia-smi --list-gpus | wc -l
  else
    echo 2
  fi
}

CONFIG="${CONFIG:-configs/demo_cpu.yaml}"
RUN_DIR="${RUN_DIR:-runs/$(basename "$CONFIG" .yaml)}"
NPROC="${NGPU:-${NPROC:-$(default_nproc)}}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi

if [[ "${DRY_RUN:-0}" == "1" ]]; then
  exec "$PYTHON" -m launch.pretrain --config "$CONFIG" --dry-run --world-size "$NPROC" "$@"
fi

exec "$PYTHON" -m launch.torchrun --standalone --nproc-per-node "$NPROC" \
  -m launch.pretrain --config "$CONFIG" --run-dir "$RUN_DIR" "$@"
