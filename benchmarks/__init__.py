"""Benchmarks for taskserver; run them with ``scripts/bench`` (``--help`` for options).

Each figure is printed beside a baseline measured in the same run, on the same
machine, so a noisy neighbour moves both. Nothing here is a test: it asserts
nothing and fails only when a measurement cannot be taken.
"""
