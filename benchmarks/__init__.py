"""Benchmarks for policymix: the serving-load driver, the anchor baselines and memory helpers.

Benchmarks are not tests: tests/test_benchmarks_smoke.py only keeps them from rotting.
See benchmarks/README.md for the commands that reproduce every committed number.
"""
