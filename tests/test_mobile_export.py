"""Any Keras model end to end: quantize_model, a short fit on real data, align_biases, to_tflite, verify.

Real data: sklearn's 8x8 digits (upscaled for the image networks). Each model must export with every
operator integer, kernels equal to the learned integers, and top-1 agreement with Keras >= 99%.
"""

import keras
import numpy as np
import pytest
from sklearn.datasets import load_digits
from test_operations import standardize_batchnorms

import tfdq
from tfdq import layers as qlayers
from tfdq.export import inspect_tflite


def _digits(size=8, channels=1, scale=1.0):
    d = load_digits()
    x = d.images.astype(np.float32) / 16.0 * scale
    if size != 8:
        x = np.repeat(np.repeat(x, size // 8, 1), size // 8, 2)
    x = np.repeat(x[..., None], channels, -1)
    return x, d.target.astype(np.int64)


def _end_to_end(
    model,
    x,
    y,
    float_epochs=0,
    quant_epochs=1,
    n_train=1200,
    lr=2e-3,
    min_agreement=0.99,
    quantize_output=True,
    init_bits=4,
):
    """The pipeline of the README's Use section; returns (qmodel, report, verification, file info)."""
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if float_epochs:
        model.compile(keras.optimizers.Adam(lr), loss, metrics=["accuracy"])
        model.fit(x[:n_train], y[:n_train], epochs=float_epochs, batch_size=64, verbose=0)
        # keras.applications' BatchNorm momentum (0.999) leaves the moving statistics near their
        # initial values after a short fit: set them from the data, as a longer training would
        standardize_batchnorms(model, x[:256])
        assert model.evaluate(x[n_train:], y[n_train:], verbose=0)[1] > 0.5, "the float model did not learn"
    qmodel, report = tfdq.quantize_model(
        model,
        calibration_data=x[:256],
        return_report=True,
        strict=True,
        quantize_output=quantize_output,
        init_bits=init_bits,
    )
    assert report["export_problems"] == []
    qmodel.compile(keras.optimizers.Adam(lr / 2), loss)
    qmodel.fit(x[:n_train], y[:n_train], epochs=quant_epochs, batch_size=64, verbose=0)
    tfdq.export.align_biases(qmodel, x[:256])
    tflite, export_report = tfdq.export.to_tflite(qmodel, x[:256], return_report=True)
    result = tfdq.export.verify(qmodel, tflite, (x[n_train:], y[n_train:]), export_report=export_report)
    assert result["float_ops"] == []
    assert result["all_kernels_exact"], [l for l in result["layers"] if not l.get("ok")]
    assert result["top1_agreement"] >= min_agreement, result.format()
    return qmodel, export_report, result, inspect_tflite(tflite)


def _ops(info):
    return sorted({o["op"] for o in info["ops"]})


def _hard_swish(t):
    return t * keras.ops.relu6(t + 3.0) / 6.0


def hard_swish_se_model():
    """MobileNetV3's block written by hand in keras.ops: hard-swish and a squeeze-and-excite gate."""
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(16, 3, padding="same", use_bias=False)(inp)
    h = _hard_swish(keras.layers.BatchNormalization()(h))
    s = keras.ops.mean(h, axis=(1, 2), keepdims=True)
    s = keras.ops.relu(keras.layers.Conv2D(8, 1)(s))
    s = keras.ops.hard_sigmoid(keras.layers.Conv2D(16, 1)(s))
    h = h * s
    h = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(h)
    h = keras.layers.Activation("hard_swish")(keras.layers.BatchNormalization()(h))
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(32, activation="swish")(h)
    return keras.Model(inp, keras.layers.Dense(10)(h))


def test_hand_written_hard_swish_and_se_gate_export_all_integer():
    x, y = _digits()
    _, report, result, info = _end_to_end(
        hard_swish_se_model(), x, y, float_epochs=8, quant_epochs=2, lr=3e-3, min_agreement=0.97
    )
    # Measured 97.8-99.0%: hard-swish, swish and the gate run through calibrated int8 tensors
    # (LOGISTIC's fixed 1/256 output among them) that the Keras model computes in float.
    assert {"MUL", "MEAN", "LOGISTIC", "DEPTHWISE_CONV_2D"} <= set(_ops(info))
    # every tensor without a learned quantizer is listed with its scale
    assert any(c["tensor"].startswith("mean") for c in report["calibrated"])
    assert any(f["why"] == "TFLite int8 LOGISTIC output" for f in report["fixed"])


def _se_gate_model():
    """MobileNetV3's squeeze-and-excite gate as keras.applications writes it: ``relu6(conv(s) + 3) *
    (1 / 6)`` in tensor arithmetic, then a Multiply layer."""
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inp)
    s = keras.layers.GlobalAveragePooling2D(keepdims=True)(h)
    s = keras.layers.ReLU()(keras.layers.Conv2D(8, 1)(s))
    s = keras.layers.Conv2D(16, 1, name="excite")(s)
    gate = keras.layers.ReLU(6.0)(s + 3.0) * (1.0 / 6.0)
    h = keras.layers.Multiply(name="gate_mul")([h, gate])
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(h)
    return keras.Model(inp, keras.layers.Dense(10)(keras.layers.Flatten()(h)))


def test_hard_sigmoid_gate_rounds_once_onto_its_learned_grid():
    """The gate's + 3 goes into the 1x1 convolution's int32 bias, RELU6 fuses into it, the convolution
    requantizes at 6 d (d: the learned step of the gate's quantizer) and the MUL by 1/6 is exact: the
    file's gate equals Keras' element for element, nothing in between is calibrated. (Before, x and
    x + 3 were calibrated int8 tensors, each rounding once more: on a trained MobileNetV3Small 36% of
    the first block's gates came out one step off.) The gate's int8 scale is its step times
    1 + 2^-22, so that the MUL's ties round away from zero as the learned quantizer after it does
    (XNNPACK rounds them to even): the gated map is equal too."""
    from test_residual_export import _hidden_maps_equal  # noqa: PLC0415

    x, y = _digits()
    keras.utils.set_random_seed(0)
    qmodel, report, result, info = _end_to_end(_se_gate_model(), x, y, float_epochs=4, quant_epochs=1)
    assert report["calibrated"] == []
    assert [d["tensor"] for d in report["derived"]] == ["multiply:input0"]  # relu6(...) at 6 d
    assert "ADD" not in _ops(info)  # the + 3 is in the bias
    maps = _hidden_maps_equal(qmodel, tfdq.export.to_tflite(qmodel, x[:256]), x[1200:])
    assert max(maps.values()) == 0.0, maps  # the gate, and the gated map (the MUL's ties broken alike)
    assert result["max_abs_output_diff_in_output_steps"] <= 0.5 + 1e-6, result.format()


def test_dense_dense_mlp_exports_within_its_output_rounding():
    """Power-of-two scales on both sides put requantized values exactly on half-way points, which
    XNNPACK rounds to even; the exported per-tensor kernel scales break those ties away from zero
    as the learned quantizers do, so the hidden layers match exactly and the logits differ by
    their own int8 rounding only."""
    d = load_digits()
    x, y = (d.images.reshape(-1, 64) / 16.0).astype(np.float32), d.target
    inp = keras.Input((64,))
    h = keras.layers.Dense(64, activation="relu")(inp)
    h = keras.layers.Dense(32, activation="relu")(h)
    model = keras.Model(inp, keras.layers.Dense(10)(h))
    _, _, result, _ = _end_to_end(model, x, y, float_epochs=10, quant_epochs=3)
    assert result["max_abs_output_diff_in_output_steps"] <= 0.5 + 1e-6


def test_separable_conv_and_leaky_relu_split_into_learned_depthwise_and_pointwise():
    x, y = _digits()
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(8, 3, padding="same")(inp)
    h = keras.layers.LeakyReLU(0.1)(h)
    h = keras.layers.SeparableConv2D(16, 3, padding="same", name="sep")(h)
    h = keras.layers.LeakyReLU(0.1)(h)
    h = keras.layers.Flatten()(h)
    model = keras.Model(inp, keras.layers.Dense(10)(h))
    qmodel, _, result, info = _end_to_end(model, x, y, float_epochs=4, quant_epochs=1, min_agreement=0.97)
    # measured 97.8-99.7%: the LEAKY_RELU outputs and the logits have calibrated scales
    assert isinstance(qmodel.get_layer("sep_depthwise"), qlayers.QDepthwiseConv2D)
    assert isinstance(qmodel.get_layer("sep"), qlayers.QConv2D)
    assert isinstance(qmodel.get_layer("sep_depthwise_aq"), qlayers.ActivationQuantizer)
    assert {"sep_depthwise", "sep"} <= {l["layer"] for l in result["layers"] if l["ok"]}
    assert "LEAKY_RELU" in _ops(info)


def test_separable_split_computes_the_separable_convolution():
    inp = keras.Input((6, 6, 3))
    out = keras.layers.SeparableConv2D(4, 3, strides=2, depth_multiplier=2, padding="same", name="sep")(inp)
    model = keras.Model(inp, out)
    q = tfdq.quantize_model(model, quantize_activations=False, init_bits=8)
    ref = keras.models.clone_model(model)
    sep = ref.get_layer("sep")
    sep.depthwise_kernel.assign(q.get_layer("sep_depthwise").quantized_weights()[0])
    kernel, bias = q.get_layer("sep").quantized_weights()
    sep.pointwise_kernel.assign(kernel)
    sep.bias.assign(bias)
    xs = np.random.default_rng(0).normal(size=(3, 6, 6, 3)).astype(np.float32)
    np.testing.assert_allclose(q(xs).numpy(), ref(xs).numpy(), rtol=1e-5, atol=1e-5)


def efficientnet_block_model():
    """EfficientNet's MBConv block as keras.applications writes it: swish Activation layers, a
    squeeze-and-excite gate with swish and sigmoid fused into its 1x1 convolutions, a Multiply,
    stochastic depth (Dropout with noise_shape) and the residual Add."""
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="stem")(inp)
    h = keras.layers.Activation("swish", name="stem_act")(keras.layers.BatchNormalization(name="stem_bn")(h))
    e = keras.layers.Conv2D(32, 1, use_bias=False, name="expand")(h)
    e = keras.layers.Activation("swish", name="expand_act")(
        keras.layers.BatchNormalization(name="expand_bn")(e)
    )
    e = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(e)
    e = keras.layers.Activation("swish", name="dw_act")(keras.layers.BatchNormalization(name="dw_bn")(e))
    s = keras.layers.GlobalAveragePooling2D(name="squeeze")(e)
    s = keras.layers.Reshape((1, 1, 32), name="se_reshape")(s)
    s = keras.layers.Conv2D(4, 1, activation="swish", name="se_reduce")(s)
    s = keras.layers.Conv2D(32, 1, activation="sigmoid", name="se_expand")(s)
    e = keras.layers.Multiply(name="se_excite")([e, s])
    e = keras.layers.BatchNormalization(name="project_bn")(
        keras.layers.Conv2D(16, 1, use_bias=False, name="project")(e)
    )
    e = keras.layers.Dropout(0.2, noise_shape=(None, 1, 1, 1), name="drop")(e)
    h = keras.layers.Add(name="add")([e, h])
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    return keras.Model(inp, keras.layers.Dense(10, name="logits")(h))


