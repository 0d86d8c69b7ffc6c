"""Fault injection on whole training runs (slow): kills at chosen points of
the checkpoint writer, truncated files, two processes on one run folder,
a run folder spelled otherwise or copied. After each fault the same
command finishes the run, nothing is lost and nothing stale is left.

The kills are deterministic: ``TFDQ_FAULT_INJECT=<point>`` makes the run
SIGKILL itself at that point (tfdq/train/checkpoint.py, ``fault_point``).
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOAT = [
    "--stages=float",
    "--float_epochs=2",
    "--steps_per_epoch=10",
    "--checkpoint_every_steps=5",
    "--val_examples=100",
    "--verbose=2",
    "--keep_checkpoints=2",
]

pytestmark = pytest.mark.slow


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    env.update(extra)
    return env


def _cmd(model_dir, extra=FLOAT):
    return [sys.executable, "-m", "tfdq.train", f"--model_dir={model_dir}", *extra]


def _run(model_dir, extra=FLOAT, cwd=ROOT, **env):
    return subprocess.run(
        _cmd(model_dir, extra), cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=600
    )


def _ok(proc):
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def _killed_at(model_dir, point):
    proc = _run(model_dir, TFDQ_FAULT_INJECT=point)
    assert proc.returncode == -9, f"not killed at {point}:\n" + (proc.stdout + proc.stderr)[-3000:]


def _weights(path):
    import keras

    import tfdq  # noqa: F401

    return keras.models.load_model(path, compile=False).get_weights()


def _hidden_leftovers(model_dir):
    found = []
    for folder, dirs, files in os.walk(model_dir):
        found += [os.path.join(folder, n) for n in dirs + files if n.startswith(".tmp-")]
    return found


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("clean") / "run")
    _ok(_run(model_dir))
    return model_dir


@pytest.mark.parametrize(
    "point",
    [
        "before-rename:ckpt-e000001-s000005",  # the new checkpoint complete but not in place
        "saved:ckpt-e000001-s000005",  # in place, the old ones not yet deleted
        "deleting:ckpt-e000000-s000005",  # an old one renamed for deletion, not yet deleted
    ],
)
def test_kill_in_the_checkpoint_writer_then_resume_equals_the_clean_run(clean_run, tmp_path, point):
    model_dir = str(tmp_path / "run")
    _killed_at(model_dir, point)
    proc = _ok(_run(model_dir))
    assert "resuming from" in proc.stdout
    for a, b in zip(
        _weights(os.path.join(clean_run, "float", "final.keras")),
        _weights(os.path.join(model_dir, "float", "final.keras")),
    ):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert _hidden_leftovers(model_dir) == []
    names = os.listdir(os.path.join(model_dir, "float", "checkpoints"))
    assert len([n for n in names if n.startswith("ckpt-")]) == 2


def test_truncated_latest_checkpoint_resumes_from_the_previous_with_a_warning(clean_run, tmp_path):
    model_dir = str(tmp_path / "run")
    _killed_at(model_dir, "saved:ckpt-e000001-s000005")
    latest = os.path.join(model_dir, "float", "checkpoints", "ckpt-e000001-s000005")
    with open(os.path.join(latest, "model.keras"), "r+b") as f:
        f.truncate(1000)
    proc = _ok(_run(model_dir))
    assert f"checkpoint {latest} is damaged" in proc.stdout
    assert "resuming from" in proc.stdout and "ckpt-e000001-s000000" in proc.stdout
    assert os.path.isdir(os.path.join(model_dir, "float", "checkpoints", "damaged-ckpt-e000001-s000005"))
    for a, b in zip(
        _weights(os.path.join(clean_run, "float", "final.keras")),
        _weights(os.path.join(model_dir, "float", "final.keras")),
    ):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_concurrent_starts_on_one_run_folder(tmp_path):
    """Two processes started together on one folder: one trains, the other
    is refused (or, if it got there after the first finished, reports the
    finished run); the run is complete either way."""
    model_dir = str(tmp_path / "run")
    procs = [
        subprocess.Popen(
            _cmd(model_dir), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert 0 in [p.returncode for p in procs], outs
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0 or (p.returncode == 2 and "is in use by process" in err), err[-3000:]
    with open(os.path.join(model_dir, "float", "history.json")) as f:
        assert [h["epoch"] for h in json.load(f)] == [1, 2]
    assert _hidden_leftovers(model_dir) == []


def test_start_while_another_process_holds_the_run_folder(tmp_path):
    from tfdq.train.checkpoint import RunLock

    model_dir = str(tmp_path / "run")
    _killed_at(model_dir, "saved:ckpt-e000000-s000005")
    before = sorted(os.listdir(os.path.join(model_dir, "float", "checkpoints")))
    holder = RunLock(model_dir).acquire()  # this test process is "training" there
    try:
        proc = _run(model_dir)
    finally:
        holder.release()
    assert proc.returncode == 2 and "is in use by process" in proc.stderr, proc.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(model_dir, "float", "checkpoints"))) == before


def test_same_run_folder_spelled_otherwise_and_a_copied_run(clean_run, tmp_path):
    # relative path with a trailing slash, from another working directory: the same run
    rel = os.path.relpath(clean_run, str(tmp_path)) + "/"
    proc = _ok(
        subprocess.run(
            [sys.executable, "-m", "tfdq.train", f"--model_dir={rel}", *FLOAT],
            cwd=str(tmp_path),
            env=_env(PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")),
            capture_output=True,
            text=True,
            timeout=600,
        )
    )
    assert "already finished" in proc.stdout
    # a copied run folder refers to its own files
    copy = str(tmp_path / "copy")
    shutil.copytree(clean_run, copy)
    proc = _ok(_run(copy))
    assert "already finished" in proc.stdout
    with open(os.path.join(copy, "float", "result.json")) as f:
        assert json.load(f)["final"] == os.path.join("float", "final.keras")


def test_multi_worker_run_killed_then_resumed(tmp_path):
    """Both workers of a MultiWorkerMirroredStrategy run killed at the same
    checkpoint; restarted, each resumes from its own checkpoints and they end
    with identical weights and the whole history."""
    from test_train_distributed import _free_ports

    model_dir = str(tmp_path / "mw")
    flags = [
        "--stages=float",
        "--float_epochs=2",
        "--steps_per_epoch=4",
        "--checkpoint_every_steps=2",
        "--val_examples=64",
        "--verbose=2",
        "--strategy=multi_worker",
    ]

    def start(point=None):
        hosts = ",".join(f"127.0.0.1:{p}" for p in _free_ports(2))
        env = _env(**({"TFDQ_FAULT_INJECT": point} if point else {}))
        env.pop("TF_CONFIG", None)
        return [
            subprocess.Popen(
                _cmd(model_dir, [*flags, f"--worker_hosts={hosts}", f"--task_index={i}"]),
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(2)
        ]

    killed = start("saved:ckpt-e000001-s000000")
    outs = [p.communicate(timeout=600)[0] for p in killed]
    assert [p.returncode for p in killed] == [-9, -9], outs[0][-3000:]
    resumed = start()
    outs = [p.communicate(timeout=600)[0] for p in resumed]
    assert [p.returncode for p in resumed] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert all("resuming from" in out for out in outs)
    chief, worker = model_dir, os.path.join(model_dir, "workers", "worker1")
    for a, b in zip(
        _weights(os.path.join(chief, "float", "final.keras")),
        _weights(os.path.join(worker, "float", "final.keras")),
    ):
        np.testing.assert_array_equal(a, b)
    with open(os.path.join(chief, "float", "history.json")) as f:
        assert [h["epoch"] for h in json.load(f)] == [1, 2]
