"""Quantizers and quantized layers saved before the quantizer base class was
split (tfdq at commit 369a9df) load with the same configuration, parameters,
outputs and gradients; the validated spec rebuilds from its config.

``tests/data/saved_quantizers_369a9df.keras`` and its ``.npz`` (inputs,
outputs, forward parameters and gradients of a fixed loss) were written by
``tests/data/make_saved_quantizers.py`` with the code of that commit.
"""

import json
import os
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfdq  # noqa: F401  (registers the serializables)
from tfdq import layers as qlayers
from tfdq import quantizers
from tfdq.quantizers import P1, P2, P3, U1, U2, U3

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
STEM = os.path.join(DATA, "saved_quantizers_369a9df")


def _quantizer(layer):
    return layer.kernel_quantizer if hasattr(layer, "kernel_quantizer") else layer.quantizer


@pytest.fixture(scope="module")
def saved():
    model = keras.models.load_model(STEM + ".keras")  # safe mode
    with np.load(STEM + ".npz") as f:
        arrays = dict(f)
    with zipfile.ZipFile(STEM + ".keras") as z:
        config = json.loads(z.read("config.json"))
    return model, arrays, config


def _saved_quantizer_configs(config):
    """``layer name -> quantizer config`` as written in the file."""
    out = {}
    for layer in config["config"]["layers"]:
        c = layer["config"]
        q = c.get("kernel_quantizer") or c.get("quantizer")
        if isinstance(q, dict):
            out[c["name"]] = q["config"]
    return out


def test_old_file_loads_with_same_outputs_and_parameters(saved):
    model, arrays, _ = saved
    y = model.predict(arrays["x"], verbose=0)
    np.testing.assert_array_equal(y, arrays["y"])
    layers = qlayers.weight_quantized_layers(model) + qlayers.activation_quantizer_layers(model)
    assert len(layers) == 10
    for layer in layers:
        for name, value in _quantizer(layer).forward_params().items():
            np.testing.assert_array_equal(
                np.asarray(value), arrays[f"{layer.name}/{name}"], err_msg=layer.name
            )


def test_old_file_gradients_identical(saved):
    model, arrays, _ = saved
    x = arrays["x"]
    weights = np.linspace(-1.0, 1.0, int(np.prod(model.output.shape[1:])), dtype=np.float32)
    with tf.GradientTape() as tape:
        y = model(x, training=True)
        loss = tf.reduce_sum(tf.reshape(y, (y.shape[0], -1)) * weights) + tf.reduce_sum(y * y)
    variables = list(model.trainable_variables)
    grads = tape.gradient(loss, variables)
    # saved in variable order; a loaded model's quantizer variables have no parent prefix
    # in their path ("u1/d" for the saved "conv_u1/u1/d"), as before the split
    expected = [(k[len("grad/") :], v) for k, v in arrays.items() if k.startswith("grad/")]
    assert len(expected) == len(variables) == 31
    for (path, want), var, grad in zip(expected, variables, grads):
        assert path.endswith(var.path), (path, var.path)
        np.testing.assert_array_equal(np.asarray(grad), want, err_msg=path)
    assert any(np.any(w != 0) for p, w in expected if p.endswith(("/d", "/q_max", "/q_min", "/bits")))


def test_old_file_configs_unchanged(saved):
    """``get_config`` of each loaded quantizer equals the config in the old file, key for key."""
    model, _, config = saved
    written = _saved_quantizer_configs(config)
    layers = qlayers.weight_quantized_layers(model) + qlayers.activation_quantizer_layers(model)
    assert sorted(written) == sorted(l.name for l in layers)
    for layer in layers:
        now = _quantizer(layer).get_config()
        old = written[layer.name]
        now.pop("dtype"), old.pop("dtype")
        assert now == old, layer.name
        assert list(now) == list(old), layer.name  # same keys in the same order


@pytest.mark.parametrize(
    "quantizer",
    [
        U1(),
        U2(signed=False, role="activation", min_bits=2, max_bits=6),
        U3(round_step=False, init_d=0.01, init_q_max=0.5),
        U2(learn=("q_max",), init_bits=2),
        P1(init_bits=3),
        P2(with_zero=True),
        P3(signed=False, role="activation"),
        P3(min_bits=3, max_bits=5, min_q_max=2.0**-4, max_q_max=64.0),
    ],
    ids=lambda q: type(q).__name__,
)
def test_config_round_trip_rebuilds_the_spec(quantizer):
    quantizer.initialize_from(np.array([0.7, -1.3]), bits=3.0)
    config = quantizer.get_config()
    clone = type(quantizer).from_config(config)
    assert clone.get_config() == config
    # the clone's spec holds the moved initial values as given ones; the rest is the same
    assert dataclasses_replace_init(clone.spec) == dataclasses_replace_init(quantizer.spec)
    assert clone.init == quantizer.init
    quantizer.build(None), clone.build(None)
    x = tf.constant(np.linspace(-3, 3, 41, dtype=np.float32))
    np.testing.assert_array_equal(clone.quantize_tensor(x).numpy(), quantizer.quantize_tensor(x).numpy())


