"""Helpers of the benchmark suite run by ``python tests/benchmarks/run.py`` (see run.py)."""