def test_int8_sigmoid_rounds_as_the_logistic_lookup_table():
    """Independent reference: round(256 sigmoid(x)) in float64, at most 255 (int8 level 127 at
    zero point -128). x = 2^-7 is where a float32 sigmoid lands on the half level 128.5."""
    xs = np.concatenate([np.arange(-1024, 1024) / 128.0, [2.0**-7, -(2.0**-7)]]).astype(np.float32)
    want = np.minimum(np.round(256.0 / (1.0 + np.exp(-xs.astype(np.float64)))), 255.0) / 256.0
    np.testing.assert_array_equal(np.asarray(qlayers.int8_sigmoid(xs)), want)
    np.testing.assert_array_equal(np.asarray(qlayers.int8_swish(xs)), (xs * want).astype(np.float32))
    # straight-through: the gradient is the sigmoid's
    import tensorflow as tf  # noqa: PLC0415

    t = tf.constant(xs)
    with tf.GradientTape() as tape:
        tape.watch(t)
        g = qlayers.int8_sigmoid(t)
    sig = 1.0 / (1.0 + np.exp(-xs.astype(np.float64)))
    np.testing.assert_allclose(tape.gradient(g, t).numpy(), sig * (1 - sig), rtol=1e-5, atol=1e-7)


def test_int8_sigmoid_on_every_learned_input_grid():
    """Every input a learned quantizer can give it: i 2^e for the int8 levels i and steps 2^-14 to
    2^2, against round(256 sigmoid) in float64 (the file's table); the gradient is sigmoid'."""
    import tensorflow as tf  # noqa: PLC0415

    xs = (np.arange(-128, 128)[None, :] * 2.0 ** np.arange(-14, 3)[:, None]).reshape(-1).astype(np.float32)
    sig = 1.0 / (1.0 + np.exp(-xs.astype(np.float64)))
    want = np.minimum(np.round(256.0 * sig), 255.0) / 256.0
    t = tf.constant(xs)
    with tf.GradientTape() as tape:
        tape.watch(t)
        g = qlayers.int8_sigmoid(t)
    np.testing.assert_array_equal(g.numpy(), want.astype(np.float32))
    np.testing.assert_allclose(tape.gradient(g, t).numpy(), sig * (1 - sig), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(qlayers.int8_swish(xs)), (xs * want.astype(np.float32)))


