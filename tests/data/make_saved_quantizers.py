"""Writes ``saved_quantizers_369a9df.keras`` and ``saved_quantizers_369a9df.npz``.

Run once with tfdq at commit 369a9df (before the quantizer base class was
split into a validated ``QuantizerSpec`` and the Keras layer)::

    PYTHONPATH=<tfdq checkout at 369a9df> python tests/data/make_saved_quantizers.py

The model holds every layer with a weight quantizer, activation quantizers,
all six parametrizations, both signs, with_zero, round_step=False and
non-default bounds, each quantizer initialized from its tensor and then
moved off its initial values, so that ``tests/test_quantizer_compat.py`` can
check that files saved before the split load with the same configuration,
the same parameters and the same outputs.
"""

import os
import sys

import keras
import numpy as np

import tfdq
from tfdq import layers as L
from tfdq import quantizers as Q

HERE = os.path.dirname(os.path.abspath(__file__))
STEM = os.path.join(HERE, "saved_quantizers_369a9df")


def build():
    keras.utils.set_random_seed(7)
    inp = keras.Input((8, 8, 2))
    x = L.ActivationQuantizer(Q.U3(signed=True, role="activation"), signed=True, name="aq_in")(inp)
    x = L.QConv2D(4, 3, padding="same", kernel_quantizer=Q.U1(), name="conv_u1")(x)
    x = keras.layers.ReLU()(x)
    x = L.ActivationQuantizer(Q.P3(signed=False, role="activation"), name="aq_p3")(x)
    x = L.QDepthwiseConv2D(3, kernel_quantizer=Q.P1(), name="dw_p1")(x)
    x = L.ActivationQuantizer(Q.U2(signed=False, role="activation", min_bits=2, max_bits=6), name="aq_u2")(x)
    x = L.QConv2D(3, 1, kernel_quantizer=Q.P3(min_bits=3, max_bits=5), name="conv_p3")(x)
    x = L.ActivationQuantizer("U3", signed=True, counted=False, name="aq_op")(x)
    x = keras.layers.Flatten()(x)
    x = L.QDense(6, kernel_quantizer=Q.P2(with_zero=True), name="dense_p2")(x)
    x = L.QDense(
        3, kernel_quantizer=Q.U3(min_bits=3, max_bits=6, round_step=False, init_bits=5), name="dense_u3"
    )(x)
    x = L.QDense(2, kernel_quantizer=Q.U2(learn=("q_max",), init_bits=2), name="dense_tqt")(x)
    model = keras.Model(inp, x)
    rng = np.random.default_rng(3)
    for layer in L.weight_quantized_layers(model):
        q = layer.kernel_quantizer
        q.initialize_from(layer.kernel.numpy(), bits=q.init["bits"] or 4.0)
        for name, var in q._param_vars.items():
            moved = var.numpy() + 0.4 if name == "bits" else var.numpy() * rng.uniform(0.6, 1.7)
            var.assign(moved)
    for layer in L.activation_quantizer_layers(model):
        layer.quantizer.initialize_from(np.array([3.0]), bits=4.0)
    return model


def quantizer_gradients(model, x):
    """``grad/<variable path>``: the gradient of a fixed loss of the outputs
    with respect to every quantizer variable (and every kernel)."""
    import tensorflow as tf

    weights = np.linspace(-1.0, 1.0, int(np.prod(model.output.shape[1:])), dtype=np.float32)
    with tf.GradientTape() as tape:
        y = model(x, training=True)
        loss = tf.reduce_sum(tf.reshape(y, (y.shape[0], -1)) * weights) + tf.reduce_sum(y * y)
    variables = list(model.trainable_variables)
    grads = tape.gradient(loss, variables)
    return {f"grad/{v.path}": np.asarray(g) for v, g in zip(variables, grads) if g is not None}


def main():
    model = build()
    x = np.random.default_rng(5).normal(size=(4, 8, 8, 2)).astype(np.float32)
    y = model.predict(x, verbose=0)
    params = {}
    for layer in L.weight_quantized_layers(model) + L.activation_quantizer_layers(model):
        q = layer.kernel_quantizer if hasattr(layer, "kernel_quantizer") else layer.quantizer
        for k, v in q.forward_params().items():
            params[f"{layer.name}/{k}"] = np.asarray(v)
    grads = quantizer_gradients(model, x)
    model.save(STEM + ".keras")
    np.savez(STEM + ".npz", x=x, y=y, **params, **grads)
    print("tfdq", tfdq.__version__, "from", tfdq.__file__, file=sys.stderr)


if __name__ == "__main__":
    main()
