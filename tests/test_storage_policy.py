"""Kernel storage policies of the integer export (``to_tflite(storage=...)``).

One small model holds every case: a 3x3 convolution, a 1x1 convolution with
2-bit weights over 12 input channels at 8x8 = 64 rows (int2 in XNNPACK's
FULLY_CONNECTED under "smallest", int8 under "fast": more than
FAST_INT4_MAX_ROWS = 36 rows), a depthwise convolution with stride 3 (down to
3x3), a 1x1 convolution over 15 input channels (odd: no int4 in XNNPACK), a
2-bit 1x1 convolution at 3x3 = 9 rows (int4 FULLY_CONNECTED under "fast":
int2 only at one row) and a 2-bit Dense over 16 channels (int2 in XNNPACK
under both). For each policy the file must run in LiteRT,
hold the learned integers (read back from the flatbuffer and compared with
the quantized Keras kernels, BatchNorm signs folded), compute what the Keras
model computes, and say per layer which operator, storage and bytes it has
and whether LiteRT's XNNPACK delegate runs it (asked of the runtime).
"""

import keras
import numpy as np
import pytest

import tfdq
from tfdq import export as E
from tfdq.export.flatbuffer import find_kernel, unpack_integers
from tfdq.export.storage import pack_integers

BITS = {"conv3": 4, "pw_a": 2, "dw": 4, "pw_odd": 4, "pw_b": 2, "fc": 2}


def _model():
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(12, 3, padding="same", use_bias=False, name="conv3")(inp)
    x = keras.layers.BatchNormalization(name="bn0")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(15, 1, use_bias=False, name="pw_a")(x)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.DepthwiseConv2D(3, strides=3, padding="same", use_bias=False, name="dw")(x)  # 3x3
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(16, 1, use_bias=False, name="pw_odd")(x)
    x = keras.layers.BatchNormalization(name="bn3")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(16, 1, use_bias=False, name="pw_b")(x)
    x = keras.layers.BatchNormalization(name="bn4")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(10, name="fc")(x)
    model = keras.Model(inp, out)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            gamma = rng.uniform(0.5, 2.0, c)
            gamma[0] = -gamma[0]  # a negative scale flips that channel's integers
            layer.set_weights([gamma, rng.normal(0, 0.1, c), rng.normal(0, 0.1, c), rng.uniform(0.5, 2.0, c)])
    x = rng.uniform(0, 1, (64, 8, 8, 3)).astype("float32")
    qmodel = tfdq.quantize_model(model, calibration_data=x)
    for layer in tfdq.layers.weight_quantized_layers(qmodel):
        layer.kernel_quantizer.initialize_from(layer.kernel.numpy(), bits=BITS[layer.name])
    return qmodel, x


EXPECTED = {  # layer: (operator, storage) per policy
    "fast": {
        "conv3": ("CONV_2D", "int8"),
        "pw_a": ("CONV_2D", "int8"),  # 64 rows: int4 is slower than int8 where multiply-adds dominate
        "dw": ("DEPTHWISE_CONV_2D", "int8"),
        "pw_odd": ("CONV_2D", "int8"),  # 15 input channels: the fallback, with a note
        "pw_b": ("FULLY_CONNECTED", "int4"),  # 9 rows: int4; 2 bits, but int2 only at one row
        "fc": ("FULLY_CONNECTED", "int2"),  # 2 bits, 16 input channels (a multiple of 4)
    },
    "smallest": {
        "conv3": ("CONV_2D", "int4"),
        "pw_a": ("FULLY_CONNECTED", "int2"),
        "dw": ("DEPTHWISE_CONV_2D", "int4"),
        "pw_odd": ("FULLY_CONNECTED", "int4"),
        "pw_b": ("FULLY_CONNECTED", "int2"),
        "fc": ("FULLY_CONNECTED", "int2"),
    },
    "int8": {
        "conv3": ("CONV_2D", "int8"),
        "pw_a": ("CONV_2D", "int8"),
        "dw": ("DEPTHWISE_CONV_2D", "int8"),
        "pw_odd": ("CONV_2D", "int8"),
        "pw_b": ("CONV_2D", "int8"),
        "fc": ("FULLY_CONNECTED", "int8"),
    },
}


