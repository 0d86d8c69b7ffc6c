"""BatchNorm re-estimation: exact pooled statistics, the fit hook, and the
user scenario of the README's Memory budgets recipe on a residual CNN."""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfdq
from tfdq import batchnorm


def _mlp(eps=1e-3):
    inputs = keras.Input((6,))
    x = keras.layers.Dense(5, name="d1")(inputs)
    x = keras.layers.BatchNormalization(epsilon=eps, name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Dense(4, name="d2")(x)
    x = keras.layers.BatchNormalization(epsilon=eps, name="bn2")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(x))


def _reference_stats(model, x, batch):
    """float64 NumPy: pooled mean/variance of bn1's and bn2's inputs when
    each batch runs in training mode (bn1 normalizing with batch moments)."""
    get = lambda name: [np.asarray(w, np.float64) for w in model.get_layer(name).get_weights()]  # noqa: E731
    w1, b1 = get("d1")
    g1, be1, _, _ = get("bn1")
    w2, b2 = get("d2")
    eps = model.get_layer("bn1").epsilon
    h1s, h2s = [], []
    for i in range(0, len(x), batch):
        xb = np.asarray(x[i : i + batch], np.float64)
        h1 = xb @ w1 + b1
        m, v = h1.mean(0), h1.var(0)
        a = np.maximum((h1 - m) / np.sqrt(v + eps) * g1 + be1, 0.0)
        h1s.append(h1)
        h2s.append(a @ w2 + b2)
    h1, h2 = np.concatenate(h1s), np.concatenate(h2s)
    return (h1.mean(0), h1.var(0)), (h2.mean(0), h2.var(0))


