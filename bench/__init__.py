"""Benchmarks: `python -m bench` runs every bench_*.py and writes their tables to bench/RESULTS.md."""