def _learned_integers(qmodel, name):
    """The learned integers in TFLite's kernel order, BatchNorm signs folded (float64 NumPy)."""
    layer = qmodel.get_layer(name)
    k = np.asarray(layer.quantized_weights()[0], np.float64) / layer.kernel_quantizer.describe()["d"]
    k = np.round(k).astype(np.int64)
    bn = next(
        (
            other
            for other in qmodel.layers
            if isinstance(other, keras.layers.BatchNormalization)
            and other.input._keras_history.operation is layer
        ),
        None,
    )
    sign = 1 if bn is None else np.where(np.asarray(bn.gamma) < 0, -1, 1)
    if isinstance(layer, tfdq.layers.QDepthwiseConv2D):
        return (k[..., 0] * sign).reshape(-1)  # [1, H, W, C]
    if isinstance(layer, tfdq.layers.QConv2D):
        return np.transpose(k * sign, (3, 0, 1, 2)).reshape(-1)  # [C_out, H, W, C_in]
    return np.transpose(k * sign, (1, 0)).reshape(-1)  # [C_out, C_in]


def test_pack_integers_is_lowest_bits_first():
    """LiteRT's sub-byte packing, written out by hand: the first value in the lowest bits."""
    # int2: -1, 0, 1, -2 -> fields 0b11, 0b00, 0b01, 0b10 -> 0b10_01_00_11
    assert pack_integers([-1, 0, 1, -2, 1], "int2").tolist() == [0b10010011, 0b01]
    # int4: -7, 3, 5 -> 0x9 | 0x3 << 4, 0x5
    assert pack_integers([-7, 3, 5], "int4").tolist() == [0x39, 0x05]
    assert pack_integers([-128, 127], "int8").tolist() == [0x80, 0x7F]
    with pytest.raises(E.ExportError, match="do not fit int2"):
        pack_integers([2], "int2")


@pytest.fixture(scope="module")
def exports():
    qmodel, x = _model()
    out = {}
    for policy in ("fast", "smallest", "int8"):
        E.align_biases(qmodel, x, storage=policy)
        tflite, report = E.to_tflite(qmodel, x, storage=policy, return_report=True)
        verified = E.verify(qmodel, tflite, x[:32], export_report=report)
        out[policy] = (tflite, report, verified, [w.numpy() for w in qmodel.weights])
    return qmodel, x, out


