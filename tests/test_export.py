"""Integer TFLite export (tfdq.export): the file holds the learned integers.

Every exported kernel is read back with LiteRT and compared, independently of
the exporter's own checks, with the Keras model's quantized weights: the
integers must equal ``round(w / scale)`` of the (BatchNorm-folded) quantized
kernel, lie within the learned bitwidth's range, be stored as int4 where the
learned ``b <= 4`` (int8 otherwise), and the scale must be the learned ``d``
(times ``|gamma / sqrt(var + eps)|`` where a BatchNorm is folded).
"""

import json

import keras
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

import tfdq
import tfdq.export as E
from tfdq.data import mnist_subset

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _randomize_batchnorm(model, rng):
    """Non-trivial BatchNorm statistics, one negative gamma per layer."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            gamma = rng.uniform(0.5, 2.0, c)
            gamma[0] = -gamma[0]
            layer.set_weights([gamma, rng.normal(0, 0.1, c), rng.normal(0, 0.1, c), rng.uniform(0.5, 2.0, c)])


def _set_bits(qmodel, cycle):
    """Give the weight quantizers varied learned bitwidths (docs/method.md section 4 init)."""
    layers = tfdq.layers.weight_quantized_layers(qmodel)
    for i, layer in enumerate(layers):
        layer.kernel_quantizer.initialize_from(layer.kernel.numpy(), bits=cycle[i % len(cycle)])
    return {layer.name: cycle[i % len(cycle)] for i, layer in enumerate(layers)}


def _following_batchnorm(model, layer):
    for other in model.layers:
        if isinstance(other, keras.layers.BatchNormalization):
            src = other.input._keras_history.operation
            if src is layer:
                return other
    return None


def _expected(model, layer):
    """(integers in Keras layout, per-output-channel scale) from the Keras model alone."""
    params = layer.kernel_quantizer.describe()
    step = params["d"] if "d" in params else params["q_min"]
    qk = np.asarray(layer.quantized_weights()[0], np.float64)
    bn = _following_batchnorm(model, layer)
    if isinstance(layer, tfdq.layers.QDepthwiseConv2D):
        h, w, c, m = qk.shape
        qk = qk.reshape(h, w, c * m)
    channels = qk.shape[-1]
    factor = np.ones(channels)
    if bn is not None:
        gamma = np.asarray(bn.gamma, np.float64)
        factor = gamma / np.sqrt(np.asarray(bn.moving_variance, np.float64) + bn.epsilon)
    folded = qk * factor  # the float kernel of the BatchNorm-folded layer
    scale = step * np.abs(factor)
    k = np.sign(folded / scale) * np.floor(np.abs(folded / scale) + 0.5)
    return k.astype(np.int64), scale, params


def _to_tflite_layout(layer, k):
    if isinstance(layer, tfdq.layers.QDepthwiseConv2D):
        return k[None]  # [1, H, W, C*M]
    if isinstance(layer, tfdq.layers.QConv2D):
        return np.transpose(k, (3, 0, 1, 2))
    return np.transpose(k, (1, 0))


def _signed_output(model, layer):
    """True unless a ReLU/ReLU6 (fused or next, after a BatchNorm) clips the layer's output."""
    if getattr(layer.activation, "__name__", "") in ("relu", "relu6"):
        return False
    source = _following_batchnorm(model, layer) or layer
    for other in model.layers:
        inputs = other._inbound_nodes[0].input_tensors if other._inbound_nodes else []
        if any(t._keras_history.operation is source for t in inputs):
            if isinstance(other, keras.layers.ReLU) or (
                isinstance(other, keras.layers.Activation)
                and getattr(other.activation, "__name__", "") in ("relu", "relu6")
            ):
                return False
            if isinstance(other, tfdq.layers.ActivationQuantizer) and not other.signed:
                return False
    return True


def _expected_storage(model, layer, bits, policy):
    """The storage rule of each policy, written out independently of tfdq.export.plan."""
    if policy == "int8" or bits > 4:
        return "int8"
    fc = isinstance(layer, tfdq.layers.QDense) or (
        not isinstance(layer, tfdq.layers.QDepthwiseConv2D)
        and tuple(layer.kernel_size) == (1, 1)
        and tuple(layer.strides) == (1, 1)
    )
    cin = int(layer.kernel.shape[-2])
    rows = int(np.prod(layer.output.shape[1:-1]))  # output positions per example (1 for a Dense)
    if policy == "fast" and rows > 36:
        return "int8"  # XNNPACK's int4 FULLY_CONNECTED is slower than int8 over many rows
    if fc and bits <= 2 and cin % 4 == 0 and (policy == "smallest" or rows == 1):
        return "int2"  # XNNPACK's int2 FULLY_CONNECTED ("fast": one row only)
    if fc and cin % 2 == 0:
        return "int4"  # XNNPACK's int4 FULLY_CONNECTED
    if policy == "fast":
        return "int8"  # XNNPACK runs no sub-byte convolution
    # builtin int4 kernels round twice: int8 where the output stays signed
    return "int8" if _signed_output(model, layer) else "int4"


