"""Resume after SIGKILL: re-running the same command finishes the run, no epoch lost."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")


def _args(model_dir, extra=()):
    return [sys.executable, "-m", "tfdq.train", f"--model_dir={model_dir}", *extra]


def run_until_killed(args, point, timeout=300):
    """Run the command with ``TFDQ_FAULT_INJECT=point``: the process kills
    itself (SIGKILL, no cleanup) at that deterministic point of its
    checkpoint writer. Returns the exit code (-9)."""
    env = dict(_env(), TFDQ_FAULT_INJECT=point)
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != -9:
        raise AssertionError(f"the run was not killed at {point}:\n" + (proc.stdout + proc.stderr)[-3000:])
    return proc.returncode


def checkpoints(model_dir, stage):
    d = os.path.join(model_dir, stage, "checkpoints")
    return sorted(n for n in os.listdir(d) if n.startswith("ckpt-")) if os.path.isdir(d) else []


FLOAT = [
    "--stages=float",
    "--float_epochs=3",
    "--steps_per_epoch=40",
    "--checkpoint_every_steps=10",
    "--val_examples=200",
    "--verbose=2",
]


def test_sigkill_mid_epoch_then_same_command_finishes(tmp_path):
    model_dir = str(tmp_path / "run")
    # killed right after the checkpoint 20 steps into epoch 2 is in place
    rc = run_until_killed(_args(model_dir, FLOAT), "saved:ckpt-e000001-s000020")
    assert rc == -9
    assert checkpoints(model_dir, "float")[-1] == "ckpt-e000001-s000020"
    assert os.path.exists(os.path.join(model_dir, "flags.json"))
    assert not os.path.exists(os.path.join(model_dir, "float", "result.json"))
    with open(os.path.join(model_dir, "float", "history.json")) as f:
        assert [h["epoch"] for h in json.load(f)] == [1]  # epoch 1 done, epoch 2 interrupted

    proc = subprocess.run(
        _args(model_dir, FLOAT), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "resuming from" in proc.stdout and "step(s) into epoch 2" in proc.stdout
    with open(os.path.join(model_dir, "float", "history.json")) as f:
        history = json.load(f)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[1]["resumed_at_step"] == 20
    # the final checkpoint loads; the last step checkpoint says 3 epochs
    import keras

    import tfdq  # noqa: F401 (registers the tfdq classes)

    model = keras.models.load_model(os.path.join(model_dir, "float", "final.keras"), compile=False)
    assert model.count_params() > 0
    last = checkpoints(model_dir, "float")[-1]
    with open(os.path.join(model_dir, "float", "checkpoints", last, "state.json")) as f:
        state = json.load(f)
    assert (state["epoch"], state["step"]) == (3, 0)
    assert not [
        n for n in os.listdir(os.path.join(model_dir, "float", "checkpoints")) if n.startswith(".tmp-")
    ]


def _weights(path):
    import keras

    import tfdq  # noqa: F401

    return keras.models.load_model(path, compile=False).get_weights()


@pytest.mark.slow
def test_resumed_quantized_run_equals_the_uninterrupted_one(tmp_path):
    """Killed in the middle of quantized epoch 2 and resumed, the run ends
    with the weights, quantizer parameters and best feasible epoch of a run
    that was never interrupted (the data stream, optimizer state and
    checkpoint bookkeeping are all restored)."""
    extra = [
        "--float_epochs=1",
        "--quant_epochs=3",
        "--steps_per_epoch=30",
        "--checkpoint_every_steps=10",
        "--val_examples=200",
        "--stages=float,quant",
        "--target_weight_kb=12",
        "--verbose=2",
    ]
    clean = str(tmp_path / "clean")
    proc = subprocess.run(
        _args(clean, extra), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = str(tmp_path / "killed")
    run_until_killed(_args(killed, extra), "saved:ckpt-e000001-s000010")
    proc = subprocess.run(
        _args(killed, extra), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("final.keras",):
        a = _weights(os.path.join(clean, "quant", name))
        b = _weights(os.path.join(killed, "quant", name))
        assert max(float(np.max(np.abs(x - y))) for x, y in zip(a, b)) < 1e-5
    with open(os.path.join(clean, "quant", "result.json")) as f:
        r1 = json.load(f)
    with open(os.path.join(killed, "quant", "result.json")) as f:
        r2 = json.load(f)
    assert r1["best_epoch"] == r2["best_epoch"] and r1["bits"] == r2["bits"]
