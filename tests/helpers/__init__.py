"""Shared test helpers: real processes (`multiprocess`), a tiny Megatron model and its
reference (`megatron_harness`), runs of the entry point (`e2e`), host-sync detectors
(`host_reads`), what a user's shell sees (`logs`), the export tools run offline (`export`),
Megatron-LM's loop on CPU (`megatron_lm_on_cpu`), a corpus for sharded data_prep runs
(`shards`); `REPO`, the repository's root."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