def test_ties_even_quantizer_rounds_half_to_the_even_level():
    aq = qlayers.ActivationQuantizer(quantizer="U3", signed=True, ties="even")
    aq.build((None,))
    aq.quantizer.initialize_from(np.array([7.9]), bits=5)
    p = aq.quantizer.describe()
    d, q_max = float(p["d"]), float(p["q_max"])
    xs = (np.arange(-40, 41) * 0.25 * d).astype(np.float32)  # every quarter step: ties among them
    want = np.clip(np.round(xs / d), -round(q_max / d), round(q_max / d)) * d  # np.round: half to even
    np.testing.assert_array_equal(np.asarray(aq(xs)), want.astype(np.float32))


def test_efficientnet_block_exports_every_learned_map_equal():
    """swish is LOGISTIC (int8 output at TFLite's fixed 1/256) and a MUL, the gate a LOGISTIC: a
    learned quantizer on each one's input, the Keras sigmoid rounded onto the 1/256 grid as the
    file's lookup table (int8_sigmoid), the quantizers after their MULs rounding ties to even as
    XNNPACK does, the swish and sigmoid fused into the gate's convolutions split off. Every
    learned map of the file equals Keras', logits included (before: swish inputs and gate
    preactivations calibrated, maps 1-13 steps off; EfficientNetB0's logits no closer to Keras'
    than their own spread)."""
    from test_residual_export import _hidden_maps_equal  # noqa: PLC0415

    x, y = _digits()
    keras.utils.set_random_seed(0)
    qmodel, report, result, info = _end_to_end(
        efficientnet_block_model(), x, y, float_epochs=4, quant_epochs=1, quantize_output=True
    )
    ties = {l.name: l.ties for l in qlayers.activation_quantizer_layers(qmodel)}
    even = sorted(n for n, t in ties.items() if t == "even")
    assert even == ["dw_act_aq", "expand_act_aq", "se_excite_aq", "se_reduce_silu_aq", "stem_act_aq"], ties
    assert isinstance(qmodel.get_layer("se_reduce_aq"), qlayers.ActivationQuantizer)  # split off the conv
    assert qmodel.get_layer("se_expand").activation.__name__ == "linear"
    assert report["calibrated"] == []
    assert sorted(f["tensor"] for f in report["fixed"]) == [
        "dw_act:sigmoid",
        "expand_act:sigmoid",
        "se_expand_sigmoid",
        "se_reduce_silu:sigmoid",
        "stem_act:sigmoid",
    ]
    assert {"LOGISTIC", "MUL", "ADD"} <= set(_ops(info))
    maps = _hidden_maps_equal(qmodel, tfdq.export.to_tflite(qmodel, x[:256]), x[1200:])
    assert max(maps.values()) == 0.0, maps
    assert result["max_abs_output_diff_in_output_steps"] == 0.0, result.format()
    assert result["top1_agreement"] == 1.0


