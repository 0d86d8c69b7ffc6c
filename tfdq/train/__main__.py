"""``python -m tfdq.train``: the same command as ``tfdq-train``."""

from tfdq.train.train import run_command

run_command()
