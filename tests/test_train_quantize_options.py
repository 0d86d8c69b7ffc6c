"""quantize_model's options that the paper's recipes use: quantize_input,
activation_init ("calibrate" / "default") and init ("float" / "random").

Checked against the reference code's numbers (d = 2^-3, q_max = 1.875 for
an unsigned 4-bit activation quantizer; weights d = 2^floor(log2(max|W| /
(2^(b-1) - 1)))) computed here in float64 NumPy.
"""

import math

import keras
import numpy as np
import pytest

import tfdq
from tfdq.models import resnet20, small_cnn


def _act_layers(model):
    return tfdq.layers.activation_quantizer_layers(model)


def _input_fed(qmodel):
    """Activation quantizer layers whose input is the model input."""
    ids = {id(t) for t in qmodel.inputs}
    return [l for l in _act_layers(qmodel) if any(id(t) in ids for t in l._inbound_nodes[0].input_tensors)]


@pytest.fixture(scope="module")
def r20():
    keras.utils.set_random_seed(0)
    return resnet20()


def test_quantize_input_false_leaves_the_image_float_and_keeps_the_19_relu_quantizers(r20):
    x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype("float32")
    on, rep_on = tfdq.quantize_model(r20, calibration_data=x, return_report=True)
    off, rep_off = tfdq.quantize_model(r20, calibration_data=x, quantize_input=False, return_report=True)
    # the paper's counted maps (the residual operands' and pooled maps' own quantizers are not counted)
    counted_on = [a for a in rep_on["activation_quantizers"] if a["counted"]]
    counted_off = [a for a in rep_off["activation_quantizers"] if a["counted"]]
    assert len(counted_on) == 20 and len(_input_fed(on)) == 1
    assert len(counted_off) == 19 and _input_fed(off) == []
    assert all(not a["signed"] for a in counted_off)  # all after ReLUs, as the reference
    # the first convolution sees the float image: its output is conv(x) with the quantized kernel
    first = next(l for l in off.layers if l.name == "stem_conv")
    probe = keras.Model(off.inputs, first.output)
    w = keras.ops.convert_to_numpy(first.kernel_quantizer(first.kernel))
    expected = keras.ops.convert_to_numpy(keras.ops.conv(x, w, padding="same"))
    np.testing.assert_allclose(probe.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-5)


def test_quantize_input_false_reaches_into_a_nested_model():
    inner = small_cnn()
    outer = keras.Sequential([keras.Input((28, 28, 1)), inner])
    q = tfdq.quantize_model(outer, quantize_input=False)
    names = [l.name for l in _act_layers(q)]
    # three ReLU maps and the nested model's output (the logits' output quantizer), no image
    assert names == ["relu1_aq", "relu2_aq", "relu3_aq", "small_cnn_aq"], names
    q_on = tfdq.quantize_model(outer)
    assert len(_act_layers(q_on)) == 5


@pytest.mark.parametrize("act", ["U3", "tqt", "fixed"])
def test_activation_init_default_is_the_reference_start_whatever_the_data(r20, act):
    x = 5.0 * np.random.default_rng(1).normal(size=(8, 32, 32, 3)).astype("float32")
    quantizer = {
        "U3": "U3",
        "tqt": tfdq.quantizers.U2(learn=("q_max",), init_bits=4),
        "fixed": tfdq.quantizers.U2(learn=(), init_bits=4),
    }[act]
    q = tfdq.quantize_model(
        r20,
        activation_quantizer=quantizer,
        calibration_data=x,
        quantize_input=False,
        activation_init="default",
    )
    # the paper's maps (after the ReLUs); the residual operands' own quantizers start at 8 bits
    counted = [layer for layer in _act_layers(q) if layer.counted]
    assert len(counted) == 19
    for layer in counted:
        p = layer.quantizer.describe()
        assert p["d"] == 2.0**-3 and p["q_max"] == pytest.approx(1.875) and p["bits"] == 4, (layer.name, p)
    if act == "fixed":  # the reference's fixed quantizer keeps this range for good
        assert all(not v.trainable for l in _act_layers(q) for v in l.quantizer.weights)


