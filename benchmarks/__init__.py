"""Benchmarks: ``python -m benchmarks [NAME ...]`` runs ``benchmarks/bench_<NAME>.py`` (all by default).

Each module defines ``run(quick: bool) -> dict`` returning figures, including ratios against a
baseline measured in the same run, and a ``DESCRIPTION`` string.
"""
