"""Benchmark suite for ``dsa_ops`` (pytest-benchmark); see ``benchmarks/conftest.py``.

Run ``pytest benchmarks/ --benchmark-only --benchmark-json=RESULTS.json`` and summarise
with ``python -m benchmarks.report RESULTS.json``.
"""