def dataclasses_replace_init(spec):
    import dataclasses  # noqa: PLC0415

    return dataclasses.replace(spec, init={})


@pytest.mark.parametrize(
    ("family", "signed", "with_zero", "want"),
    [
        ("uniform", True, False, 2),  # {-d, 0, d}
        ("uniform", False, False, 1),  # {0, d}
        ("pow2", True, False, 2),  # sign + one exponent bit
        ("pow2", False, True, 2),  # zero + one exponent bit
        ("pow2", True, True, 3),  # sign + zero + one exponent bit
        ("pow2", False, False, 1),
    ],
)
def test_min_bits_rule(family, signed, with_zero, want):
    """The one minimum-bits rule: the quantizers' default lower bit bound and
    the error for a smaller ``min_bits`` both follow it."""
    assert quantizers.min_bits(family, signed, with_zero) == want
    cls = U3 if family == "uniform" else P3
    kw = {"with_zero": with_zero} if family == "pow2" else {}
    q = cls(signed=signed, role="activation", **kw)  # activation default min_bits is 1
    assert q.bounds["bits"] == (want, 8.0)
    assert q.spec.min_bits == want
    if want > 1:
        with pytest.raises(
            ValueError, match=f"needs at least {want} bits; got min_bits=1.0: use min_bits={want}"
        ):
            cls(signed=signed, role="activation", min_bits=1, **kw)
    else:
        assert cls(signed=signed, role="activation", min_bits=1, **kw).bounds["bits"] == (1.0, 8.0)


def test_spec_is_frozen_and_properties_read_it():
    q = P3(role="activation", signed=False)
    with pytest.raises(AttributeError):
        q.spec.signed = True
    assert (q.signed, q.role, q.with_zero, q.learn) == (False, "activation", True, ("q_min", "q_max"))
    assert q.bounds is q.spec.bounds
    u = U3(round_step=False)
    assert u.round_step is False and not hasattr(u, "with_zero")


def test_layer_constructors_shared():
    """QConv2D, QDepthwiseConv2D and QDense take their quantizer through one constructor."""
    for cls in (qlayers.QConv2D, qlayers.QDepthwiseConv2D, qlayers.QDense):
        assert "__init__" not in cls.__dict__
    conv = qlayers.QConv2D(2, 3, kernel_quantizer="P3")
    depth = qlayers.QDepthwiseConv2D(3, kernel_quantizer=keras.saving.serialize_keras_object(U1(init_bits=3)))
    dense = qlayers.QDense(4)
    assert isinstance(conv.kernel_quantizer, P3) and conv.kernel_quantizer.role == "weight"
    assert (
        isinstance(depth.kernel_quantizer, U1)
        and depth.kernel_quantizer.init["bits"] == 3
        and isinstance(dense.kernel_quantizer, U3)
    )
    for cls, args in ((qlayers.QConv2D, (2, 3)), (qlayers.QDepthwiseConv2D, (3,))):
        with pytest.raises(ValueError, match="channels_last"):
            cls(*args, data_format="channels_first")


@pytest.mark.parametrize(
    ("template", "want"),
    [
        (U3(signed=False, role="activation", min_bits=1), 2.0),  # signed weights: {-d, 0, d}
        (P3(signed=False, role="activation", with_zero=False, min_bits=1), 2.0),  # sign + exponent
        (P3(signed=False, role="activation", with_zero=True), 3.0),  # sign + zero + exponent
    ],
    ids=["U3", "P3", "P3-with-zero"],
)
def test_template_from_the_other_sign_gets_the_minimum_bits(template, want):
    """quantize_model's template rule reads the same minimum-bits rule."""
    float_model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    q = tfdq.quantize_model(float_model, weight_quantizer=template, quantize_input=False)
    (layer,) = qlayers.weight_quantized_layers(q)
    assert layer.kernel_quantizer.signed
    assert layer.kernel_quantizer.bounds["bits"] == (want, 8.0)
