"""Clamps at a grid point (a signed quantizer's +n d, the input's n d, PReLU's 0) as int8
QUANTIZE operators that LiteRT's XNNPACK delegate runs, with the same integers."""

import keras
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits

import tfdq
import tfdq.export as E
from tfdq.export.clamps import clamps_as_requantize
from tfdq.export.runtime import xnnpack_delegated


def _ops(tflite):
    return [o["op"] for o in E.inspect_tflite(tflite)["ops"]]


def _interpreter(tflite, delegates=True, **kwargs):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType  # noqa: PLC0415

    if not delegates:
        kwargs["experimental_op_resolver_type"] = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    return Interpreter(model_content=tflite, **kwargs)


def _run_int8(tflite, q, delegates=True):
    """Output integers of a file with one int8 input on the int8 batch ``q``."""
    it = _interpreter(tflite, delegates)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    it.resize_tensor_input(inp["index"], list(q.shape))
    it.allocate_tensors()
    it.set_tensor(inp["index"], q)
    it.invoke()
    return np.array(it.get_tensor(out["index"])), out["quantization"]


def _convert(fn, shape, int8_io=True):
    f = tf.function(fn, input_signature=[tf.TensorSpec(shape, tf.float32)])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if int8_io:
        converter.inference_input_type = converter.inference_output_type = tf.int8
    return converter.convert()


def _fq(t, scale, zero_point):
    return tf.quantization.fake_quant_with_min_max_vars(
        t, (-128 - zero_point) * scale, (127 - zero_point) * scale, num_bits=8
    )


def test_every_int8_level_clamps_as_the_minimum_and_maximum_did():
    """All 256 int8 inputs through MINIMUM / MAXIMUM with a scalar on the tensor's own scale
    (zero point n - 128, as a signed 4-bit quantizer's): the rewritten file's QUANTIZE gives
    min(v, 7) / max(v, -3) in grid steps (NumPy reference), and XNNPACK runs every operator."""
    d, n = 0.0625, 7
    levels = np.arange(-128, 128, dtype=np.int8).reshape(1, 256)
    for kind, c, ref in (("MINIMUM", n, np.minimum), ("MAXIMUM", -3, np.maximum)):
        op = tf.minimum if kind == "MINIMUM" else tf.maximum

        def fn(x, op=op, c=c):
            x = _fq(x, d, n - 128)
            return _fq(op(x, c * d), d, n - 128)

        original = _convert(fn, (1, 256))
        assert kind in _ops(original)
        rewritten, entries = clamps_as_requantize(original)
        assert kind not in _ops(rewritten) and "QUANTIZE" in _ops(rewritten)
        # the clamp's result is the model output: a second QUANTIZE restores its zero point
        assert [e["form"] for e in entries] == ["QUANTIZE x2"] and entries[0]["clamp"] == c
        assert all(xnnpack_delegated(rewritten))
        before, (s0, z0) = _run_int8(original, levels, delegates=False)
        after, (s1, z1) = _run_int8(rewritten, levels)
        assert (s0, z0) == (s1, z1) == (d, n - 128)
        v = levels.astype(np.int64) - (n - 128)  # grid steps of the input
        want = np.clip(ref(v, c) + z0, -128, 127)
        np.testing.assert_array_equal(after, want)
        np.testing.assert_array_equal(before, want)


def test_clamp_before_a_convolution_or_hard_swish_is_one_quantize_and_before_pooling_two():
    """A clamp read only by a convolution or a HARD_SWISH takes the new zero point (one QUANTIZE);
    one read by a MAX_POOL_2D (which keeps its input's quantization) gets its zero point back (two)."""
    rng = np.random.default_rng(0)
    d, n = 0.05, 7
    ws = rng.normal(size=(3, 3, 3, 4, 4)).astype(np.float32) * 0.3

    def conv(x, i):
        m = np.abs(ws[i]).max(axis=(0, 1, 2))
        k = tf.quantization.fake_quant_with_min_max_vars_per_channel(
            ws[i], -m, m, num_bits=8, narrow_range=True
        )
        return _fq(tf.nn.conv2d(x, k, 1, "SAME"), d, n - 128)

    def fn(x):
        x = _fq(x, 1 / 32, 0)
        y = _fq(tf.minimum(conv(x, 0), n * d), d, n - 128)  # a signed quantizer's clamp, read by a conv
        p = _fq(tf.minimum(conv(x, 1), n * d), d, n - 128)  # read by a max pooling
        h = _fq(tf.minimum(conv(x, 2), n * d), d, n - 128)  # read by a HARD_SWISH
        a = _fq(tf.nn.conv2d(y, ws[2], 1, "SAME"), 0.1, 0)
        b = _fq(h * tf.nn.relu6(h + 3.0) / 6.0, 0.05, 0)
        return _fq(a + tf.nn.max_pool2d(p, 2, 1, "SAME") + b, 0.1, 0)

    original = _convert(fn, (1, 6, 6, 4))
    assert _ops(original).count("MINIMUM") == 3 and "HARD_SWISH" in _ops(original)
    rewritten, entries = clamps_as_requantize(original)
    assert sorted(e["form"] for e in entries) == ["QUANTIZE", "QUANTIZE", "QUANTIZE x2"]
    ops = _ops(rewritten)
    outside = [op for op, ok in zip(ops, xnnpack_delegated(rewritten)) if not ok]
    assert "MINIMUM" not in ops and outside == ["HARD_SWISH"], outside  # LiteRT 2.3: no int8 HARD_SWISH
    for _ in range(20):
        x = rng.integers(-128, 128, (1, 6, 6, 4)).astype(np.int8)
        before, _ = _run_int8(original, x, delegates=False)
        after, _ = _run_int8(rewritten, x, delegates=False)
        np.testing.assert_array_equal(after, before)  # the same integers (LiteRT's builtin kernels)


