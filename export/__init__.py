"""absl-flag export commands for tfdq (run from the repository root).

``python -m export.tflite --model=m.keras``: a trained tfdq model to an
integer ``.tflite`` that keeps the learned integers, with a fidelity report.
"""
