"""hard-swish as LiteRT's int8 HARD_SWISH computes it (tfdq.ops.hard_swish_int8_table, tfdq.layers.QHardSwish).

Checked against LiteRT itself (a converted file with one HARD_SWISH per scale pair, every int8 input
level) and against a float64 NumPy transcription of the kernel's integer steps written here.
"""

import math

import keras
import numpy as np
import tensorflow as tf

import tfdq
from tfdq import layers as qlayers
from tfdq import ops


def _multiplier16(real):
    """TFLite's int16 fixed-point form of a float32 multiplier: frexp, 31-bit fraction, half up to 15."""
    q, e = math.frexp(float(np.float32(real)))
    fixed = round(q * 2.0**31)
    if fixed == 2**31:
        fixed, e = fixed // 2, e + 1
    if fixed >= 2**31 - 1 - 2**15:
        return 32767, e
    return (fixed + 2**15) // 2**16, e


def _trunc_div(a, b):
    return np.trunc(a / b)  # float64: exact for these magnitudes (|a| < 2^31)


def _rounding_shift(x, shift):
    """x / 2^shift to nearest, ties away from zero (float64)."""
    y = x / 2.0**shift
    return np.sign(y) * np.floor(np.abs(y) + 0.5)


def reference_hard_swish(values, s_in, s_out):
    """LiteRT's int8 HARD_SWISH output level (before zero point and saturation) of the input values
    (level minus zero point), in float64 NumPy."""
    hires = np.float32(np.float32(s_in) * np.float32(1.0 / 128.0))
    out_m, out_e = _multiplier16(np.float32(hires / np.float32(s_out)))
    gate_m, gate_e = _multiplier16(np.float32(hires / np.float32(3.0 / 32768.0)))
    x = np.asarray(values, np.float64) * 128.0

    def high_mul_rounded(a, b):
        ab = a * b
        return _trunc_div(ab + np.where(ab >= 0, 2.0**14, 1.0 - 2.0**14), 2.0**15)

    x_out = high_mul_rounded(x, out_m)
    gate = x
    if gate_e > 0:
        gate = np.clip(gate * 2.0 ** (gate_e - 1), -32768, 32767)
    gate = high_mul_rounded(gate, gate_m)
    if gate_e > 0:
        gate = np.clip(gate * 2.0, -32768, 32767)
    elif gate_e < 0:
        gate = _rounding_shift(gate, -gate_e)
    gate = np.floor((gate + 32768.0) / 2.0)
    y = _trunc_div(gate * x_out, 2.0**15)
    return _rounding_shift(y, -out_e)


def _litert_hard_swish(pairs):
    """One converted file: input i (256 values) -> HARD_SWISH -> output i, on the scales of pair i
    (``(s_in, zero point in, s_out, zero point out)``); returns (input details, output details,
    outputs for all 256 int8 levels)."""
    from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415

    def fq(t, s, z):
        return tf.quantization.fake_quant_with_min_max_vars(t, (-128 - z) * s, (127 - z) * s, num_bits=8)

    @tf.function
    def fn(*xs):
        outs = []
        for x, (s_in, z_in, s_out, z_out) in zip(xs, pairs):
            x = fq(x, s_in, z_in)
            outs.append(fq(x * tf.nn.relu6(x + 3.0) * (1.0 / 6.0), s_out, z_out))
        return outs

    specs = [tf.TensorSpec([256], tf.float32) for _ in pairs]
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function(*specs)], fn)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    interpreter = Interpreter(model_content=converter.convert())
    interpreter.allocate_tensors()
    ops_used = {d["op_name"] for d in interpreter._get_ops_details()}  # noqa: SLF001
    assert ops_used == {"HARD_SWISH"}, ops_used
    levels = np.arange(-128, 128, dtype=np.int8)
    ins = sorted(interpreter.get_input_details(), key=lambda d: d["index"])
    outs = sorted(interpreter.get_output_details(), key=lambda d: d["index"])
    for d in ins:
        interpreter.set_tensor(d["index"], levels)
    interpreter.invoke()
    return ins, outs, [interpreter.get_tensor(d["index"]) for d in outs]


def _pairs(seed, count):
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(count):
        if i % 4 == 3:  # a few steps that are not powers of two
            s_in, s_out = np.float32(rng.uniform(0.003, 0.3)), np.float32(rng.uniform(0.003, 0.3))
            if s_in > 100 * s_out:
                s_in = s_out
        else:  # learned steps: powers of two, s_in <= 128 s_out (the kernel refuses more)
            e_out = int(rng.integers(-9, 1))
            s_in, s_out = 2.0 ** int(rng.integers(e_out - 4, min(e_out + 7, 1))), 2.0**e_out
        pairs.append((float(s_in), int(rng.integers(-20, 21)), float(s_out), int(rng.integers(-20, 21))))
    return pairs