def test_recalibrate_gives_pooled_training_mode_statistics():
    model = _mlp()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)).astype(np.float32) * 2 + 1
    for layer in (model.get_layer("bn1"), model.get_layer("bn2")):  # non-trivial gamma/beta
        layer.gamma.assign(rng.uniform(0.5, 2.0, layer.gamma.shape))
        layer.beta.assign(rng.normal(size=layer.beta.shape))
    trainable_before = [v.numpy().copy() for v in model.trainable_variables]
    result = tfdq.recalibrate_batchnorm(model, x, batch_size=64)
    assert result["samples"] == 300 and result["layers"] == ["bn1", "bn2"]
    (m1, v1), (m2, v2) = _reference_stats(model, x, 64)
    for name, (m, v) in (("bn1", (m1, v1)), ("bn2", (m2, v2))):
        bn = model.get_layer(name)
        np.testing.assert_allclose(bn.moving_mean.numpy(), m, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(bn.moving_variance.numpy(), v, rtol=1e-4, atol=1e-5)
        assert bn.momentum == 0.99  # restored
    for before, v in zip(trainable_before, model.trainable_variables):
        np.testing.assert_array_equal(before, v.numpy())


def test_recalibrate_limits_samples_and_reads_datasets_and_tuples():
    model = _mlp()
    x = np.random.default_rng(1).normal(size=(200, 6)).astype(np.float32)
    y = np.zeros(200, np.int32)
    assert tfdq.recalibrate_batchnorm(model, x, batch_size=64, max_samples=100)["samples"] == 100
    (m1, v1), _ = _reference_stats(model, x[:100], 64)
    np.testing.assert_allclose(model.get_layer("bn1").moving_mean.numpy(), m1, rtol=1e-4, atol=1e-5)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(50).repeat()  # infinite: limited by max_samples
    assert tfdq.recalibrate_batchnorm(model, ds, max_samples=150)["samples"] == 150
    (m1, _), _ = _reference_stats(model, x[:150], 50)
    np.testing.assert_allclose(model.get_layer("bn1").moving_mean.numpy(), m1, rtol=1e-4, atol=1e-5)
    assert tfdq.recalibrate_batchnorm(model, (x, y), batch_size=50)["samples"] == 200


def test_frozen_batchnorm_is_left_alone_and_nonfinite_inputs_change_nothing():
    model = _mlp()
    bn1 = model.get_layer("bn1")
    bn1.trainable = False
    before = bn1.moving_mean.numpy().copy()
    x = np.random.default_rng(2).normal(size=(64, 6)).astype(np.float32)
    assert tfdq.recalibrate_batchnorm(model, x)["layers"] == ["bn2"]
    np.testing.assert_array_equal(bn1.moving_mean.numpy(), before)
    bn2 = model.get_layer("bn2")
    stats = bn2.moving_mean.numpy().copy()
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        tfdq.recalibrate_batchnorm(model, x)
    np.testing.assert_array_equal(bn2.moving_mean.numpy(), stats)
    with pytest.raises(ValueError, match="no inputs"):
        tfdq.recalibrate_batchnorm(model, x[:0])
    # inside fit, the callback warns instead of failing the whole fit
    callback = batchnorm.BatchNormRecalibration(x)
    callback.set_model(model)
    callback.on_epoch_begin(0)
    callback.on_train_end()
    assert "non-finite" in callback.last["error"]
    np.testing.assert_array_equal(bn2.moving_mean.numpy(), stats)


def _quantized_mlp():
    model = _mlp()
    q = tfdq.quantize_model(model, calibration_data=np.ones((8, 6), np.float32))
    q.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return q


def test_fit_reestimates_statistics_on_its_training_inputs():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(256, 6)).astype(np.float32)
    y = rng.integers(0, 3, 256).astype(np.int32)
    q = _quantized_mlp()
    q.fit(x, y, batch_size=32, epochs=2, verbose=0, validation_split=0.25)
    after_fit = [bn.moving_variance.numpy().copy() for bn in batchnorm.batchnorm_layers(q)]
    # the statistics are those of the training part (validation_split's first 75%)
    tfdq.recalibrate_batchnorm(q, x[:192], batch_size=32)  # fit's batch size
    for before, bn in zip(after_fit, batchnorm.batchnorm_layers(q)):
        np.testing.assert_allclose(bn.moving_variance.numpy(), before, rtol=1e-5)
    # opting out leaves Keras' moving averages (which lag: they differ)
    q.fit(x, y, batch_size=32, epochs=1, verbose=0, recalibrate_batchnorm=False)
    lagging = [bn.moving_variance.numpy().copy() for bn in batchnorm.batchnorm_layers(q)]
    tfdq.recalibrate_batchnorm(q, x[:192], batch_size=32)  # fit's batch size
    assert any(
        not np.allclose(a, bn.moving_variance.numpy(), rtol=1e-3)
        for a, bn in zip(lagging, batchnorm.batchnorm_layers(q))
    )


def test_fit_callback_runs_before_validation_and_checkpoints(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(128, 6)).astype(np.float32)
    y = rng.integers(0, 3, 128).astype(np.int32)
    q = _quantized_mlp()
    seen = []

    class Probe(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(self.model.get_layer("bn1").moving_mean.numpy().copy())

    own = batchnorm.BatchNormRecalibration(x, every_epoch=True)
    q.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[own, Probe()], validation_data=(x, y))
    assert own.last is not None and own.last["samples"] == 128
    tfdq.recalibrate_batchnorm(q, x)
    np.testing.assert_allclose(seen[-1], q.get_layer("bn1").moving_mean.numpy(), rtol=1e-5, atol=1e-6)


def test_fit_on_a_generator_warns_that_statistics_are_not_reestimated(caplog):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = rng.integers(0, 3, 64).astype(np.int32)
    q = _quantized_mlp()

    def gen():
        for i in range(0, 64, 16):
            yield x[i : i + 16], y[i : i + 16]

    with caplog.at_level(logging.WARNING, logger="tfdq"):
        q.fit(gen(), epochs=1, verbose=0)
    assert "recalibrate_batchnorm" in caplog.text


