"""Benchmarks: scripts that write JSON and PNG results to benchmarks/results/."""