def test_int8_swish_model_saves_and_loads(tmp_path):
    qmodel = tfdq.quantize_model(efficientnet_block_model(), calibration_data=_digits()[0][:64])
    assert qmodel.get_layer("stem_act").activation is qlayers.int8_swish
    path = str(tmp_path / "q.keras")
    qmodel.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_layer("se_expand_sigmoid").activation is qlayers.int8_sigmoid
    x = _digits()[0][:32]
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), qmodel.predict(x, verbose=0))


def _mobilenet_v3_small(minimalistic):
    return keras.applications.MobileNetV3Small(
        weights=None,
        input_shape=(32, 32, 3),
        classes=10,
        minimalistic=minimalistic,
        classifier_activation=None,
        include_preprocessing=True,
    )


def test_mobilenetv3small_exports_every_op_integer_with_learned_kernels():
    """The default run's mobile network: no training (BatchNorm statistics set on the data), the
    model's own Rescaling, hard-swish, hard-sigmoid ops and squeeze-and-excite gates in the file."""
    x, y = _digits(32, 3, scale=255.0)
    model = _mobilenet_v3_small(False)
    standardize_batchnorms(model, x[:256])
    qmodel = tfdq.quantize_model(model, calibration_data=x[:256], strict=True)
    tfdq.export.align_biases(qmodel, x[:256])
    tflite, report = tfdq.export.to_tflite(qmodel, x[:256], return_report=True)
    # 200 held-out images (the verification runs Keras and the file on each: 15 s of CPU for all 597)
    result = tfdq.export.verify(qmodel, tflite, (x[1200:1400], y[1200:1400]), export_report=report)
    assert result["float_ops"] == [] and result["all_kernels_exact"]
    assert (
        len(result["layers"])
        == sum(isinstance(l, qlayers.QuantizedWeightsMixin) for l in qmodel.layers)
        == 54
    )
    # the squeeze (global average) is a constant-kernel DEPTHWISE_CONV_2D, whose rounding matches Keras;
    # hard-swish is one HARD_SWISH on a learned input grid, the gate's MUL has learned factors
    assert {"MUL", "ADD", "DEPTHWISE_CONV_2D", "CONV_2D", "HARD_SWISH"} <= set(_ops(inspect_tflite(tflite)))
    # untrained: logits close together (with keras.utils.set_random_seed(0): 100%, outputs equal)
    assert result["top1_agreement"] >= 0.95, result.format()


