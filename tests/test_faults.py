"""Faults and bad input: nothing lost, no poisoned model, every failure named with its fix.

Fast checks of each fault class (the kills, truncations and concurrent
starts of whole training runs are in ``test_fault_injection.py``, slow set).
"""

import errno
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfdq
from tfdq import nonfinite, validate
from tfdq.train import checkpoint as ckpt
from tfdq.train import config as cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _float_model(inputs=6, batchnorm=True):
    x_in = keras.Input((inputs,))
    h = keras.layers.Dense(8)(x_in)
    if batchnorm:
        h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    return keras.Model(x_in, keras.layers.Dense(3)(h))


def _compiled(model, lr=1e-2, jit_compile="auto"):
    model.compile(
        keras.optimizers.Adam(lr),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    return model


def _data(n=32):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 6)).astype("float32"), np.arange(n) % 3


# -- non-finite steps ----------------------------------------------------------------


def test_nonfinite_step_changes_no_variable_and_is_counted():
    model = _compiled(tfdq.quantize_model(_float_model(), "U3"))
    x, y = _data()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    weights = [w.numpy().copy() for w in model.weights]  # incl. BatchNorm moving stats
    slots = [v.numpy().copy() for v in model.optimizer.variables]  # incl. the iteration counter
    bad = x[:16].copy()
    bad[3, 2] = np.nan
    history = model.fit(bad, y[:16], batch_size=16, epochs=1, verbose=0)
    assert history.history["nonfinite_steps"] == [1.0]
    for before, w in zip(weights, model.weights):
        np.testing.assert_array_equal(before, w.numpy(), err_msg=w.path)
    for before, v in zip(slots, model.optimizer.variables):
        np.testing.assert_array_equal(before, v.numpy(), err_msg=v.path)
    # a finite step afterwards trains as usual
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert not all(np.array_equal(a, w.numpy()) for a, w in zip(weights, model.weights))
    assert nonfinite.nonfinite_variables(model) == []


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_repeated_nonfinite_steps_stop_training_with_a_clear_error(jit_compile):
    model = _compiled(tfdq.quantize_model(_float_model(), "U3"), jit_compile=jit_compile)
    x, y = _data(16)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    weights = [w.numpy().copy() for w in model.weights]
    x[:, 0] = np.nan
    n = nonfinite.PATIENCE + 2
    with pytest.raises(
        nonfinite.NonFiniteTrainingError, match=f"{nonfinite.PATIENCE} training steps in a row"
    ):
        model.fit(np.tile(x, (n, 1)), np.tile(y, n), batch_size=16, epochs=1, verbose=0, shuffle=False)
    for before, w in zip(weights, model.weights):
        np.testing.assert_array_equal(before, w.numpy())


def test_quantizer_projection_maps_nan_to_the_initial_value():
    q = tfdq.quantizers.U3(init_bits=4)
    q.build()
    d = q.param("d")
    initial = float(d.numpy())
    assert float(d.constraint(tf.constant(float("nan")))) == initial
    lo, hi = q.bounds["d"]
    assert float(d.constraint(tf.constant(float("inf")))) <= hi


def test_nonfinite_lambdas_targets_and_learning_rates_are_refused():
    qmodel = tfdq.quantize_model(_float_model(), "U3")
    with pytest.raises(ValueError, match="lam must be a positive, finite"):
        tfdq.constrain(qmodel, weight_kb=0.1, lam=float("inf"))
    with pytest.raises(ValueError, match="weight_kb must be a positive, finite size.*weight_kb=None"):
        tfdq.constrain(qmodel, weight_kb=float("inf"))
    base = cfg.resolve({"model_dir": "/tmp/x"})
    for key, value in (("lam", float("inf")), ("quant_lr", float("nan")), ("float_lr", -1.0)):
        with pytest.raises(cfg.ConfigError, match=f"--{key}"):
            cfg.validate(dict(base, **{key: value}))


def test_no_checkpoint_or_export_of_a_nonfinite_model(tmp_path):
    qmodel = tfdq.quantize_model(_float_model(), "U3")
    layer = next(l for l in qmodel.layers if l.name.startswith("dense"))
    layer.kernel.assign(np.full(layer.kernel.shape, np.nan, "float32"))
    with pytest.raises(nonfinite.NonFiniteError, match=layer.name):
        ckpt.Checkpointer(str(tmp_path / "c")).save(qmodel, None, {"epoch": 1, "step": 0})
    assert not [n for n in os.listdir(tmp_path / "c") if not n.startswith(".")]
    with pytest.raises(nonfinite.NonFiniteError):
        tfdq.callbacks.atomic_save(qmodel, str(tmp_path / "m.keras"))
    assert not (tmp_path / "m.keras").exists()
    with pytest.raises(tfdq.export.ExportError, match=layer.name):
        tfdq.export.to_tflite(qmodel, _data()[0])


# -- inference graphs without tfdq's compiled kernel -----------------------------------

