"""Benchmarks: embedfleet beside its contenders, in one process tree (see shared/BENCH.md)."""
