"""``full_grid=True``: a uniform quantizer's forward range snapped to the full
grid of its bitwidth, and charged that bitwidth (docs/method.md section 8,
"Bits charged = bits stored"). Expectations in float64 NumPy from the
formulas: ``q_max = (2^(b-1) - 1) d`` signed, ``(2^b - 1) d`` unsigned."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfdq
from tfdq import layers as qlayers
from tfdq import memory
from tfdq.quantizers import P3, U1, U2, U3


def _levels64(bits, signed):
    bits = np.float64(bits)
    return 2.0 ** (bits - 1.0) - 1.0 if signed else 2.0**bits - 1.0


def _make(cls, signed, rng):
    role = "weight" if signed else "activation"
    q = cls(signed=signed, role=role, full_grid=True)
    q.build(None)
    for name, var in q._param_vars.items():
        if name == "bits":
            var.assign(float(rng.uniform(1.6, 8.4)))
        elif name == "d":
            var.assign(float(2.0 ** rng.uniform(-7.5, -1.0)))
        else:  # q_max
            var.assign(float(2.0 ** rng.uniform(-6.0, 3.0)))
    return q


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("cls", [U1, U2, U3], ids=lambda c: c.__name__)
def test_full_grid_range_and_charged_bits(cls, signed):
    rng = np.random.default_rng(11)
    for _ in range(12):
        q = _make(cls, signed, rng)
        p = q.forward_params()
        b, d, q_max = (np.float64(np.asarray(p[k])) for k in ("bits", "d", "q_max"))
        assert b == int(b) and q.bounds["bits"][0] <= b <= q.bounds["bits"][1]
        assert q_max == _levels64(b, signed) * d  # exact: d is a power of two
        # charged = the full grid's bits, for activations and for weights whose
        # kernel uses only a small part of the range
        small_kernel = tf.constant([0.3 * d, -0.2 * d], tf.float32)
        assert float(memory.stored_bits(q, p)) == b
        assert float(memory.stored_bits(q, p, small_kernel)) == b
        # the grid holds every level it is charged for: inputs over the range
        # reach +-n(b) and every integer in between
        lo = -1.5 * q_max if signed else 0.0
        x = np.linspace(lo, 1.5 * q_max, 20001).astype(np.float32)
        k = np.asarray(q.quantize_tensor(tf.constant(x), p), np.float64) / d
        assert np.array_equal(k, np.round(k))
        n = _levels64(b, signed)
        want = np.arange(-n if signed else 0.0, n + 1.0)
        assert np.array_equal(np.unique(k), want)


def test_full_grid_against_stored_range_on_a_three_level_grid():
    """The issue's case: q_max = 1.4 d. Stored-range accounting charges the
    2 bits that {-1, 0, 1} needs; the full grid makes it {-3, ..., 3} and charges 3."""
    d = 2.0**-4
    stored, full = U3(init_d=d, init_q_max=1.4 * d), U3(init_d=d, init_q_max=1.4 * d, full_grid=True)
    for q in (stored, full):
        q.build(None)
    ps, pf = stored.forward_params(), full.forward_params()
    assert float(ps["bits"]) == float(pf["bits"]) == 3.0  # the paper's formula
    assert float(memory.stored_bits(stored, ps)) == 2.0
    assert float(ps["q_max"]) == np.float32(1.4 * d)
    assert float(memory.stored_bits(full, pf)) == 3.0
    assert float(pf["q_max"]) == 3.0 * d


def test_full_grid_range_gradient_is_straight_through():
    """dQ/dq_max = sign(x) outside the snapped range (U3's formula), reaching the q_max variable."""
    d = 2.0**-3
    q = U3(init_d=d, init_q_max=5.2 * d, full_grid=True)  # b = 4, snapped to 7 d
    q.build(None)
    x = np.array([-2.0, -0.9, -0.3, 0.0, 0.4, 0.87, 0.95, 3.0], np.float32)
    dy = np.array([0.5, -1.0, 2.0, 1.0, -0.5, 3.0, -2.0, 1.5], np.float32)
    with tf.GradientTape() as tape:
        y = q.quantize_tensor(tf.constant(x))
        loss = tf.reduce_sum(y * dy)
    g_q = tape.gradient(loss, q.param("q_max"))
    q_max = 7 * d
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    want = np.sum(np.where(np.abs(x64) > q_max, np.sign(x64) * dy64, 0.0))
    assert float(g_q) == want


def test_full_grid_holds_through_training():
    """After every SGD step the forward range is the full grid of the current bitwidth."""
    rng = np.random.default_rng(2)
    q = U3(full_grid=True)
    q.initialize_from(np.array([1.0]), bits=3.0)
    q.build(None)
    opt = keras.optimizers.SGD(0.05)
    x = tf.constant(rng.normal(size=4096).astype(np.float32))
    seen = set()
    for _ in range(40):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((q.quantize_tensor(x) - x) ** 2)
        variables = [q.param("d"), q.param("q_max")]
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
        p = q.forward_params()
        b, d = float(p["bits"]), float(p["d"])
        assert float(p["q_max"]) == _levels64(b, True) * d
        seen.add(b)
    assert max(seen) > 3.0  # MSE training widened the grid


def test_full_grid_config_and_sizes():
    assert "full_grid" not in U3().get_config()  # configs without the option are as before
    config = U3(full_grid=True).get_config()
    assert config["full_grid"] is True and U3.from_config(config).full_grid
    with pytest.raises(ValueError, match="uniform quantizers only"):
        tfdq.quantizers.QuantizerSpec.create(P3, full_grid=True)
    float_model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5), keras.layers.Dense(3)])
    q = tfdq.quantize_model(
        float_model, weight_quantizer=U3(full_grid=True), quantize_activations=False, quantize_input=False
    )
    layers = qlayers.weight_quantized_layers(q)
    assert all(l.kernel_quantizer.full_grid for l in layers)
    sizes = memory.Sizes(q)
    want = 0.0
    for e, bits in zip(sizes.entries, sizes.bits):
        b = float(e.quantizer.forward_params()["bits"])
        assert float(bits) == b
        want += e.count * b / 8192.0
    assert float(sizes.weight_kb()) == pytest.approx(want, rel=1e-6)


def test_full_grid_exported_bits_equal_charged_bits():
    """The integer file: every kernel's and feature map's bitwidth is the charged
    one, and its allowed integer range is the full grid of that bitwidth."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(64, 8, 8, 1)).astype(np.float32)
    float_model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    q = tfdq.quantize_model(
        float_model,
        weight_quantizer=U3(full_grid=True),
        activation_quantizer=U3(signed=False, role="activation", full_grid=True),
        calibration_data=x,
    )
    for quantizer in q.quantizers():  # ranges the stored-range rule would charge less for
        p = quantizer.describe()
        quantizer.param("q_max").assign(p["q_max"] * 0.6)
    charged = {e.name: float(e.bits()) for e in memory.size_entries(q) if e.quantizer is not None}
    _, report = tfdq.export.to_tflite(q, x[:32], return_report=True)
    assert len(report["kernels"]) == 2
    for k in report["kernels"]:
        b = charged[k["layer"]]
        assert k["bits"] == b
        assert k["allowed"] == [-int(_levels64(b, True)), int(_levels64(b, True))]
    assert report["activations"]
    for a in report["activations"]:
        if not q.get_layer(a["layer"]).counted:  # the logits' output quantizer is charged nothing
            continue
        b = charged[a["layer"]]
        assert a["bits"] == b
        assert a["levels_max"] == int(_levels64(b, a["signed"]))
