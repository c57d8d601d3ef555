"""Benchmarks: rerunnable scripts that write bench/results/*.json and docs/BENCHMARKS.md.

``python -m bench.run_all [--quick]`` runs them all; each ``bench_*.py`` also runs alone.
"""
