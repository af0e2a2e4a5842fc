"""Run a Megatron-LM training script unmodified on this machine: `python megatron_lm_on_cpu.py
SCRIPT ARGS...` switches on the CPU layer for Megatron-LM (only where there is no CUDA),
then runs SCRIPT as `__main__` with ARGS."""

import runpy
import sys

from megatron_patches.megatron_lm_cpu import enable_megatron_lm_cpu_mode

enable_megatron_lm_cpu_mode()
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
