"""Shared test helpers: real processes (`multiprocess`), a tiny Megatron model and its
reference (`megatron_harness`), runs of the entry point (`e2e`), host-sync detectors
(`host_reads`)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