def _check_kernels(model, tflite, report, expected_bits, policy="fast"):
    """Read every kernel with LiteRT and compare with the Keras model."""
    interpreter = Interpreter(model_content=tflite)
    interpreter.allocate_tensors()
    tensors = {t["name"]: t for t in E.inspect_tflite(tflite)["tensors"]}
    details = {d["name"]: d for d in interpreter.get_tensor_details()}
    by_name = {entry["layer"]: entry for entry in report["layers"]}
    checked = 0
    for layer in tfdq.layers.weight_quantized_layers(model):
        entry = by_name[layer.name]
        assert entry["found"], layer.name
        d = details[entry["tensor"]]
        values = np.asarray(interpreter.get_tensor(d["index"])).astype(np.int64)
        k, scale, params = _expected(model, layer)
        bits = int(round(params["bits"]))
        assert bits == expected_bits[layer.name]
        n = 2 ** (bits - 1) - 1
        # integers: within the learned range and exactly round(w / scale)
        assert np.max(np.abs(values)) <= n, (layer.name, bits, values.min(), values.max())
        layout = _to_tflite_layout(layer, k)
        # a Dense with folded BatchNorm may run as a 1x1 conv [C_out, 1, 1, C_in], a 1x1 conv as a
        # FULLY_CONNECTED [C_out, C_in]: the same integers in the same order
        np.testing.assert_array_equal(values.reshape(-1), layout.reshape(-1), err_msg=layer.name)
        # scales: the learned d, times |s_c| where BatchNorm is folded
        file_scales = np.asarray(d["quantization_parameters"]["scales"], np.float64)
        if file_scales.size == 1:
            file_scales = np.full(scale.size, file_scales[0])
        np.testing.assert_allclose(file_scales, scale, rtol=1e-6, err_msg=layer.name)
        # storage: the policy's rule (int4 CONV_2D only under "smallest", and not for a convolution whose
        # output stays signed: LiteRT's builtin int4 path rounds twice)
        storage = tensors[entry["tensor"]]["type"]
        assert storage == _expected_storage(model, layer, bits, policy), (layer.name, bits, storage, policy)
        assert entry["storage"] == storage and entry["ok"]
        checked += 1
    assert checked == len(expected_bits)
    assert report["float_ops"] == []


# ---------------------------------------------------------------------------
# kernels hold the learned integers: small CNN, ResNet-20, MobileNetV2
# ---------------------------------------------------------------------------


def test_small_cnn_with_batchnorm_exports_learned_integers_and_folded_scales():
    rng = np.random.default_rng(0)
    model = tfdq.models.small_cnn()
    _randomize_batchnorm(model, rng)
    x = rng.uniform(0, 1, (64, 28, 28, 1)).astype("float32")
    qmodel = tfdq.quantize_model(model, calibration_data=x, quantize_output=True)
    bits = _set_bits(qmodel, [3, 6, 4, 8])
    tflite, export_report = E.to_tflite(qmodel, x, storage="smallest", return_report=True)
    report = E.verify(qmodel, tflite, x[:32], export_report=export_report)
    _check_kernels(qmodel, tflite, report, bits, policy="smallest")
    assert report["all_kernels_exact"]
    # the 3-bit layer holds integers in [-3, 3], not re-spread over [-127, 127]
    conv1 = next(e for e in report["layers"] if e["layer"] == "conv1")
    assert conv1["file_range"] == [-3, 3] and conv1["storage"] == "int4"
    # activations: the learned step is the scale; the clamp at q_max is int8 saturation
    # (the input image: zero point -128, saturation clamps at 0 and a QUANTIZE to zero point
    # 127 - n at q_max, since no producer can fuse a ReLU; the ReLU maps: zero point 127 - n)
    for a in export_report["activations"]:
        assert a["scale"] == a["d"], a
        if not a["signed"]:  # (the signed one is the logits' output quantizer)
            want = -128 if a["layer"] == "image_aq" else 127 - a["levels_max"]
            assert a["zero_point"] == want, a
    assert [a["layer"] for a in export_report["activations"] if a["signed"]] == ["logits_aq"]
    # BatchNorm folded (no MUL/ADD left), nothing in float
    ops = [o["op"] for o in E.inspect_tflite(tflite)["ops"]]
    assert ops.count("CONV_2D") == 3 and "MUL" not in ops and "ADD" not in ops and "RELU" not in ops
    # every tensor on a learned grid, the logits too (quantize_model's output quantizer)
    assert export_report["calibrated"] == []
    # (untrained weights: many near-ties; the trained-model tests measure fidelity)
    assert report["top1_agreement"] >= 0.5