def _signed_model():
    """A signed map after a convolution, and the signed sum of it with a ReLU map, each read
    by a convolution (a bottleneck's projection and its residual sum)."""
    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inp)
    y = keras.layers.Conv2D(8, 3, padding="same", name="c2")(x)  # linear: signed
    s = keras.layers.Add(name="sum")([x, y])  # no ReLU after the sum: signed
    z = keras.layers.Conv2D(8, 1, activation="relu", name="c3")(s)
    z = keras.layers.GlobalAveragePooling2D(name="pool")(z)
    return keras.Model(inp, keras.layers.Dense(10, name="logits")(z))


def test_signed_four_bit_quantizers_after_a_convolution_and_an_add_run_in_xnnpack_exactly():
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[..., None]
    keras.utils.set_random_seed(0)
    # (logits left float: the test counts the clamps of the maps inside the network)
    qmodel = tfdq.quantize_model(
        _signed_model(), calibration_data=x[:256], init_bits=4, quantize_output=False
    )
    signed = [layer for layer in tfdq.layers.activation_quantizer_layers(qmodel) if layer.quantizer.signed]
    assert len(signed) >= 2
    for layer in signed:  # 4 bits (n = 7), a step small enough that the clamp at +7 d cuts values
        q = layer.quantizer
        pre = np.asarray(keras.Model(qmodel.input, layer.input)(x[:256]))
        q.initialize_from(pre / 3, bits=4)
        assert q.describe()["d"] * 7 < pre.max()
    E.align_biases(qmodel, x[:512])
    tflite, report = E.to_tflite(qmodel, x[:512], return_report=True)

    ops = _ops(tflite)
    assert "MINIMUM" not in ops and "MAXIMUM" not in ops
    delegated = xnnpack_delegated(tflite)  # asked of LiteRT
    outside = [op for op, ok in zip(ops, delegated) if not ok]
    assert outside == [], outside
    signed_report = [a for a in report["activations"] if a["signed"]]
    assert {a["levels_max"] for a in signed_report} == {7}
    # one clamp per signed quantizer (at +7) and one on the image (unsigned 4-bit, zero point -128,
    # clamp at 15), each one QUANTIZE: every reader is a convolution or an ADD
    clamped = [
        a["levels_max"]
        for a in report["activations"]
        if a["signed"] or (a["zero_point"] == -128 and a["levels_max"] < 255)
    ]
    assert sorted(c["clamp"] for c in report["clamps"]) == sorted(clamped) == [7, 7, 15]
    assert all(c["form"] == "QUANTIZE" for c in report["clamps"]), report["clamps"]

    # every learned map of the file, as LiteRT computes it with its default XNNPACK delegate (all
    # tensors kept), equals Keras' (LiteRT's builtin kernels round some convolution ties otherwise)
    s_in, z_in = _interpreter(tflite).get_input_details()[0]["quantization"]
    q_in = np.clip(np.round(x / s_in) + z_in, -128, 127).astype(np.int8)
    it = _interpreter(tflite, experimental_preserve_all_tensors=True)
    inp = it.get_input_details()[0]
    it.resize_tensor_input(inp["index"], list(q_in.shape))
    it.allocate_tensors()
    it.set_tensor(inp["index"], q_in)
    it.invoke()
    tensors = [t for t in it.get_tensor_details() if t["dtype"] == np.int8]
    for layer in tfdq.layers.activation_quantizer_layers(qmodel):
        step = layer.quantizer.describe()["d"]
        k = np.asarray(keras.Model(qmodel.input, layer.output)(x), np.float64) / step
        np.testing.assert_allclose(k, np.round(k), atol=1e-4)  # the Keras map is on its grid
        found = [
            (it.get_tensor(t["index"]).astype(np.int64) - t["quantization"][1])
            for t in tensors
            if tuple(t["shape"]) == k.shape and abs(t["quantization"][0] / step - 1) <= 1e-6
        ]
        assert any(np.array_equal(f, np.round(k)) for f in found), layer.name
        if layer.quantizer.signed:
            assert np.abs(np.round(k)).max() == 7  # the clamp is reached
    r = E.verify(qmodel, tflite, (x, digits.target), export_report=report)
    # the logits (a calibrated, not power-of-two scale) differ by their own rounding only
    assert r["all_kernels_exact"] and r["max_abs_output_diff_in_output_steps"] <= 0.5 + 1e-4, r