def test_activation_init_calibrate_follows_the_largest_value(r20):
    x = np.random.default_rng(2).normal(size=(8, 32, 32, 3)).astype("float32")
    q, rep = tfdq.quantize_model(
        r20, calibration_data=x, quantize_input=False, activation_init="calibrate", return_report=True
    )
    assert all(a["calibrated"] for a in rep["activation_quantizers"])
    # the first quantizer sits after stem_relu: its range comes from max(relu(bn(conv(x))))
    stem = keras.Model(r20.inputs, r20.get_layer("stem_relu").output).predict(x, verbose=0)
    expected_d = 2.0 ** math.floor(math.log2(float(np.max(stem)) / 15.0))
    layer = next(l for l in _act_layers(q) if l.name.startswith("stem"))
    assert layer.quantizer.describe()["d"] == pytest.approx(expected_d)
    with pytest.raises(ValueError, match="calibration_data"):
        tfdq.quantize_model(r20, activation_init="calibrate")
    with pytest.raises(ValueError, match="activation_init"):
        tfdq.quantize_model(r20, activation_init="max")


def test_init_random_ignores_the_weights_and_float_follows_them():
    keras.utils.set_random_seed(3)
    model = small_cnn()
    for layer in model.layers:
        if hasattr(layer, "kernel"):
            layer.kernel.assign(3.0 * layer.kernel)  # far from the default range
    rand = tfdq.quantize_model(model, init="random")
    flt = tfdq.quantize_model(model)
    for lr, lf in zip(tfdq.layers.weight_quantized_layers(rand), tfdq.layers.weight_quantized_layers(flt)):
        pr, pf = lr.kernel_quantizer.describe(), lf.kernel_quantizer.describe()
        assert pr["d"] == 2.0**-3 and pr["bits"] == 4 and pr["q_max"] == pytest.approx(7 * 2.0**-3)
        max_abs = float(np.max(np.abs(np.asarray(lf.kernel, np.float64))))
        assert pf["d"] == pytest.approx(2.0 ** math.floor(math.log2(max_abs / 7.0)))
        np.testing.assert_array_equal(
            np.asarray(lr.kernel), np.asarray(lf.kernel)
        )  # weights copied either way
    # random init: activations at their defaults too, even with calibration data
    x = np.random.default_rng(4).uniform(size=(8, 28, 28, 1)).astype("float32")
    rand = tfdq.quantize_model(model, init="random", calibration_data=x)
    assert all(l.quantizer.describe()["d"] == 2.0**-3 for l in _act_layers(rand))
    with pytest.raises(ValueError, match="init="):
        tfdq.quantize_model(model, init="kaiming")


def test_unquantized_input_exports_with_a_calibrated_input_scale():
    keras.utils.set_random_seed(5)
    model = small_cnn()
    x = np.random.default_rng(5).uniform(size=(32, 28, 28, 1)).astype("float32")
    q = tfdq.quantize_model(model, calibration_data=x, quantize_input=False)
    tfdq.export.align_biases(q, x)  # BatchNorm re-estimated on x: its folded biases need the int32 grid
    tflite, report = tfdq.export.to_tflite(q, calibration_data=x, return_report=True)
    result = tfdq.export.verify(q, tflite, x, export_report=report)
    assert result["all_kernels_exact"]
    # Keras takes the float image, the file rounds it to its calibrated input scale: on images already
    # on that grid the two compute the same (within the output rounding); on raw noise the rounding is
    # amplified by BatchNorm statistics re-estimated on noise (20 output steps measured)
    (scale,) = [c["scale"] for c in report["calibrated"] if c["tensor"] == "conv1:input"]
    on_grid = (np.clip(np.round(x / scale), 0, 255) * scale).astype("float32")
    result = tfdq.export.verify(q, tflite, on_grid, export_report=report)
    assert result["max_abs_output_diff_in_output_steps"] <= 1.0