def _conv_bn_relu_model(rng, bits, pow2_output_ratio=False):
    """input -> AQ -> QConv2D (b bits) -> BN -> ReLU -> AQ, the quantized map as output."""
    inputs = keras.Input((12, 12, 3))
    y = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv")(inputs)
    y = keras.layers.BatchNormalization(name="bn")(y)
    y = keras.layers.ReLU(name="relu")(y)
    # a linear tail so that the activation quantizer is placed after the ReLU
    outputs = keras.layers.Conv2D(4, 1, name="head")(y)
    model = keras.Model(inputs, outputs)
    _randomize_batchnorm(model, rng)
    x = rng.uniform(0, 1, (256, 12, 12, 3)).astype("float32")
    qmodel = tfdq.quantize_model(model, calibration_data=x)
    _set_bits(qmodel, [bits, 8])
    relu_aq = next(
        l for l in qmodel.layers if isinstance(l, tfdq.layers.ActivationQuantizer) and "relu" in l.name
    )
    probe = keras.Model(qmodel.input, relu_aq.output)
    return qmodel, probe, x


def _relu_map_in_file(tflite, x, step):
    """The int8 feature map after the ReLU in the file, as real values (LiteRT, all tensors kept)."""
    interpreter = Interpreter(model_content=tflite, experimental_preserve_all_tensors=True)
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], list(x.shape))
    interpreter.allocate_tensors()
    s, zp = inp["quantization"]
    xi = np.clip(np.sign(x / s) * np.floor(np.abs(x / s) + 0.5) + zp, -128, 127).astype(np.int8)
    interpreter.set_tensor(inp["index"], xi)
    interpreter.invoke()
    for d in interpreter.get_tensor_details():
        shape = tuple(d["shape"])
        if d["dtype"] == np.int8 and shape == (len(x), 12, 12, 8) and d["quantization"][0] == step:
            v = interpreter.get_tensor(d["index"]).astype(np.float64)
            return (v - d["quantization"][1]) * step
    raise AssertionError("feature map not found in the file")


@pytest.mark.parametrize("bits,int4", [(4, True), (4, False), (6, True)])
def test_aligned_biases_make_the_integer_feature_map_equal_keras(bits, int4):
    """After align_biases every element of the ReLU map is the Keras value exactly.

    Covers both requantizations: XNNPACK's single rounding (int8 kernels)
    and LiteRT's two-rounding int4 CONV_2D (its thresholds sit w_c units
    lower, which the aligned bias absorbs). Before alignment the rounded
    int32 bias moves some elements by one step.
    """
    rng = np.random.default_rng(bits)
    qmodel, probe, x = _conv_bn_relu_model(rng, bits)
    step = qmodel.get_layer("relu_aq").quantizer.describe()["d"]
    before = E.to_tflite(qmodel, x, int4_kernels=int4)
    keras_map = np.asarray(probe(x), np.float64)
    off_before = np.mean(np.abs(_relu_map_in_file(before, x, step) - keras_map) > step / 2)
    changes = E.align_biases(qmodel, x, int4_kernels=int4)
    assert [c["layer"] for c in changes] == ["conv"]
    assert changes[0]["max_beta_change"] > 0
    tflite, report = E.to_tflite(qmodel, x, int4_kernels=int4, return_report=True)
    conv_bias = next(b for b in report["biases"] if b["layer"] == "conv")
    assert conv_bias["exact"] and conv_bias["max_abs_residual"] < 1e-3
    if int4 and bits <= 4:
        assert conv_bias["requantization_shift"][0] >= 0.5  # two roundings: w_c in [1/2, 1]
    else:
        assert conv_bias["requantization_shift"] == [0.0, 0.0]
    keras_map = np.asarray(probe(x), np.float64)
    file_map = _relu_map_in_file(tflite, x, step)
    np.testing.assert_array_equal(file_map, keras_map)
    assert off_before > 0  # what the alignment removed


def test_align_biases_skips_a_batchnorm_without_beta_and_reports_it():
    rng = np.random.default_rng(3)
    inputs = keras.Input((8, 8, 2))
    y = keras.layers.Conv2D(4, 3, use_bias=False, name="conv")(inputs)
    y = keras.layers.BatchNormalization(center=False, name="bn")(y)
    y = keras.layers.ReLU()(y)
    outputs = keras.layers.Dense(3, name="head")(keras.layers.Flatten()(y))
    x = rng.uniform(0, 1, (32, 8, 8, 2)).astype("float32")
    qmodel = tfdq.quantize_model(keras.Model(inputs, outputs), calibration_data=x)
    # "smallest": the int4 convolution rounds twice, a shift that only a beta could absorb
    changes = E.align_biases(qmodel, x, storage="smallest")
    assert changes == [
        {
            "layer": "conv",
            "batchnorm": "bn",
            "aligned": False,
            "reason": "BatchNormalization(center=False) has no beta",
            "max_beta_change": 0.0,
            "max_change_output_steps": 0.0,
        }
    ]
    _, report = E.to_tflite(qmodel, x, storage="smallest", return_report=True)  # still exports
    assert [b["exact"] for b in report["biases"] if b["layer"] == "conv"] == [False]