@pytest.mark.slow
@pytest.mark.parametrize(
    "build",
    [
        lambda: _mobilenet_v3_small(False),
        lambda: _mobilenet_v3_small(True),
        lambda: keras.applications.MobileNetV3Large(
            weights=None, input_shape=(32, 32, 3), classes=10, minimalistic=False, classifier_activation=None
        ),
        lambda: keras.applications.MobileNetV3Large(
            weights=None, input_shape=(32, 32, 3), classes=10, minimalistic=True, classifier_activation=None
        ),
        lambda: keras.applications.EfficientNetB0(
            weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None
        ),
        lambda: keras.applications.MobileNetV2(
            weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None
        ),
    ],
    ids=[
        "MobileNetV3Small",
        "MobileNetV3Small-minimalistic",
        "MobileNetV3Large",
        "MobileNetV3Large-minimalistic",
        "EfficientNetB0",
        "MobileNetV2",
    ],
)
def test_mobile_networks_end_to_end(build, request):
    """15 float epochs of Adam train these networks on the upscaled digits (MobileNetV3Small: 97.5%
    held out); 2 epochs left them near chance, where many logits tie and agreement means little.

    EfficientNetB0 starts at 8 bits: at the default 4 (per-tensor steps from the calibrated
    maximum) its swish outputs' steps are 1 for a median |x| of 0.13-0.25, the deep maps round
    to 0 and the logits are constant (9.9% held out against 85% float, measured on two trained
    models); at 6 bits 13.6%; at 8 bits 78-80%, the 1-epoch fine-tune then 86%."""
    x, y = _digits(32, 3, scale=255.0)
    # integer pixels, as images are: the digits' 16 grey levels times 255 / 16 are not, and the
    # file's int8 input (scale 1) rounds them, which moves EfficientNet's x / 255 off the half-way
    # points of its first learned grid (16% of that map one step off)
    x = np.round(x)
    init_bits = 8 if request.node.callspec.id == "EfficientNetB0" else 4
    _, _, result, _ = _end_to_end(
        build(), x, y, float_epochs=15, quant_epochs=1, quantize_output=True, init_bits=init_bits
    )
    print(result.format())  # with -s: the agreement and output steps that BENCHMARKS.md reports