_LOAD_SAVED_MODEL = """
import sys
import numpy as np
import tensorflow as tf
assert "tfdq" not in sys.modules
loaded = tf.saved_model.load(sys.argv[1])
x = np.load(sys.argv[2])
out = loaded.serve(tf.constant(x))
np.save(sys.argv[3], out.numpy())
assert "tfdq" not in sys.modules
"""


def test_saved_model_of_a_tfdq_model_runs_with_plain_tensorflow(tmp_path):
    qmodel = tfdq.quantize_model(_float_model(), "U3")
    x, y = _data()
    _compiled(qmodel).fit(x, y, batch_size=16, epochs=1, verbose=0)  # training uses the fused kernel
    qmodel.export(str(tmp_path / "saved"), verbose=False)
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _LOAD_SAVED_MODEL,
            str(tmp_path / "saved"),
            str(tmp_path / "x.npy"),
            str(tmp_path / "y.npy"),
        ],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), qmodel(x, training=False).numpy())


# -- run folders and checkpoints --------------------------------------------------------


def test_second_process_on_a_run_folder_is_refused(tmp_path):
    first = ckpt.RunLock(str(tmp_path)).acquire()
    try:
        with pytest.raises(ckpt.RunDirError, match="in use by process .*Nothing was changed"):
            ckpt.RunLock(str(tmp_path)).acquire()
    finally:
        first.release()
    ckpt.RunLock(str(tmp_path)).acquire().release()  # free again


def _checkpoints(tmp_path):
    model = _float_model()
    checkpointer = ckpt.Checkpointer(str(tmp_path / "checkpoints"), keep=2)
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    optimizer.build(model.trainable_variables)
    paths = [checkpointer.save(model, optimizer, {"epoch": e, "step": 0, "history": []}) for e in (1, 2)]
    return checkpointer, paths


@pytest.mark.parametrize("damage", ["truncated model.keras", "broken state.json", "truncated optimizer.npz"])
def test_damaged_latest_checkpoint_resumes_from_the_previous_one(tmp_path, damage):
    checkpointer, (previous, latest) = _checkpoints(tmp_path)
    name = damage.split()[1]
    path = os.path.join(latest, name)
    if name == "state.json":
        with open(path, "w") as f:
            f.write('{"epoch": 2, "st')
    else:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 3)
    warnings = []
    path_found, state, model, store = checkpointer.restore_latest(warn=warnings.append)
    assert path_found == previous and state["epoch"] == 1 and model.count_params() > 0 and store
    assert len(warnings) == 1 and latest in warnings[0] and "damaged" in warnings[0]
    aside = os.path.join(os.path.dirname(latest), "damaged-" + os.path.basename(latest))
    assert os.path.isdir(aside) and checkpointer.all() == [previous]


def test_files_respect_the_umask_and_stale_temporaries_are_removed(tmp_path):
    old = os.umask(0o022)
    try:
        ckpt.atomic_write_text(str(tmp_path / "a.txt"), "x")
        assert os.stat(tmp_path / "a.txt").st_mode & 0o777 == 0o644
        checkpointer, (_, latest) = _checkpoints(tmp_path)
        assert os.stat(latest).st_mode & 0o777 == 0o755
        assert os.stat(os.path.join(latest, "model.keras")).st_mode & 0o777 == 0o644
    finally:
        os.umask(old)
    stage = tmp_path / "quant"
    stage.mkdir()
    (stage / ".tmp-abc.keras").write_bytes(b"")  # a kill inside atomic_save
    (tmp_path / "checkpoints" / ".tmp-deleting-ckpt-e000000-s000000").mkdir()
    half = tmp_path / "checkpoints" / "ckpt-e000000-s000005"  # half deleted by an older tfdq
    half.mkdir()
    ckpt.remove_stale_temporaries(str(tmp_path))
    assert not (stage / ".tmp-abc.keras").exists()
    assert not (tmp_path / "checkpoints" / ".tmp-deleting-ckpt-e000000-s000000").exists()
    checkpointer._clean_tmp()
    assert not half.exists()


def test_run_folder_errors_name_their_fix(tmp_path):
    config = {"model": "small_cnn", "model_dir": str(tmp_path / "run")}
    ckpt.claim_model_dir(str(tmp_path / "run"), config)
    (tmp_path / "run" / "flags.json").write_text('{"model": "small')
    with pytest.raises(ckpt.RunDirError, match="damaged.*new --model_dir"):
        ckpt.claim_model_dir(str(tmp_path / "run"), config)
    # the same folder spelled otherwise (or a copy) is the same run
    (tmp_path / "run" / "flags.json").write_text(json.dumps(config))
    assert ckpt.claim_model_dir(str(tmp_path / "run"), dict(config, model_dir="run/"), ("model_dir",))
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "readonly"
        locked.mkdir()
        os.chmod(locked, 0o500)
        try:
            with pytest.raises(ckpt.RunDirError, match="not writable"):
                ckpt.claim_model_dir(str(locked / "run"), config)
        finally:
            os.chmod(locked, 0o700)
    from tfdq.train import train as train_lib

    bad = tmp_path / "final.keras"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ckpt.RunDirError, match="damaged.*result.json"):
        train_lib.load_model_file(str(bad), str(tmp_path))
    message = train_lib.os_error_message(OSError(errno.ENOSPC, "No space left on device", "/x/ckpt"))
    assert "disk is full" in message and "re-run the same command" in message