def _float_input_conv_bn(rng, moving_mean):
    """A float (unquantized) image -> Conv2D -> BatchNorm(moving_mean) -> ReLU -> Dense model."""
    inputs = keras.Input((8, 8, 2))
    y = keras.layers.Conv2D(4, 3, use_bias=False, name="conv")(inputs)
    y = keras.layers.BatchNormalization(name="bn")(y)
    y = keras.layers.ReLU()(y)
    outputs = keras.layers.Dense(3, name="head")(keras.layers.Flatten()(y))
    x = rng.uniform(-1, 1, (32, 8, 8, 2)).astype("float32")
    qmodel = tfdq.quantize_model(keras.Model(inputs, outputs), quantize_input=False, calibration_data=x)
    qmodel.get_layer("bn").moving_mean.assign(np.asarray(moving_mean, np.float32))
    return qmodel, x


def test_unquantized_input_exports_exact_kernels_and_biases():
    # quantize_input=False (the MobileNetV2 recipe): the image gets a calibrated 8-bit scale at export
    qmodel, x = _float_input_conv_bn(np.random.default_rng(4), [0.3, -0.2, 0.1, 0.0])
    assert not any("input" in l.name for l in tfdq.layers.activation_quantizer_layers(qmodel))
    bits = _set_bits(qmodel, [4, 8])
    E.align_biases(qmodel, x)
    tflite, export_report = E.to_tflite(qmodel, x, return_report=True)
    report = E.verify(qmodel, tflite, x, export_report=export_report)
    _check_kernels(qmodel, tflite, report, bits)
    assert report["all_kernels_exact"]
    assert [b["exact"] for b in export_report["biases"]] == [True, True]
    assert [b["file_difference"] for b in export_report["biases"]] == [0, 0]


def test_int32_bias_beyond_float32_precision_exports_within_its_rounding():
    # An untrained moving mean far from the data makes the conv's int32 bias ~1e7 accumulator units: the
    # converter's float32 arithmetic moves it by a unit, which the export reports instead of failing.
    qmodel, x = _float_input_conv_bn(np.random.default_rng(4), [1e4, -3e3, 7.77e3, 1.0])
    E.align_biases(qmodel, x)
    _, export_report = E.to_tflite(qmodel, x, return_report=True)
    conv = next(b for b in export_report["biases"] if b["layer"] == "conv")
    assert conv["max_abs_integer"] > E.check.BIAS_EXACT_BELOW
    tolerance = int(E.check.bias_float32_tolerance(conv["max_abs_integer"]))
    assert 0 <= conv["file_difference"] <= tolerance
    assert conv["exact"] == (conv["file_difference"] == 0 and conv["max_abs_residual"] < 1e-3)
    # beyond int32 the export refuses, naming the layer and the BatchNorm statistics
    qmodel.get_layer("bn").moving_mean.assign(np.asarray([1e9, 0, 0, 0], np.float32))
    with pytest.raises(E.ExportError, match=r"conv.*beyond int32.*BatchNorm statistics"):
        E.to_tflite(qmodel, x)


def test_int8_kernel_option_stores_the_same_integers_as_int8():
    rng = np.random.default_rng(1)
    model = tfdq.models.small_cnn()
    _randomize_batchnorm(model, rng)
    x = rng.uniform(0, 1, (32, 28, 28, 1)).astype("float32")
    qmodel = tfdq.quantize_model(model, calibration_data=x)
    _set_bits(qmodel, [2, 3, 4, 4])
    mixed = E.to_tflite(qmodel, x, storage="smallest")
    int8 = E.to_tflite(qmodel, x, storage="int8")
    r4 = E.verify(qmodel, mixed, x[:8], int4_kernels=True)
    r8 = E.verify(qmodel, int8, x[:8], int4_kernels=False)
    assert {e["storage"] for e in r4["layers"]} == {"int4"}
    assert {e["storage"] for e in r8["layers"]} == {"int8"}
    assert r4["all_kernels_exact"] and r8["all_kernels_exact"]
    assert [e["file_range"] for e in r4["layers"]] == [e["file_range"] for e in r8["layers"]]
    # int4 packing: half a byte per weight
    assert r4["sizes"]["kernel_bytes_in_file"] * 2 == r8["sizes"]["kernel_bytes_in_file"]
    assert len(int8) - len(mixed) >= 0.45 * r8["sizes"]["kernel_count"]


