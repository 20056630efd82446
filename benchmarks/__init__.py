"""Benchmark scripts (SPEC §10), runnable as files; the load harness is ``dprdm.benchmarks.load_harness``."""
