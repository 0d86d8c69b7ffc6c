"""Resume after SIGKILL: re-running the same command finishes the run, no epoch lost."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")


def _args(model_dir, extra=()):
    return [sys.executable, "-m", "train.train", f"--model_dir={model_dir}", *extra]


def kill_when(model_dir, args, ready, timeout=240):
    """Start the command and SIGKILL it as soon as ``ready(model_dir)``."""
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError("the run ended before it could be killed: " + proc.stderr.read().decode()[-3000:])
            if ready(model_dir):
                proc.kill()  # SIGKILL: no cleanup, no atexit
                proc.wait()
                return proc.returncode
            time.sleep(0.05)
        raise AssertionError("timed out waiting for the kill point")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def checkpoints(model_dir, stage):
    d = os.path.join(model_dir, stage, "checkpoints")
    return sorted(n for n in os.listdir(d) if n.startswith("ckpt-")) if os.path.isdir(d) else []


def mid_epoch(stage, epoch):
    """Ready once a mid-epoch checkpoint inside epoch ``epoch`` (1-based) exists."""
    prefix = f"ckpt-e{epoch - 1:06d}-s"

    def ready(model_dir):
        return any(n.startswith(prefix) and not n.endswith("s000000") for n in checkpoints(model_dir, stage))

    return ready


FLOAT = ["--stages=float", "--float_epochs=3", "--steps_per_epoch=40", "--checkpoint_every_steps=10",
         "--val_examples=200", "--verbose=2"]


def test_sigkill_mid_epoch_then_same_command_finishes(tmp_path):
    model_dir = str(tmp_path / "run")
    rc = kill_when(model_dir, _args(model_dir, FLOAT), mid_epoch("float", 2))
    assert rc == -9
    assert os.path.exists(os.path.join(model_dir, "flags.json"))
    assert not os.path.exists(os.path.join(model_dir, "float", "result.json"))
    with open(os.path.join(model_dir, "float", "history.json")) as f:
        assert [h["epoch"] for h in json.load(f)] == [1]  # epoch 1 done, epoch 2 interrupted

    proc = subprocess.run(_args(model_dir, FLOAT), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "resuming from" in proc.stdout and "step(s) into epoch 2" in proc.stdout
    with open(os.path.join(model_dir, "float", "history.json")) as f:
        history = json.load(f)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[1]["resumed_at_step"] in (10, 20, 30)
    # the final checkpoint loads; the last step checkpoint says 3 epochs
    import keras

    import tfdq  # noqa: F401 (registers the tfdq classes)

    model = keras.models.load_model(os.path.join(model_dir, "float", "final.keras"), compile=False)
    assert model.count_params() > 0
    last = checkpoints(model_dir, "float")[-1]
    with open(os.path.join(model_dir, "float", "checkpoints", last, "state.json")) as f:
        state = json.load(f)
    assert (state["epoch"], state["step"]) == (3, 0)
    assert not [n for n in os.listdir(os.path.join(model_dir, "float", "checkpoints")) if n.startswith(".tmp-")]


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
    extra = ["--float_epochs=1", "--quant_epochs=3", "--steps_per_epoch=30", "--checkpoint_every_steps=10",
             "--val_examples=200", "--stages=float,quant", "--target_weight_kb=12", "--verbose=2"]
    clean = str(tmp_path / "clean")
    proc = subprocess.run(_args(clean, extra), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = str(tmp_path / "killed")
    kill_when(killed, _args(killed, extra), mid_epoch("quant", 2))
    proc = subprocess.run(_args(killed, extra), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
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
