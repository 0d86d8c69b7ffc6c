"""Writing benchmark results: one JSON per experiment with the machine, versions and date."""

import json
import os
import platform
import time


def write_result(out_dir, name, experiment, command, payload):
    """Write ``payload`` plus provenance to ``<out_dir>/<name>.json``; return the path."""
    import tensorflow as tf  # noqa: PLC0415

    out = {
        "experiment": experiment,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared)",
        "tensorflow": tf.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
    }
    out.update(payload)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")
    return path