def test_resnet20_with_identity_shortcuts_and_add():
    rng = np.random.default_rng(2)
    model = tfdq.models.resnet20()
    _randomize_batchnorm(model, rng)
    x = rng.uniform(0, 1, (32, 32, 32, 3)).astype("float32")
    qmodel = tfdq.quantize_model(model, calibration_data=x)
    bits = _set_bits(qmodel, [2, 3, 4, 5, 6, 8])
    tflite, export_report = E.to_tflite(qmodel, x, return_report=True)
    report = E.verify(qmodel, tflite, x[:16], export_report=export_report)
    _check_kernels(qmodel, tflite, report, bits)
    ops = [o["op"] for o in E.inspect_tflite(tflite)["ops"]]
    assert ops.count("CONV_2D") == 19 and ops.count("ADD") == 9
    # the second conv of each block enters its Add through a learned signed
    # quantizer, the global average through a learned unsigned one: only the
    # logits are calibrated
    assert export_report["calibrated"] == []  # the logits too: the output quantizer
    assert report["top1_agreement"] >= 0.5


def test_mobilenetv2_small_input():
    rng = np.random.default_rng(3)
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10)
    _randomize_batchnorm(model, rng)
    x = rng.uniform(-1, 1, (16, 32, 32, 3)).astype("float32")
    qmodel = tfdq.quantize_model(model, calibration_data=x)
    bits = _set_bits(qmodel, [3, 4, 5, 8, 2, 6])
    # quantize_model re-estimates BatchNorm on the 16 noise images: near-zero variances (std 44x
    # below the randomized ones) give channel scales gamma / sqrt(var + eps) whose accumulator unit
    # is more than one output step, so rounding the folded biases to the int32 grid alone moved the
    # file's output by ~120 output steps (12.5% agreement). align_biases (the README's path) puts
    # them on the grid; the signed sums round ties as XNNPACK's ADD does: every map is exact.
    changes = E.align_biases(qmodel, x)
    assert max(c["max_change_output_steps"] or 0.0 for c in changes) > 1.0  # the large-unit case
    tflite, export_report = E.to_tflite(qmodel, x, return_report=True)
    report = E.verify(qmodel, tflite, x[:8], export_report=export_report)
    assert report["top1_agreement"] == 1.0
    assert not any("biases" in note or "ties" in note for note in report["notes"]), report["notes"]
    _check_kernels(qmodel, tflite, report, bits)
    ops = [o["op"] for o in E.inspect_tflite(tflite)["ops"]]
    # 17 depthwise convolutions and the global average (a constant-kernel depthwise conv)
    assert ops.count("DEPTHWISE_CONV_2D") == 18 and ops.count("ADD") == 10
    storages = {e["storage"] for e in report["layers"]}
    assert storages == {"int2", "int4", "int8"}  # "fast": int2 for the 2-bit Dense, int4 for 2-bit 1x1 convs
    # signed activation quantizers (linear bottlenecks) get their clamp at q_max: an int8 QUANTIZE to
    # zero point 127 - n (saturation), which XNNPACK runs, not a MINIMUM, which it does not
    signed = [a for a in export_report["activations"] if a["signed"]]
    clamps = [c for c in export_report["clamps"] if c["form"] != "kept"]
    assert signed and "MINIMUM" not in ops and len(clamps) == len(export_report["clamps"]) == len(signed)
    assert sorted(c["clamp"] for c in clamps) == sorted(a["levels_max"] for a in signed)
    outside = [o for o, ok in zip(ops, E.runtime.xnnpack_delegated(tflite)) if not ok]  # asked of LiteRT
    assert "QUANTIZE" not in outside and "MINIMUM" not in outside, outside
    # softmax output: TFLite's fixed int8 scale 1/256, reported as fixed
    assert export_report["fixed"][0]["scale"] == 1 / 256
    # the learned maps are exact; LiteRT's int8 SOFTMAX of the calibrated logits differs from the
    # float one by about one of its 1/256 steps (measured 0.0051)
    assert report["max_abs_output_diff"] < 0.01