def test_result_paths_are_relative_to_the_run_folder(tmp_path):
    from tfdq.train import train as train_lib

    run = tmp_path / "run"
    result = {"final": str(run / "quant" / "final.keras"), "source": "/elsewhere/m.keras", "epochs": 3}
    train_lib.write_result(str(tmp_path / "result.json"), result, str(run))
    stored = json.loads((tmp_path / "result.json").read_text())
    assert (
        stored["final"] == os.path.join("quant", "final.keras") and stored["source"] == "/elsewhere/m.keras"
    )
    copy = tmp_path / "copy"
    read = train_lib.read_result(str(tmp_path / "result.json"), str(copy))
    assert read["final"] == str(copy / "quant" / "final.keras")


# -- bad arguments ------------------------------------------------------------------------


def test_mixed_float16_is_refused_by_quantize_model_and_to_tflite():
    qmodel = tfdq.quantize_model(_float_model(batchnorm=False), "U3")
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        with pytest.raises(ValueError, match="mixed precision.*set_global_policy\\('float32'\\)"):
            tfdq.quantize_model(_float_model(batchnorm=False), "U3")
        with pytest.raises(ValueError, match="mixed precision"):
            tfdq.export.to_tflite(qmodel, _data()[0])
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_unclear_quantize_model_arguments_get_clear_errors():
    model = _float_model()
    with pytest.raises(ValueError, match="holds no examples"):
        tfdq.quantize_model(model, calibration_data=np.zeros((0, 6), "float32"))
    with pytest.raises(ValueError, match="empty dataset"):
        tfdq.quantize_model(
            model, calibration_data=tf.data.Dataset.from_tensor_slices(np.zeros((0, 6), "float32"))
        )
    with pytest.raises(ValueError, match="init_bits=1: use an integer from 2"):
        tfdq.quantize_model(model, init_bits=1)
    for key in ("weight_bits", "activation_bits"):  # refused alike, never silently changed
        with pytest.raises(ValueError, match=f"{key}=\\(0, 4\\)"):
            tfdq.quantize_model(model, **{key: (0, 4)})
    qmodel = tfdq.quantize_model(model)
    with pytest.raises(ValueError, match="already quantized"):
        tfdq.quantize_model(qmodel)


def test_multi_input_calibration_as_list_or_tuple():
    a, b = keras.Input((4,)), keras.Input((3,))
    model = keras.Model([a, b], keras.layers.Dense(2)(keras.layers.Concatenate()([a, b])))
    rng = np.random.default_rng(1)
    xa, xb = rng.normal(size=(20, 4)).astype("float32"), rng.normal(size=(20, 3)).astype("float32")
    for given in ([xa, xb], (xa, xb), ((xa, xb), np.zeros(20))):
        got = validate.calibration_inputs(model, given)
        assert isinstance(got, list) and len(got) == 2 and got[0].shape == (20, 4)
    q_list = tfdq.quantize_model(model, calibration_data=[xa, xb])
    q_tuple = tfdq.quantize_model(model, calibration_data=(xa, xb))
    np.testing.assert_array_equal(
        [w.numpy() for w in q_list.weights][-1], [w.numpy() for w in q_tuple.weights][-1]
    )


def test_export_command_never_writes_over_its_input(tmp_path):
    from tfdq.export import command

    model_path = tmp_path / "m.aligned.keras"
    model_path.write_bytes(b"the user's model")
    with pytest.raises(command.CommandError, match="is the input model.*--noalign_biases"):
        command.run(str(model_path), output=str(tmp_path / "m.tflite"))
    assert model_path.read_bytes() == b"the user's model"
    with pytest.raises(command.CommandError, match="does not exist; create it first"):
        command.run(str(model_path), output=str(tmp_path / "missing" / "x.tflite"))
    out, aligned, report = command.output_paths(str(model_path), str(tmp_path / "x.tflite"), None, True)
    assert aligned == str(tmp_path / "x.aligned.keras") and report == str(tmp_path / "x.json")


def test_export_command_needs_dataset_for_a_non_mnist_model():
    from tfdq.export import command

    with pytest.raises(command.CommandError, match="--dataset is required.*npz:PATH"):
        command.choose_dataset(_float_model(), None)
    x_in = keras.Input((28, 28, 1))
    mnist = keras.Model(x_in, keras.layers.Dense(2)(keras.layers.Flatten()(x_in)))
    lines = []
    assert command.choose_dataset(mnist, None, lines.append) == "mnist_subset"
    assert "mnist_subset" in lines[0]
