"""quantize_model: cloning, placement, initialization, references, errors."""

import math
import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfdq
from tfdq import layers as qlayers
from tfdq import registry


def _uniform_ref(x, d, q_max, signed):
    """Float64 reference of the uniform quantizer (docs/method.md section 1)."""
    x = np.asarray(x, np.float64)
    c = np.clip(x, -q_max if signed else 0.0, q_max)
    return d * np.sign(c) * np.floor(np.abs(c) / d + 0.5)


def _mlp():
    inp = keras.Input((6,), name="x")
    h = keras.layers.Dense(5, activation="relu", name="fc1")(inp)
    out = keras.layers.Dense(3, name="fc2")(h)
    return keras.Model(inp, out)


def test_dense_model_matches_hand_written_quantized_computation():
    model = _mlp()
    x = np.random.default_rng(0).uniform(0, 2, size=(7, 6)).astype(np.float32)
    q = tfdq.quantize_model(model, calibration_data=x, quantize_output=True)
    aqs = {l.name: l for l in qlayers.activation_quantizer_layers(q)}
    assert sorted(aqs) == ["fc1_aq", "fc2_aq", "x_aq"]
    assert not aqs["x_aq"].signed and not aqs["fc1_aq"].signed  # non-negative input, ReLU
    # the logits: signed, 8 bits, not charged to activation budgets
    assert (
        aqs["fc2_aq"].signed and not aqs["fc2_aq"].counted and aqs["fc2_aq"].quantizer.describe()["bits"] == 8
    )

    def params(quantizer):
        p = quantizer.describe()
        return p["d"], p["q_max"]

    fc1, fc2 = q.get_layer("fc1"), q.get_layer("fc2")
    xq = _uniform_ref(x, *params(aqs["x_aq"].quantizer), signed=False)
    w1 = _uniform_ref(model.get_layer("fc1").kernel.numpy(), *params(fc1.kernel_quantizer), True)
    b1 = _uniform_ref(model.get_layer("fc1").bias.numpy(), *params(fc1.kernel_quantizer), True)
    h = np.maximum(xq @ w1 + b1, 0)
    hq = _uniform_ref(h, *params(aqs["fc1_aq"].quantizer), signed=False)
    w2 = _uniform_ref(model.get_layer("fc2").kernel.numpy(), *params(fc2.kernel_quantizer), True)
    b2 = _uniform_ref(model.get_layer("fc2").bias.numpy(), *params(fc2.kernel_quantizer), True)
    want = _uniform_ref(hq @ w2 + b2, *params(aqs["fc2_aq"].quantizer), signed=True)
    np.testing.assert_allclose(q(x).numpy(), want, rtol=1e-5, atol=1e-6)


def test_conv_layer_matches_float_conv_with_quantized_kernel():
    inp = keras.Input((8, 8, 3))
    out = keras.layers.Conv2D(4, 3, padding="same", name="c")(inp)
    model = keras.Model(inp, out)
    q = tfdq.quantize_model(model, quantize_activations=False)
    layer = q.get_layer("c")
    p = layer.kernel_quantizer.describe()
    kq = _uniform_ref(model.get_layer("c").kernel.numpy(), p["d"], p["q_max"], True)
    bq = _uniform_ref(model.get_layer("c").bias.numpy(), p["d"], p["q_max"], True)
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32)
    want = tf.nn.conv2d(x.astype(np.float64), kq, 1, "SAME").numpy() + bq
    np.testing.assert_allclose(q(x).numpy(), want, rtol=1e-5, atol=1e-5)