def test_mixed_graph_float_io_pow2_weights_dense_batchnorm():
    """Concatenate, average pooling, depthwise multiplier 2, Dense + BatchNorm,
    power-of-two weights on an int8 grid of step q_min, float input/output."""
    rng = np.random.default_rng(4)
    inp = keras.Input((12, 12, 3))
    a = keras.layers.Conv2D(8, 3, padding="same")(inp)
    a = keras.layers.BatchNormalization()(a)
    a = keras.layers.Activation("relu6")(a)
    b = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False)(a)
    b = keras.layers.BatchNormalization()(b)
    b = keras.layers.ReLU()(b)
    b = keras.layers.ZeroPadding2D(1)(b)
    c = keras.layers.Conv2D(16, 1, activation="relu")(a)
    x = keras.layers.Concatenate()([b, c])
    x = keras.layers.AveragePooling2D(2)(x)
    x = keras.layers.Dropout(0.2)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(12, use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    out = keras.layers.Dense(5)(x)
    model = keras.Model(inp, out)
    _randomize_batchnorm(model, rng)
    data = rng.uniform(-1, 1, (64, 12, 12, 3)).astype("float32")
    qmodel = tfdq.quantize_model(model, weight_quantizer="P3", calibration_data=data, init_bits=2)
    layers = tfdq.layers.weight_quantized_layers(qmodel)
    layers[1].kernel_quantizer.initialize_from(layers[1].kernel.numpy(), bits=3)  # q_max/q_min = 8
    tflite, export_report = E.to_tflite(
        qmodel, data, input_type="float32", output_type="float32", return_report=True
    )
    report = E.verify(qmodel, tflite, data, export_report=export_report)
    assert report["all_kernels_exact"] and report["float_ops"] == []
    # float output: the difference is still measured in steps of the int8 output
    assert report["max_abs_output_diff_in_output_steps"] is not None
    for entry, layer in zip(report["layers"], layers):
        p = layer.kernel_quantizer.describe()
        ratio = int(round(p["q_max"] / p["q_min"]))
        assert entry["allowed"] == [-ratio, ratio]
        levels_bits = 2 if ratio <= 1 else (4 if ratio <= 7 else 8)  # the narrowest type holding +-ratio
        assert entry["storage"] == _expected_storage(qmodel, layer, levels_bits, "fast")
        # the levels are +-q_min 2^j: powers of two in the file
        values = np.abs(np.array(entry["file_range"]))
        assert all(v == 0 or (v & (v - 1)) == 0 for v in values)
    assert report["top1_agreement"] >= 0.5
    ops = [o["op"] for o in E.inspect_tflite(tflite)["ops"]]
    assert {"CONCATENATION", "DEPTHWISE_CONV_2D"} <= set(ops)
    # the averages before a learned quantizer (the global one and the VALID 2x2 pooling, whose output
    # scale differs from its input's) are constant-kernel depthwise convs
    assert "MEAN" not in ops and "AVERAGE_POOL_2D" not in ops and ops.count("DEPTHWISE_CONV_2D") == 3


def test_without_activation_quantizers_every_scale_is_calibrated_and_reported():
    rng = np.random.default_rng(5)
    model = tfdq.models.small_cnn()
    x = rng.uniform(0, 1, (32, 28, 28, 1)).astype("float32")
    qmodel = tfdq.quantize_model(model, quantize_activations=False)
    tflite, export_report = E.to_tflite(qmodel, x, return_report=True)
    calibrated = [c["tensor"] for c in export_report["calibrated"]]
    # every tensor whose producer is not followed by a learned quantizer
    assert calibrated == ["conv1:input", "pool1:input", "pool2:input", "flatten:input", "output_0"]
    assert all(c["calibration_samples"] == 32 for c in export_report["calibrated"])
    assert E.verify(qmodel, tflite, x[:8])["all_kernels_exact"]


# ---------------------------------------------------------------------------
# bad input: clear errors
# ---------------------------------------------------------------------------


def test_model_without_quantizers_is_refused():
    with pytest.raises(E.ExportError, match="no tfdq quantizers.*quantize_model"):
        E.to_tflite(tfdq.models.small_cnn(), np.zeros((4, 28, 28, 1), "float32"))


def test_bitwidth_above_8_is_refused_naming_the_layers():
    qmodel = tfdq.quantize_model(tfdq.models.small_cnn(), weight_bits=(2, 12))
    for name, bits in (("conv2", 10), ("logits", 12)):
        layer = qmodel.get_layer(name)
        layer.kernel_quantizer.initialize_from(layer.kernel.numpy(), bits=bits)
    with pytest.raises(E.ExportError, match=r"above 8.*conv2 \(10 bits\).*logits \(12 bits\)"):
        E.to_tflite(qmodel, np.zeros((4, 28, 28, 1), "float32"))


def test_pow2_grid_wider_than_int8_is_refused():
    qmodel = tfdq.quantize_model(tfdq.models.small_cnn(), weight_quantizer="P3", init_bits=2)
    layer = qmodel.get_layer("conv3")
    layer.kernel_quantizer.initialize_from(layer.kernel.numpy(), bits=4)  # q_max/q_min = 2^7
    with pytest.raises(E.ExportError, match=r"power-of-two weight grids.*conv3.*2\^7"):
        E.to_tflite(qmodel, np.zeros((4, 28, 28, 1), "float32"))


def test_pow2_activation_quantizers_are_refused():
    qmodel = tfdq.quantize_model(tfdq.models.small_cnn(), activation_quantizer="P3")
    with pytest.raises(E.ExportError, match="Power-of-two activation quantizers.*relu1_aq"):
        E.to_tflite(qmodel, np.zeros((4, 28, 28, 1), "float32"))


def test_unsupported_layers_between_quantized_layers_are_named():
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="c1")(inp)
    x = keras.layers.GroupNormalization(groups=2, name="ln")(x)
    x = keras.layers.Activation("tanh", name="squash")(x)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(3, name="head")(x)
    with pytest.warns(UserWarning, match="stay float"):
        qmodel = tfdq.quantize_model(keras.Model(inp, out))
    with pytest.raises(E.ExportError) as err:
        E.to_tflite(qmodel, np.zeros((4, 8, 8, 3), "float32"))
    assert "Unsupported layers between quantized layers" in str(err.value)
    assert "ln (GroupNormalization)" in str(err.value) and "squash (Activation)" in str(err.value)


