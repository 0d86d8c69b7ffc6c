"""The one LiteRT runner (tfdq.export.runtime) that verify, the script and the benchmarks share."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfdq
from tfdq.export import runtime


@pytest.fixture(scope="module")
def exported():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    out = keras.layers.Dense(3, name="fc")(keras.layers.Dense(8, activation="relu", name="h")(inp))
    x = np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32)
    q = tfdq.quantize_model(keras.Model(inp, out), calibration_data=x)
    return q, tfdq.export.to_tflite(q, calibration_data=x), x


def test_input_quantization_is_tflite_quantize(exported):
    _, tflite, _ = exported
    runner = runtime.LiteRTRunner(tflite)
    scale, zp = runner.in_scale, runner.in_zp
    assert runner.inp["dtype"] == np.int8
    # ties round away from zero (np.round would send 0.5 -> 0 and 2.5 -> 2), then saturate
    k = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999, 1000.0, -1000.0])
    got = runner.quantize_input((k * scale)[None, :6]).astype(np.int64)[0]
    ref = np.clip(np.sign(k) * np.floor(np.abs(k) + 0.5) + zp, -128, 127)[:6]
    np.testing.assert_array_equal(got, ref)


def test_predict_and_accuracy_agree(exported):
    _, tflite, x = exported
    y_file = runtime.predict(tflite, x, batch_size=10)  # several batch sizes (last one short)
    assert y_file.shape == (64, 3)
    runner = runtime.LiteRTRunner(tflite)
    np.testing.assert_array_equal(y_file, runner(x))  # batching changes nothing
    step = runner.output_scale
    np.testing.assert_allclose(y_file / step, np.round(y_file / step), atol=1e-9)  # dequantized int8 logits
    labels = np.argmax(y_file, axis=-1)
    assert runtime.accuracy(tflite, (x, labels)) == 1.0
    ds = tf.data.Dataset.from_tensor_slices((x, labels)).batch(7)
    assert runtime.accuracy(tflite, ds) == 1.0
    with pytest.raises(ValueError, match="labels"):
        runtime.accuracy(tflite, x)


def test_export_and_verify_writes_the_file_the_command_and_the_script_share(exported, tmp_path):
    q, _, x = exported
    y = np.argmax(q.predict(x, verbose=0), axis=-1)
    out = tfdq.export.export_and_verify(
        q, x, (x, y), str(tmp_path / "m.tflite"), aligned_path=str(tmp_path / "m.aligned.keras")
    )
    data = (tmp_path / "m.tflite").read_bytes()
    assert data == out["tflite_bytes"] and data[4:8] == b"TFL3"
    assert (tmp_path / "m.aligned.keras").exists()
    v = out["verification"]
    assert v["all_kernels_exact"] is True
    assert v["sizes"]["float32_tflite_bytes"] > 0  # the float file of the same model, for the size report
    # the runner and verify see the same file: same accuracy against the Keras labels
    assert runtime.accuracy(data, (x, y)) == pytest.approx(v["tflite_accuracy"])
