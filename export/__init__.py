"""absl-flag export commands for tfdq (run from the repository root).

``python -m export.tflite --model=m.keras``: a trained tfdq model to an
integer ``.tflite`` that keeps the learned integers, with a fidelity report.
"""

import os

# The scripts quiet TensorFlow's C++ start-up log (the library leaves it alone).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