def test_weights_copied_and_quantizers_initialized_as_the_paper():
    model = tfdq.models.small_cnn()
    q = tfdq.quantize_model(model)
    for name in ("conv1", "conv2", "conv3", "logits"):
        layer = q.get_layer(name)
        assert isinstance(layer, qlayers.QuantizedWeightsMixin)
        w = model.get_layer(name).kernel.numpy()
        np.testing.assert_array_equal(layer.kernel.numpy(), w)
        p = layer.kernel_quantizer.describe()
        d = 2.0 ** math.floor(math.log2(np.abs(w).max() / 7))
        assert p["bits"] == 4 and p["d"] == d and p["q_max"] == 7 * d
    bn = q.get_layer("bn1")
    for a, b in zip(bn.weights, model.get_layer("bn1").weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_placement_follows_relu_through_pooling():
    q, report = tfdq.quantize_model(tfdq.models.small_cnn(), return_report=True)
    names = [a["name"] for a in report["activation_quantizers"]]
    # input image, and each ReLU (the last one reaches the Dense through GAP)
    # (and the logits: quantize_output's signed, uncounted quantizer)
    assert names == ["image_aq", "relu1_aq", "relu2_aq", "relu3_aq", "logits_aq"]
    assert all(not a["signed"] for a in report["activation_quantizers"][1:-1])
    assert (
        report["activation_quantizers"][-1]["output"] and not report["activation_quantizers"][-1]["counted"]
    )
    assert report["activation_quantizers"][0]["signed"]  # no calibration: input sign unknown
    assert report["float_layers"] == []


def test_resnet20_has_paper_layout():
    q, report = tfdq.quantize_model(tfdq.models.resnet20(), return_report=True)
    feature_maps = [a for a in report["activation_quantizers"] if a["name"] != "image_aq" and a["counted"]]
    assert len(feature_maps) == 19 and not any(a["signed"] for a in feature_maps)
    # plus one learned (uncounted) quantizer per residual branch and one on the pooled map
    extra = [a for a in report["activation_quantizers"] if not a["counted"] and not a["output"]]
    assert [a["name"] for a in report["activation_quantizers"] if a["output"]] == ["logits_aq"]
    assert sorted(a["name"] for a in extra if a["signed"]) == sorted(
        f"s{s}b{b}b_bn_aq" for s in (1, 2, 3) for b in (1, 2, 3)
    ) and [a["name"] for a in extra if not a["signed"]] == ["pool_aq"]
    assert len(report["quantized_layers"]) == 20
    rows = tfdq.summary(q, print_fn=None)
    total = rows[-1]
    assert total["weight_count"] == 268346
    assert total["activation_kb_sum"] == pytest.approx(92.0)
    assert total["activation_kb_max"] == pytest.approx(8.0)


@pytest.mark.parametrize(
    "build, shape",
    [
        (
            lambda: keras.applications.MobileNetV2(weights=None, input_shape=(64, 64, 3), classes=10),
            (64, 64, 3),
        ),
        (lambda: keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10), (64, 64, 3)),
    ],
    ids=["MobileNetV2", "ResNet50"],
)
def test_keras_applications_quantize_and_run(build, shape):
    model = build()
    n_supported = sum(registry.is_quantizable(l) for l in model.layers)
    q, report = tfdq.quantize_model(model, return_report=True)
    assert len(report["quantized_layers"]) == n_supported
    assert report["float_layers"] == []
    x = np.random.default_rng(0).uniform(-1, 1, size=(2,) + shape).astype(np.float32)
    y = q(x).numpy()
    assert y.shape == (2, 10) and np.all(np.isfinite(y))
    # every quantized layer reads a quantized input
    for layer in q.layers:
        if isinstance(layer, qlayers.QuantizedWeightsMixin):
            src = layer._inbound_nodes[0].input_tensors[0]._keras_history.operation
            while not isinstance(src, qlayers.ActivationQuantizer):
                assert registry.lookup(src).role == registry.PASS_THROUGH
                src = src._inbound_nodes[0].input_tensors[0]._keras_history.operation


def test_relu6_and_linear_bottleneck_signs():
    q, report = tfdq.quantize_model(
        keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10), return_report=True
    )
    signs = {a["name"]: a["signed"] for a in report["activation_quantizers"]}
    assert signs["block_1_expand_relu_aq"] is False  # ReLU6 output
    assert signs["block_1_project_BN_aq"] is True  # linear bottleneck
    assert signs["block_2_add_aq"] is True


