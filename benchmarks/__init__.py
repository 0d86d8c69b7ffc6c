"""Benchmarks: scripts that write JSON and PNG results to benchmarks/results/."""

import os

# The scripts quiet TensorFlow's C++ start-up log (the library leaves it alone).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