@pytest.mark.parametrize("policy", ["fast", "smallest", "int8"])
def test_every_policy_runs_in_litert_and_holds_the_learned_integers(exports, policy):
    qmodel, x, out = exports
    tflite, report, verified, weights = out[policy]
    qmodel.set_weights(weights)  # the model as aligned for this policy
    info = E.inspect_tflite(tflite)
    by_layer = {k["layer"]: k for k in report["kernels"]}
    for name, (op, storage) in EXPECTED[policy].items():
        entry = by_layer[name]
        assert (entry["op"], entry["storage"]) == (op, storage), (policy, name, entry)
        t = find_kernel(info, _op_index(qmodel, name))
        assert t["type"] == storage
        np.testing.assert_array_equal(unpack_integers(t, tflite).reshape(-1), _learned_integers(qmodel, name))
        per_byte = {"int2": 4, "int4": 2, "int8": 1}[storage]
        assert entry["bytes"] == -(-entry["count"] // per_byte)
        # XNNPACK takes every int8 kernel and the int4/int2 FULLY_CONNECTED; no sub-byte convolution
        assert entry["xnnpack"] == (
            storage == "int8" or op == "FULLY_CONNECTED" and entry["input_channels"] % 2 == 0
        )
    assert verified["all_kernels_exact"], verified["layers"]
    assert verified["float_ops"] == []
    assert [(l["layer"], l["storage"], l["xnnpack"]) for l in verified["layers"]] == [
        (k["layer"], k["storage"], k["xnnpack"]) for k in report["kernels"]
    ]
    # the file computes what the aligned Keras model computes (logits: their own rounding only)
    assert verified["max_abs_output_diff_in_output_steps"] <= 0.5 + 1e-6, verified
    if policy == "fast":
        assert "15 input channels" in by_layer["pw_odd"]["storage_note"]
        assert "64 rows" in by_layer["pw_a"]["storage_note"]
        assert "int4, not int2: 9 rows" in by_layer["pw_b"]["storage_note"]
        assert by_layer["fc"]["storage_note"] is None
        assert any("pw_odd" in n and "odd" in n for n in verified["notes"])
        assert all(
            b["requantization_shift"] == [0.0, 0.0] for b in report["biases"]
        )  # one rounding everywhere
    sizes = {p: len(out[p][0]) for p in out}
    assert sizes["smallest"] < sizes["fast"] < sizes["int8"]


def _op_index(qmodel, name):
    """The export's op index of a layer (its kernel tensor is tagged with it)."""
    from tfdq.export.plan import Plan

    plan = Plan(qmodel)
    return next(p.op_index for p in plan.kernels.values() if p.layer_name == name)


def test_int4_kernels_is_a_deprecated_alias(exports):
    qmodel, x, _ = exports
    with pytest.warns(DeprecationWarning, match="storage='int8'"):
        tflite = E.to_tflite(qmodel, x, int4_kernels=False)
    kernels = [
        t["type"]
        for t in E.inspect_tflite(tflite)["tensors"]
        if t["bytes"] and t["type"] in ("int2", "int4", "int8")
    ]
    assert set(kernels) == {"int8"}
    with pytest.raises(ValueError, match="storage must be one of"):
        E.to_tflite(qmodel, x, storage="tiny")


def test_alignment_follows_the_storage(exports):
    """Aligned for the wrong policy, the file is off: the XNNPACK FULLY_CONNECTED rounds once,
    the builtin int4 kernels (convolutions, the odd-channel FULLY_CONNECTED) twice."""
    qmodel, x, out = exports
    qmodel.set_weights(out["int8"][3])  # aligned for all-int8 (one rounding everywhere)
    tflite, report = E.to_tflite(qmodel, x, storage="smallest", return_report=True)
    verified = E.verify(qmodel, tflite, x, export_report=report)
    assert verified["max_abs_output_diff_in_output_steps"] > 1.0


def test_fast_rule_counts_rows_per_example():
    """The "fast" rule reads the output positions per example (H*W; 1 for a Dense) from the graph:
    int4 FULLY_CONNECTED up to FAST_INT4_MAX_ROWS rows, int8 beyond it and where H*W is unknown."""
    from tfdq.export.plan import FAST_INT4_MAX_ROWS, Plan

    def plan_of(hw):
        inp = keras.Input((hw, hw, 8))
        x = keras.layers.Conv2D(8, 1, name="pw")(inp)
        x = keras.layers.GlobalAveragePooling2D()(x)
        model = keras.Model(inp, keras.layers.Dense(4, name="fc")(x))
        data = (
            None if hw is None else np.random.default_rng(0).uniform(0, 1, (4, hw, hw, 8)).astype("float32")
        )
        qmodel = tfdq.quantize_model(model, calibration_data=data, init_bits=4)
        return {p.layer_name: p for p in Plan(qmodel).kernels.values()}

    assert FAST_INT4_MAX_ROWS == 36
    for hw, rows, storage in ((6, 36, "int4"), (7, 49, "int8"), (None, None, "int8")):
        plans = plan_of(hw)
        pw, fc = plans["pw"], plans["fc"]
        assert (pw.rows, pw.storage, fc.rows, fc.storage, fc.form) == (rows, storage, 1, "int4", "fc"), hw
        if storage == "int8":
            assert pw.form is None
            assert ("unknown number of" if hw is None else f"{rows} rows") in pw.storage_note