def test_hard_swish_table_equals_litert_and_the_numpy_reference():
    """Every int8 input level, 64 scale pairs (learned power-of-two steps and arbitrary scales, zero
    points off 0): tfdq's TensorFlow table, the NumPy reference and LiteRT's HARD_SWISH agree on
    every output level."""
    pairs = _pairs(0, 64)
    ins, outs, results = _litert_hard_swish(pairs)
    levels = np.arange(-128, 128)
    differ_from_float = 0
    for d_in, d_out, got in zip(ins, outs, results):
        (s_in,), (z_in,) = (
            d_in["quantization_parameters"]["scales"],
            d_in["quantization_parameters"]["zero_points"],
        )
        (s_out,), (z_out,) = (
            d_out["quantization_parameters"]["scales"],
            d_out["quantization_parameters"]["zero_points"],
        )
        values = levels - z_in
        table = ops.hard_swish_int8_table(tf.constant(s_in, tf.float32), tf.constant(s_out, tf.float32))
        ours = table.numpy()[values - ops.HARD_SWISH_TABLE_LOW]
        ref = reference_hard_swish(values, s_in, s_out)
        np.testing.assert_array_equal(ours, ref, err_msg=f"scales {s_in}, {s_out}")
        np.testing.assert_array_equal(
            np.clip(ours + z_out, -128, 127), got, err_msg=f"scales {s_in}, {s_out}"
        )
        x = values * np.float64(s_in)
        rounded = np.clip(ops.round_half_away(x * np.clip(x + 3, 0, 6) / 6 / s_out) + z_out, -128, 127)
        differ_from_float += int(np.sum(rounded != got))
    # the kernel is not the float function rounded once: some levels differ (why this exists)
    assert differ_from_float > 0


def _hard_swish_cnn():
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(16, 3, padding="same", name="conv")(inp)
    h = keras.layers.Activation("hard_swish", name="hswish")(h)
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="mix")(h)
    return keras.Model(inp, keras.layers.Dense(10, name="logits")(keras.layers.Flatten()(h)))


def _set_step(aq, d, levels=127):
    aq.quantizer.param("d").assign(d)
    aq.quantizer.param("q_max").assign(levels * d)


def test_quantized_hard_swish_computes_the_files_levels():
    """quantize_model's hard-swish (QHardSwish between its two learned quantizers) gives, in Keras,
    the map the file's HARD_SWISH gives, element for element, on a step pair (1/16 onto 1/8) where
    40 of the 256 input levels (the half-way points above x = 3) come out one step off the float
    function rounded once; training
    through it gets the float function's gradient."""
    from sklearn.datasets import load_digits  # noqa: PLC0415
    from test_residual_export import _hidden_maps_equal  # noqa: PLC0415

    x = load_digits().images[..., None].astype(np.float32)  # pixels 0 ... 16: inputs above 3 too
    keras.utils.set_random_seed(0)
    qmodel = tfdq.quantize_model(_hard_swish_cnn(), calibration_data=x[:256])
    layer = qmodel.get_layer("hswish")
    assert isinstance(layer, qlayers.QHardSwish)
    source, target = layer.learned_quantizers()
    _set_step(source, 1.0 / 16.0)
    _set_step(target, 1.0 / 8.0)
    keep = x[:400]
    x_q = keras.Model(qmodel.input, source.output)(keep).numpy().astype(np.float64)
    got = keras.Model(qmodel.input, target.output)(keep).numpy().astype(np.float64)
    rounded = np.clip(ops.round_half_away(x_q * np.clip(x_q + 3, 0, 6) / 6 * 8), -127, 127) / 8
    want = np.clip(reference_hard_swish(x_q * 16, 1.0 / 16.0, 1.0 / 8.0), -127, 127) / 8
    np.testing.assert_array_equal(got, want)
    assert np.sum(got != rounded) > 0  # the float function rounded once is not what the file does
    maps = _hidden_maps_equal(qmodel, tfdq.export.to_tflite(qmodel, x[:256]), keep)
    assert maps[target.name] == 0.0 and maps[source.name] == 0.0, maps
    # gradients: the float hard-swish's (straight-through), and the output step's as usual
    with tf.GradientTape() as tape:
        out = qmodel(keep[:64], training=True)
        loss = tf.reduce_sum(out**2)
    d_out = target.quantizer.param("d")
    grads = tape.gradient(loss, [qmodel.get_layer("conv").kernel, d_out])
    assert all(g is not None and np.all(np.isfinite(g)) and np.any(g != 0) for g in grads)
    # saved and loaded, it finds its quantizers again
    loaded = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(qmodel))
    loaded.set_weights(qmodel.get_weights())
    assert loaded.get_layer("hswish").learned_quantizers() is not None
    np.testing.assert_array_equal(loaded.predict(keep, verbose=0), qmodel.predict(keep, verbose=0))