def test_float_layer_is_named_and_a_batchnorm_after_relu_exports_on_its_own():
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="c1")(inp)
    x = keras.layers.BatchNormalization(name="bn_after_relu")(x)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(3, name="head")(x)
    qmodel = tfdq.quantize_model(keras.Model(inp, out))
    float_head = keras.layers.Dense(2, name="float_head")(qmodel.output)
    mixed = keras.Model(qmodel.input, float_head)
    with pytest.raises(E.ExportError) as err:
        E.to_tflite(mixed, np.zeros((4, 8, 8, 3), "float32"))
    # a BatchNorm that cannot fold is a per-channel multiply-add of its own (1x1 DEPTHWISE_CONV_2D)
    assert "bn_after_relu" not in str(err.value)
    assert "float_head (Dense)" in str(err.value)


def test_missing_calibration_data_names_the_tensors():
    qmodel = tfdq.quantize_model(tfdq.models.small_cnn(), quantize_output=False)
    with pytest.raises(E.ExportError, match="output_0.*calibration_data"):
        E.to_tflite(qmodel)
    # with the default output quantizer every tensor is on a learned grid: no data needed
    tflite, report = E.to_tflite(
        tfdq.quantize_model(tfdq.models.small_cnn(), quantize_output=True), return_report=True
    )
    assert report["calibrated"] == [] and E.inspect_tflite(tflite)["ops"]


# ---------------------------------------------------------------------------
# real data: a trained MNIST CNN with learned mixed precision (U3 W+A)
# ---------------------------------------------------------------------------


def _train_mnist(float_epochs, quant_epochs, weight_kb=15.0, seed=0):
    keras.utils.set_random_seed(seed)
    (x, y), (xt, yt) = mnist_subset()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = tfdq.models.small_cnn()
    model.compile(keras.optimizers.Adam(1e-3), loss)
    model.fit(x, y, batch_size=64, epochs=float_epochs, verbose=0)
    qmodel = tfdq.quantize_model(model, calibration_data=x[:512])  # U3 weights and activations
    qmodel = tfdq.constrain(qmodel, weight_kb=weight_kb)  # learned mixed precision under (8a)
    qmodel.compile(keras.optimizers.Adam(5e-4), loss)
    qmodel.fit(x, y, batch_size=64, epochs=quant_epochs, verbose=0)
    return model, qmodel, (x, y), (xt, yt)


@pytest.fixture(scope="module")
def trained_mnist():
    return _train_mnist(float_epochs=4, quant_epochs=1)


def _fidelity(model, qmodel, train, test):
    """Align, export and verify with int4 and with int8 kernels (aligned for each)."""
    import tensorflow as tf  # noqa: PLC0415

    float_size = len(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    out = {}
    for int4 in (True, False):
        E.align_biases(qmodel, train[0][:1000], int4_kernels=int4)
        tflite, export_report = E.to_tflite(qmodel, train[0][:1000], int4_kernels=int4, return_report=True)
        assert all(b["exact"] for b in export_report["biases"]), export_report["biases"]
        out[int4] = (tflite, E.verify(qmodel, tflite, test, export_report=export_report))
    return float_size, out


def _check_exact(r):
    """Every hidden tensor equal: the logits differ by their own rounding only,
    and a prediction differs only where the file's top output is tied."""
    assert r["max_abs_output_diff_in_output_steps"] <= 0.5 + 1e-6, r
    assert r["disagreements"] <= r["tied_top_outputs"], r


def _check_file_sizes(report, tflite, float_size):
    sizes = report["sizes"]
    assert len(tflite) <= 0.30 * float_size, (len(tflite), float_size)
    assert (
        abs(sizes["kernel_bytes_in_file"] - sizes["mixed_int4_int8_bytes"])
        <= 0.10 * sizes["mixed_int4_int8_bytes"]
    )
    four_bit = [e for e in report["layers"] if e["bits"] == 4]
    assert four_bit, "no 4-bit layer learned"
    for e in four_bit:  # the case tfmot gets wrong: 4-bit weights stay in [-7, 7]
        assert -7 <= e["file_range"][0] and e["file_range"][1] <= 7 and e["storage"] == "int4"


def _accuracy(model, data):
    x, y = data
    return float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y))


