"""The installed commands work from any folder (not only the repository root)."""

import os
import subprocess
import sys

import pytest


def _command(name):
    path = os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.exists(path):
        pytest.skip(f"{name} is not installed next to {sys.executable} (pip install -e .)")
    return path


def test_console_scripts_run_from_outside_the_repository(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    procs = {
        name: subprocess.Popen(
            [_command(name), "--helpshort"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("tfdq-train", "tfdq-export")
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        # absl ends --help with exit status 1; an import error would too, so the flags must be listed
        assert proc.returncode in (0, 1), f"{name}: {err[-2000:]}"
        assert "Traceback" not in err, f"{name}: {err[-2000:]}"
        # each command lists its own flags
        flag = "--model_dir" if name == "tfdq-train" else "--model"
        assert flag in out, f"{name} --helpshort does not list {flag}:\n{out[-2000:]}"