def test_unsupported_layers_stay_float_and_strict_refuses():
    inp = keras.Input((10, 4))
    x = keras.layers.Conv1D(3, 3, name="conv1d")(inp)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(2, name="head")(x)
    model = keras.Model(inp, out)
    with pytest.warns(UserWarning, match="conv1d"):
        q, report = tfdq.quantize_model(model, return_report=True)
    assert report["float_layers"] == [{"name": "conv1d", "class": "Conv1D"}]
    assert isinstance(q.get_layer("head"), qlayers.QDense)
    with pytest.raises(ValueError, match="conv1d"):
        tfdq.quantize_model(model, strict=True)


def _sequential():
    return keras.Sequential(
        [
            keras.Input((12, 12, 1)),
            keras.layers.Conv2D(4, 3, activation="relu", name="c1"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(3, name="d1"),
        ],
        name="seq",
    )


def test_loaded_sequential_quantizes_like_one_built_in_code(tmp_path):
    model = _sequential()
    path = os.path.join(tmp_path, "seq.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    x = np.random.default_rng(0).uniform(size=(3, 12, 12, 1)).astype(np.float32)
    q1 = tfdq.quantize_model(model, calibration_data=x)
    q2 = tfdq.quantize_model(loaded, calibration_data=x)
    assert [type(l).__name__ for l in q1.layers] == [type(l).__name__ for l in q2.layers]
    np.testing.assert_allclose(q1(x).numpy(), q2(x).numpy(), rtol=1e-6, atol=1e-6)
    assert isinstance(q2.get_layer("c1"), qlayers.QConv2D)


def test_nested_sequential_backbone_is_quantized_through_the_nesting():
    backbone = _sequential()
    inp = keras.Input((12, 12, 1))
    out = keras.layers.Dense(2, name="head")(keras.layers.ReLU(name="r")(backbone(inp)))
    model = keras.Model(inp, out)
    q, report = tfdq.quantize_model(model, return_report=True)
    names = {r["name"] for r in report["quantized_layers"]}
    assert names == {"c1", "d1", "head"}
    inner = [l for l in q.layers if isinstance(l, keras.Model)][0]
    assert isinstance(inner.get_layer("c1"), qlayers.QConv2D)
    assert any(isinstance(l, qlayers.ActivationQuantizer) for l in inner.layers)
    x = np.random.default_rng(0).uniform(size=(2, 12, 12, 1)).astype(np.float32)
    np.testing.assert_array_equal(
        inner.get_layer("c1").kernel.numpy(), backbone.get_layer("c1").kernel.numpy()
    )
    assert np.all(np.isfinite(q(x).numpy()))
    assert len(qlayers.weight_quantized_layers(q)) == 3


def test_save_and_load_give_identical_outputs_and_parameters(tmp_path):
    x = np.random.default_rng(0).uniform(size=(16, 28, 28, 1)).astype(np.float32)
    q = tfdq.quantize_model(tfdq.models.small_cnn(), weight_quantizer="P3", calibration_data=x)
    q.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(x, np.arange(16) % 10, epochs=1, verbose=0)
    path = os.path.join(tmp_path, "q.keras")
    q.save(path)
    r = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(r(x).numpy(), q(x).numpy())
    assert [w.name for w in r.weights] == [w.name for w in q.weights]
    for a, b in zip(r.weights, q.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert isinstance(r.get_layer("conv1").kernel_quantizer, tfdq.quantizers.P3)


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.d = keras.layers.Dense(2)

    def call(self, x):
        return self.d(x)


def test_bad_input_gets_clear_errors():
    sub = _Subclassed()
    sub(np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="functional API"):
        tfdq.quantize_model(sub)
    with pytest.raises(ValueError, match="not built"):
        tfdq.quantize_model(keras.Sequential([keras.layers.Dense(2)]))
    with pytest.raises(ValueError, match="Unknown parametrization"):
        tfdq.quantize_model(_mlp(), weight_quantizer="U4")
    with pytest.raises(ValueError, match="min_bits"):
        tfdq.quantize_model(_mlp(), weight_bits=(8, 2))
    with pytest.raises(ValueError, match=r"\[1, 32\]"):
        tfdq.quantize_model(_mlp(), weight_bits=(2, 40))
    broken = _mlp()
    k = broken.get_layer("fc1").kernel
    k.assign(np.where(np.arange(k.shape[1]) == 0, np.nan, k.numpy()))
    with pytest.raises(ValueError, match="fc1.*non-finite"):
        tfdq.quantize_model(broken)
    with pytest.raises(TypeError, match="keras.Model"):
        tfdq.quantize_model("model.keras")


@pytest.mark.slow  # ResNet-20 training steps at two learning rates, about a minute on 2 cores
def test_sgd_at_paper_learning_rates_stays_finite_on_resnet20():
    """Plain SGD at lr 0.01-0.1 on a quantized ResNet-20: no NaN, d stays valid.

    (Shape check of training stability on generated inputs, not an accuracy
    claim.)
    """
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, size=32)
    for lr in (0.01, 0.1):
        q = tfdq.quantize_model(tfdq.models.resnet20(), calibration_data=x[:8])
        q.compile(
            keras.optimizers.SGD(lr, momentum=0.9),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            history = q.fit(x, y, batch_size=16, epochs=3, verbose=0)
        assert np.all(np.isfinite(history.history["loss"]))
        for layer in qlayers.weight_quantized_layers(q):
            p = layer.kernel_quantizer.describe()
            assert 2.0**-8 <= p["d"] <= 1.0 and p["d"] <= p["q_max"] and 2 <= p["bits"] <= 8
            d_var = float(layer.kernel_quantizer.param("d").numpy())
            assert 2.0**-8 <= d_var <= 1.0


@pytest.mark.parametrize("weight_q,act_q", [("U3", "U3"), ("P3", "U2")])
def test_fused_quantizer_kernels_train_exactly_like_plain_ops(weight_q, act_q):
    """The XLA-fused quantizer passes (tfdq.config fused, the default) and the
    plain TensorFlow ops give the same forward values bit for bit and the
    same gradients (the parameter sums may differ in summation order)."""

    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 12, 12, 3)).astype("float32")
    y = rng.integers(0, 10, size=16)
    float_model = keras.Sequential(
        [
            keras.Input((12, 12, 3)),
            keras.layers.Conv2D(8, 3, use_bias=False, name="c1"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.ReLU(name="r1"),
            keras.layers.Conv2D(8, 3, name="c2"),  # linear: a signed quantizer follows
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10, name="head"),
        ]
    )
    results = []
    for fused in (True, False):
        with tfdq.config.settings(fused=fused):
            q = tfdq.quantize_model(
                float_model, weight_quantizer=weight_q, activation_quantizer=act_q, calibration_data=x
            )
            loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

            @tf.function
            def step(q=q):
                with tf.GradientTape() as tape:
                    out = q(x, training=True)
                    loss = loss_fn(y, out)  # noqa: B023 (traced and called in this iteration)
                return out, tape.gradient(loss, q.trainable_variables)

            out, grads = step()
            results.append((out.numpy(), [g.numpy() for g in grads]))
    (out_f, grads_f), (out_p, grads_p) = results
    np.testing.assert_array_equal(out_f, out_p)
    assert len(grads_f) == len(grads_p)
    for gf, gp in zip(grads_f, grads_p):
        np.testing.assert_allclose(gf, gp, rtol=1e-4, atol=1e-6)


def test_unsigned_quantizer_absorbs_the_relu_it_follows(monkeypatch):
    """Q(relu(x)) = Q(x) for a quantizer that clips at 0: the ReLU leaves the
    quantized graph, and outputs and gradients are those of the graph that
    keeps it."""
    float_model = tfdq.models.resnet20()
    x = np.random.default_rng(1).normal(size=(8, 32, 32, 3)).astype("float32")
    y = np.arange(8) % 10
    for layer in float_model.layers:  # a channel that is 0 for the whole batch stays 0 with beta = 0
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.beta.assign(np.random.default_rng(2).normal(0, 0.1, layer.beta.shape))
    q = tfdq.quantize_model(float_model, calibration_data=x)
    relus = [l for l in q.layers if isinstance(l, keras.layers.ReLU)]
    assert sorted(l.name for l in relus) == sorted(f"s{s}b{b}_relu" for s in (1, 2, 3) for b in (1, 2, 3))
    for layer in q.layers:  # each feature-map quantizer reads a BatchNorm or a kept ReLU after an Add
        if isinstance(layer, qlayers.ActivationQuantizer) and layer.name not in (
            "image_aq",
            "pool_aq",
            "logits_aq",
        ):
            src = layer._inbound_nodes[0].input_tensors[0]._keras_history.operation
            assert isinstance(src, (keras.layers.BatchNormalization, keras.layers.ReLU)), (layer.name, src)
    monkeypatch.setattr(tfdq.quantize, "_relu_input", lambda t: t)
    kept = tfdq.quantize_model(float_model, calibration_data=x)
    relus = [l for l in kept.layers if isinstance(l, keras.layers.ReLU)]
    assert len(relus) == 19
    # The gradients can differ only where a ReLU input is exactly 0 (ReLU's
    # gradient there is 0, the quantizer's 1). Residual sums, often exactly 0
    # (both operands lie on learned grids), keep their ReLU in both models.
    relu_inputs = keras.Model(kept.input, [l.input for l in relus])(x, training=True)
    after_add = [
        isinstance(l._inbound_nodes[0].input_tensors[0]._keras_history.operation, keras.layers.Add)
        for l in relus
    ]
    zeros = [int(np.sum(np.asarray(t) == 0)) for t, a in zip(relu_inputs, after_add) if not a]
    assert sum(zeros) == 0, [
        (l.name, z) for l, z in zip([r for r, a in zip(relus, after_add) if not a], zeros) if z
    ]
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    outs = []
    for model in (q, kept):
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            loss = loss_fn(y, out)
        grads = tape.gradient(loss, model.trainable_variables)
        outs.append((out.numpy(), {v.path: g.numpy() for v, g in zip(model.trainable_variables, grads)}))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    assert outs[0][1].keys() == outs[1][1].keys()
    for name, g in outs[0][1].items():
        np.testing.assert_allclose(g, outs[1][1][name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_calibration_stats_reduced_in_graph_equal_the_maps_own():
    # the probe reduces each map to per-example max |x| and min inside the graph (memory); the
    # statistics must equal those of the full maps, computed here in NumPy, over several
    # predict batches (40 examples: batches of 32 and 8)
    from tfdq.quantize import _calibration_stats  # noqa: PLC0415

    inp = keras.Input((6, 6, 2), name="x")
    h = keras.layers.Conv2D(3, 3, name="conv")(inp)
    f = keras.layers.Flatten(name="flat")(h)
    out = keras.layers.Dense(4, name="fc")(f)
    model = keras.Model(inp, out)
    x = np.random.default_rng(1).normal(0, 1, size=(40, 6, 6, 2)).astype(np.float32)
    x[37, 2, 3, 1] = -9.0  # extremes in the last, short batch
    x[38, 0, 0, 0] = 7.5
    tensors = [inp, h, out]
    maps = keras.Model(inp, tensors).predict(x, batch_size=40, verbose=0)
    want = [(float(np.max(np.abs(m.astype(np.float64)))), float(np.min(m))) for m in maps]
    assert _calibration_stats(model, tensors, x) == want
    assert want[0] == (9.0, -9.0)
