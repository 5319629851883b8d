"""Benchmark commands: `python -m benchmarks.NAME` prints measured figures."""
