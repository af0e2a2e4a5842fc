"""Shared test helpers: real processes (`multiprocess`), a tiny Megatron model and its
reference (`megatron_harness`), runs of the entry point (`e2e`), host-sync detectors
(`host_reads`)."""
