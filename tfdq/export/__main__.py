"""``python -m tfdq.export``: the same command as ``tfdq-export``."""

from tfdq.export.command import run_command

run_command()
