"""absl-flag training scripts for tfdq (run from the repository root)."""
