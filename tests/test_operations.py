"""quantize_model on Functional graphs with Keras 3 operation nodes (keras.ops, tensor arithmetic)."""

import os

import keras
import numpy as np
import pytest

import tfdq
from tfdq import layers as qlayers
from tfdq import registry


def _ops_model():
    """Hard-swish, an SE gate and assorted keras.ops, written by hand."""
    inp = keras.Input((8, 8, 3), name="img")
    h = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inp)
    h = h * keras.ops.relu6(h + 3.0) * (1.0 / 6.0)  # hard-swish in tensor arithmetic
    s = keras.ops.mean(h, axis=(1, 2), keepdims=True)
    s = keras.ops.relu(keras.layers.Conv2D(4, 1, name="se_reduce")(s))
    s = keras.ops.hard_sigmoid(keras.layers.Conv2D(8, 1, name="se_expand")(s))
    h = h * s  # squeeze-and-excite gate
    a = keras.ops.hard_silu(keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(h))
    b = keras.ops.silu(keras.ops.clip(h, -1.0, 1.0))
    h = keras.ops.concatenate([a, keras.ops.maximum(b, keras.ops.minimum(a, 0.5))], axis=-1)
    h = keras.ops.sigmoid(h) - 0.5
    h = keras.ops.transpose(h, (0, 2, 1, 3)) / 2.0
    h = keras.ops.reshape(h, (-1, 8 * 8 * 16))
    out = keras.layers.Dense(5, name="head")(keras.ops.relu(h))
    return keras.Model(inp, out)


def standardize_batchnorms(model, x):
    """Set every BatchNorm's moving statistics to those of its input on ``x``.

    A randomly initialized deep network (MobileNetV3) otherwise shrinks its
    feature maps towards 0 layer after layer.
    """
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            v = keras.Model(model.inputs, layer.input)(x).numpy()
            axes = tuple(range(v.ndim - 1))
            layer.moving_mean.assign(v.mean(axis=axes))
            layer.moving_variance.assign(v.var(axis=axes))


def _with_quantized_kernels(model, qmodel):
    """A float copy of ``model`` whose kernels and biases are qmodel's Q(W), Q(b)."""
    ref = keras.models.clone_model(model)
    ref.set_weights(model.get_weights())
    for layer in qlayers.weight_quantized_layers(qmodel):
        kernel, bias = layer.quantized_weights()
        target = ref.get_layer(layer.name)
        target.kernel.assign(kernel)
        if bias is not None:
            target.bias.assign(bias)
    return ref


def test_hand_written_keras_ops_graph_clones_faithfully():
    model = _ops_model()
    x = np.random.default_rng(0).uniform(-1, 1, (6, 8, 8, 3)).astype(np.float32)
    q, report = tfdq.quantize_model(model, quantize_activations=False, init_bits=6, return_report=True)
    assert [r["name"] for r in report["quantized_layers"]] == ["stem", "se_reduce", "se_expand", "dw", "head"]
    assert report["float_layers"] == [] and report["unknown_operations"] == []
    # every operation node is in the clone, each as a new object of the same class
    orig_ops = sorted(type(l).__name__ for l, _ in tfdq.graph.model_nodes(model) if registry.is_operation(l))
    new_ops = [l for l, _ in tfdq.graph.model_nodes(q) if registry.is_operation(l)]
    assert sorted(type(l).__name__ for l in new_ops) == orig_ops
    assert not {id(l) for l in new_ops} & {id(l) for l, _ in tfdq.graph.model_nodes(model)}
    # the clone computes the original graph with quantized kernels
    ref = _with_quantized_kernels(model, q)
    np.testing.assert_allclose(q(x).numpy(), ref(x).numpy(), rtol=1e-5, atol=1e-5)


def test_operation_outputs_get_quantizers_with_the_right_sign():
    model = _ops_model()
    x = np.random.default_rng(0).uniform(0, 1, (8, 8, 8, 3)).astype(np.float32)
    q, report = tfdq.quantize_model(model, calibration_data=x, return_report=True)
    signs = {a["name"]: a["signed"] for a in report["activation_quantizers"]}
    assert signs["img_aq"] is False  # non-negative calibration data
    # se_reduce reads the mean of the hard-swish; the mean passes values through, so the quantizer
    # sits on the hard-swish output itself (a product with a signed factor): signed
    se_in = q.get_layer("se_reduce")._inbound_nodes[0].input_tensors[0]._keras_history.operation
    assert registry.lookup(se_in).rule == "mean"
    aq = se_in._inbound_nodes[0].input_tensors[0]._keras_history.operation
    assert isinstance(aq, qlayers.ActivationQuantizer) and aq.signed
    # relu op feeding se_expand: its quantizer is unsigned and absorbs the relu
    se_expand = q.get_layer("se_expand")
    src = se_expand._inbound_nodes[0].input_tensors[0]._keras_history.operation
    assert isinstance(src, qlayers.ActivationQuantizer) and not src.signed
    assert isinstance(src._inbound_nodes[0].input_tensors[0]._keras_history.operation, qlayers.QConv2D)
    assert np.all(np.isfinite(q(x).numpy()))


def test_quantized_ops_model_saves_and_loads(tmp_path):
    model = _ops_model()
    x = np.random.default_rng(1).uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
    q = tfdq.quantize_model(model, calibration_data=x)
    path = os.path.join(tmp_path, "ops.keras")
    q.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded(x).numpy(), q(x).numpy())


def test_unknown_operation_stays_float_and_is_reported():
    inp = keras.Input((6,))
    h = keras.layers.Dense(4, name="fc1")(inp)
    h = keras.ops.tanh(h) + keras.ops.abs(h)  # not in the registry
    out = keras.layers.Dense(2, name="fc2")(h)
    model = keras.Model(inp, out)
    x = np.random.default_rng(2).normal(size=(5, 6)).astype(np.float32)
    q, report = tfdq.quantize_model(model, quantize_activations=False, return_report=True)
    assert {r["class"] for r in report["unknown_operations"]} == {"Tanh", "Absolute"}
    ref = _with_quantized_kernels(model, q)
    np.testing.assert_allclose(q(x).numpy(), ref(x).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "minimalistic",
    # the minimalistic variant (8 s of CPU) is slow: its layers (ReLU, 3x3 kernels, no
    # squeeze-and-excite, no hard-swish) are all among the full variant's, cloned in the default run
    [False, pytest.param(True, marks=pytest.mark.slow)],
    ids=["full", "minimalistic"],
)
def test_mobilenetv3small_clones_every_operation(minimalistic):
    model = keras.applications.MobileNetV3Small(
        weights=None,
        input_shape=(32, 32, 3),
        include_top=False,
        pooling="avg",
        minimalistic=minimalistic,
        include_preprocessing=False,
    )
    n_kernels = sum(registry.is_quantizable(l) for l in model.layers)
    x = np.random.default_rng(3).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    standardize_batchnorms(model, x)
    q, report = tfdq.quantize_model(model, quantize_activations=False, init_bits=8, return_report=True)
    assert len(report["quantized_layers"]) == n_kernels and report["float_layers"] == []
    assert report["unknown_operations"] == []
    ref = _with_quantized_kernels(model, q)
    y, y_ref = q(x).numpy(), ref(x).numpy()
    assert np.max(np.abs(y_ref)) > 1e-3
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4 * np.max(np.abs(y_ref)))
