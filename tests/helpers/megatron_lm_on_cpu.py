"""Run a Megatron-LM training script unmodified on this machine: `python megatron_lm_on_cpu.py
SCRIPT ARGS...` switches on the CPU layer for Megatron-LM (only where there is no CUDA),
then runs SCRIPT as `__main__` with ARGS."""

import sys

from megatron_patches.megatron_lm import run_script
from megatron_patches.megatron_lm_cpu import enable_megatron_lm_cpu_mode

if __name__ == "__main__":  # not in the processes multiprocessing spawns from here
    enable_megatron_lm_cpu_mode()
    sys.argv = sys.argv[1:]
    run_script(sys.argv[0])
