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


def save_report(out_dir, name, experiment, command, payload, complete=True):
    """Write ``payload``: the final result with provenance, or, while runs are
    still missing, a partial ``<name>.json`` marked as such. Returns the
    payload as JSON would read it back."""
    if complete:
        write_result(out_dir, name, experiment, command, payload)
    else:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(dict(payload, experiment="partial: run in progress"), f, indent=1)
    return json.loads(json.dumps(payload))