def _inverted_residuals(momentum=0.999):
    """A small MobileNetV2-style stack (expand 1x1, depthwise 3x3, linear 1x1
    projection, identity Adds, ReLU6) with keras.applications' BatchNorm
    momentum: right after building, the moving statistics (0 and 1) are far
    from the batch statistics that training mode normalizes with."""
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(8, 3, use_bias=False, name="stem")(inputs)
    h = keras.layers.BatchNormalization(momentum=momentum, name="stem_bn")(h)
    h = keras.layers.ReLU(6.0, name="stem_relu")(h)
    for i, (out, stride) in enumerate([(8, 1), (8, 1), (16, 2), (16, 1), (16, 1)]):
        c = h.shape[-1]
        y = keras.layers.Conv2D(4 * c, 1, use_bias=False, name=f"b{i}_expand")(h)
        y = keras.layers.BatchNormalization(momentum=momentum, name=f"b{i}_expand_bn")(y)
        y = keras.layers.ReLU(6.0, name=f"b{i}_expand_relu")(y)
        y = keras.layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False, name=f"b{i}_dw")(
            y
        )
        y = keras.layers.BatchNormalization(momentum=momentum, name=f"b{i}_dw_bn")(y)
        y = keras.layers.ReLU(6.0, name=f"b{i}_dw_relu")(y)
        y = keras.layers.Conv2D(out, 1, use_bias=False, name=f"b{i}_project")(y)
        y = keras.layers.BatchNormalization(momentum=momentum, name=f"b{i}_project_bn")(y)
        h = keras.layers.Add(name=f"b{i}_add")([h, y]) if stride == 1 and c == out else y
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(h))


def test_quantize_model_calibrates_with_the_statistics_training_will_use():
    """Stale moving statistics (an untrained or briefly trained MobileNetV2-style
    model) made the calibrated ranges clip nearly every activation in training
    mode; BatchNorms then divided near-constant maps by sqrt(epsilon) layer
    after layer and the first gradients reached 1e5 here (1e21 on
    keras.applications' MobileNetV2 at alpha 0.35): NaN within 3 steps."""
    from sklearn.datasets import load_digits  # noqa: PLC0415

    d = load_digits()
    x = np.repeat(d.images[:128, ..., None].astype(np.float32) / 16.0, 3, -1)  # one batch of 128
    y = d.target[:128].astype(np.int32)
    keras.utils.set_random_seed(0)
    model = _inverted_residuals()
    float_stats = [bn.moving_variance.numpy().copy() for bn in batchnorm.batchnorm_layers(model)]
    with pytest.warns(UserWarning, match="moving statistics .* far from"):
        q, report = tfdq.quantize_model(model, calibration_data=x, return_report=True)
    assert report["batchnorm"]["samples"] == 128 and report["batchnorm"]["max_std_ratio"] > 2
    # the float model keeps its own statistics
    for before, bn in zip(float_stats, batchnorm.batchnorm_layers(model)):
        np.testing.assert_array_equal(before, bn.moving_variance.numpy())
    # reference: every calibrated range from Keras' own training-mode forward pass
    # over the calibration batch (BatchNorm with the batch's moments)
    aqs = [a for a in tfdq.layers.activation_quantizer_layers(q) if a.name != "input_layer_aq"]
    probe = keras.Model(model.input, [model.get_layer(a.name[: -len("_aq")]).output for a in aqs])
    outs = probe(x, training=True)
    assert len(aqs) >= 15
    for a, out in zip(aqs, outs):
        got = a.quantizer.describe()
        n = 2.0 ** (got["bits"] - a.signed) - 1  # 4 bits, 8 on the Add operands
        want = 2.0 ** np.floor(np.log2(np.max(np.abs(np.asarray(out, np.float64))) / n))
        assert got["d"] == want, a.name
    # the quantized model holds those statistics: inference mode equals training mode on x
    bn = q.get_layer("b3_dw_bn")
    inner = keras.Model(model.input, model.get_layer("b3_dw").output)(x, training=True)
    np.testing.assert_allclose(
        bn.moving_variance.numpy(), np.var(inner, axis=(0, 1, 2)), rtol=1e-3, atol=1e-6
    )
    # and the first training step has sane gradients
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        value = loss(y[:64], q(x[:64], training=True))
    grads = [g for g in tape.gradient(value, q.trainable_variables) if g is not None]
    assert max(float(tf.reduce_max(tf.abs(g))) for g in grads) < 100.0
