"""absl-flag training scripts for tfdq (run from the repository root)."""

import os

# The scripts quiet TensorFlow's C++ start-up log (the library leaves it alone).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