def transpose_prelu_model():
    """A small encoder-decoder: a strided Conv2D down, a Conv2DTranspose up, PReLU slopes per channel."""
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="down")(inp)
    h = keras.layers.PReLU(shared_axes=[1, 2], name="prelu1")(h)
    h = keras.layers.Conv2DTranspose(8, 3, strides=2, padding="same", activation="relu", name="up")(h)
    h = keras.layers.Conv2D(8, 3, padding="same", name="mix")(h)
    h = keras.layers.PReLU(shared_axes=[1, 2], name="prelu2")(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(inp, keras.layers.Dense(10, name="head")(h))


def test_conv2d_transpose_and_prelu_export_learned_integers(tmp_path):
    x, y = _digits()
    model = transpose_prelu_model()
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:1200], y[:1200], epochs=10, batch_size=64, verbose=0)
    for name in ("prelu1", "prelu2"):  # slopes away from their zero init, as after a longer training
        layer = model.get_layer(name)
        layer.alpha.assign(layer.alpha + np.linspace(0.1, 0.4, 8, dtype=np.float32))
    qmodel, report, result, info = _end_to_end(model, x, y, quant_epochs=2)
    assert isinstance(qmodel.get_layer("up"), qlayers.QConv2DTranspose)
    assert isinstance(qmodel.get_layer("prelu1"), qlayers.QPReLU)
    # PReLU's min(x, 0) is an int8 QUANTIZE to zero point 127 (XNNPACK runs it), not a MINIMUM
    assert {"TRANSPOSE_CONV", "MUL", "QUANTIZE"} <= set(_ops(info)) and "MINIMUM" not in _ops(info), _ops(
        info
    )
    checked = {l["layer"] for l in result["layers"] if l["ok"]}
    assert {"up", "prelu1", "prelu2"} <= checked, result["layers"]
    # the file's slopes are the learned integers times the learned step (independent check)
    for name in ("prelu1", "prelu2"):
        layer = qmodel.get_layer(name)
        d = float(layer.kernel_quantizer.describe()["d"])
        k = layer.quantized_weights()[0].numpy() / d
        np.testing.assert_array_equal(k, np.round(k))
        kernel = next(e for e in report["kernels"] if e["layer"] == name)
        assert kernel["range"] == [int(k.min()), int(k.max())]
    # memory: the slopes and the transposed kernel (+ bias) at their learned bits
    sizes = {e.name: e for e in tfdq.memory.size_entries(qmodel) if e.kind == "weight"}
    assert sizes["prelu1"].count == 8 and sizes["up"].count == 3 * 3 * 8 * 8 + 8
    assert sizes["prelu1"].quantizer is qmodel.get_layer("prelu1").kernel_quantizer
    # the new layers save and load with their quantizers
    path = str(tmp_path / "q.keras")
    qmodel.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x[:64], verbose=0), qmodel.predict(x[:64], verbose=0))


def test_global_average_of_a_signed_map_rounds_ties_up_as_keras():
    """EfficientNet's squeeze: a global average of a signed map (a swish output) before a learned
    quantizer that rounds ties up. The file's DEPTHWISE_CONV_2D gets the quarter-step bias that
    decides them upwards (before: only for non-negative maps, and XNNPACK's ties to even left
    1-step differences; on a trained 8-bit EfficientNetB0 the first map off, 20 output steps).
    2x2 maps, input and output on one step: a quarter of the averages are ties."""
    from test_residual_export import _hidden_maps_equal  # noqa: PLC0415

    inp = keras.Input((2, 2, 8))
    h = keras.layers.Conv2D(16, 1, name="mix")(inp)
    s = keras.layers.GlobalAveragePooling2D(keepdims=True, name="squeeze")(h)
    out = keras.layers.Dense(4, name="head")(keras.layers.Flatten()(s))
    model = keras.Model(inp, out)
    x = np.random.default_rng(0).normal(size=(512, 2, 2, 8)).astype(np.float32)
    qmodel = tfdq.quantize_model(model, calibration_data=x[:256], init_bits=8)
    pool_q = qmodel.get_layer("squeeze_aq")
    assert pool_q.ties == "up" and pool_q.quantizer.signed
    # one step on both sides of the average: the mean of 4 integers is a tie where their sum is 2 mod 4
    qmodel.get_layer("mix_aq").quantizer.initialize_from(np.array([1.0]), bits=8)
    pool_q.quantizer.initialize_from(np.array([1.0]), bits=8)
    tflite = tfdq.export.to_tflite(qmodel, x[:256])
    pre = np.asarray(keras.Model(qmodel.input, pool_q.input)(x[256:])) / pool_q.quantizer.describe()["d"]
    assert np.mean(np.abs(pre - np.floor(pre) - 0.5) < 1e-6) > 0.1  # many exact ties, negative ones too
    maps = _hidden_maps_equal(qmodel, tflite, x[256:])
    assert maps["squeeze_aq"] == 0.0, maps