def test_trained_mnist_cnn_fidelity_short(trained_mnist):
    model, qmodel, train, test = trained_mnist
    # learned quantization keeps the float accuracy (the demo's claim, tests/test_demo.py, slow set):
    # U3 weights and activations under a 15 kB budget within one point on the 1,000 held-out digits
    # (measured 96.7% against 96.4% float)
    float_acc, quant_acc = _accuracy(model, test), _accuracy(qmodel, test)
    assert float_acc > 0.85 and quant_acc >= float_acc - 0.01, (quant_acc, float_acc)
    float_size, out = _fidelity(model, qmodel, train, test)
    tflite4, r4 = out[True]
    tflite8, r8 = out[False]
    assert r4["samples"] == 1000 and r4["all_kernels_exact"] and r8["all_kernels_exact"]
    _check_file_sizes(r4, tflite4, float_size)
    for r in (r4, r8):
        _check_exact(r)
        # short training leaves more near-ties among the logits than the slow test's model
        assert r["top1_agreement"] >= 0.995, r
        assert abs(r["tflite_accuracy"] - r["keras_accuracy"]) <= 0.003, r


@pytest.mark.slow
def test_trained_mnist_cnn_fidelity_full_recipe():
    model, qmodel, train, test = _train_mnist(float_epochs=10, quant_epochs=3)
    float_size, out = _fidelity(model, qmodel, train, test)
    tflite4, r4 = out[True]
    tflite8, r8 = out[False]
    _check_file_sizes(r4, tflite4, float_size)
    for r in (r4, r8):  # the mixed int4/int8 file and the all-int8 one
        _check_exact(r)
        assert r["top1_agreement"] >= 0.998, r
        assert abs(r["tflite_accuracy"] - r["keras_accuracy"]) <= 0.002, r


# ---------------------------------------------------------------------------
# the export command
# ---------------------------------------------------------------------------


def test_export_command_writes_tflite_and_json_report(trained_mnist, tmp_path):
    from tfdq.export import command  # noqa: PLC0415

    _, qmodel, _, _ = trained_mnist
    path = tmp_path / "mnist.keras"
    qmodel.save(path)
    lines = []
    report = command.run(str(path), max_eval_samples=200, calibration_samples=500, print_fn=lines.append)
    out = tmp_path / "mnist.tflite"
    assert out.exists() and (tmp_path / "mnist.json").exists()
    saved = json.loads((tmp_path / "mnist.json").read_text())
    assert saved["verification"]["samples"] == 200
    assert saved["verification"]["all_kernels_exact"]
    text = "\n".join(lines)
    for needle in ("top-1 agreement", "file size", "int8 weight bytes", "learned packed size", "int4"):
        assert needle in text
    assert report["verification"]["sizes"]["file_bytes"] == out.stat().st_size


def test_export_command_missing_and_corrupt_model(tmp_path):
    from tfdq.export import command  # noqa: PLC0415

    with pytest.raises(command.CommandError, match="not found"):
        command.run(str(tmp_path / "nope.keras"))
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"this is not a keras zip file")
    with pytest.raises(command.CommandError, match="cannot load"):
        command.run(str(bad))
    # main(): an error line and exit status 2, no traceback
    from absl import flags  # noqa: PLC0415

    flags.FLAGS(["tflite", f"--model={tmp_path / 'nope.keras'}"])
    with pytest.raises(SystemExit) as exit_info:
        command.main(["tflite"])
    assert exit_info.value.code == 2


def test_verify_keras_outputs_in_chunks_equal_one_call():
    # verify runs the Keras model eagerly a chunk at a time (an eager call keeps every
    # intermediate map of its batch): bit-equal to one call on the whole batch
    from tfdq.export.verify import keras_outputs  # noqa: PLC0415

    inp = keras.Input((6, 6, 1))
    h = keras.layers.Conv2D(4, 3, activation="relu")(inp)
    h = keras.layers.BatchNormalization()(h)
    out = keras.layers.Dense(3)(keras.layers.Flatten()(h))
    x = np.random.default_rng(2).uniform(0, 1, size=(11, 6, 6, 1)).astype(np.float32)
    q = tfdq.quantize_model(keras.Model(inp, out), calibration_data=x)
    whole = np.asarray(q(x, training=False), np.float64)
    chunked = keras_outputs(q, x, chunk=4)
    assert chunked.shape == (11, 3) and chunked.dtype == np.float64
    np.testing.assert_array_equal(chunked, whole)
