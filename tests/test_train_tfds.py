"""CIFAR-10 and ImageNet pipelines and models, on tfds.testing.mock_data (no network).

The mock yields random images with the real feature specs (CIFAR 32x32x3,
ImageNet of random sizes, encoded): the pipelines, the models built by the
script and a few training steps run exactly as on the real data sets.
"""

import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from _train_helpers import run_on_mock

from tfdq.train import data as data_lib
from tfdq.train import models as models_lib


def test_cifar10_pipeline_shapes_augmentation_and_determinism():
    with tfds.testing.mock_data(num_examples=16):
        d = data_lib.load("cifar10", 4, seed=3, calibration_examples=8)
    assert d.input_shape == (32, 32, 3) and d.num_classes == 10
    assert d.steps_per_epoch == 4 and d.calibration.shape == (8, 32, 32, 3)
    x, y = next(iter(d.train))
    assert x.shape == (4, 32, 32, 3) and x.dtype == tf.float32 and y.shape == (4,)
    # per-channel normalization: values are (x/255 - mean) / std
    lo = (0.0 - np.array(data_lib.CIFAR10_MEAN)) / np.array(data_lib.CIFAR10_STD)
    hi = (1.0 - np.array(data_lib.CIFAR10_MEAN)) / np.array(data_lib.CIFAR10_STD)
    assert np.all(x.numpy() >= lo - 1e-5) and np.all(x.numpy() <= hi + 1e-5)
    # the stream is a function of the position: a new iterator, or one that
    # starts at batch 5, gives the same batches
    first = [b[0].numpy() for b in d.train.take(7)]
    again = [b[0].numpy() for b in d.train.take(7)]
    later = [b[0].numpy() for b in d.train_from(5).take(2)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert np.array_equal(first[5], later[0]) and np.array_equal(first[6], later[1])
    # passes differ (new order and augmentation): batch 0 of pass 1 != of pass 0
    assert not np.array_equal(first[0], first[4])


@pytest.mark.parametrize("input_range", ["normalized", "minus1_1"])
def test_cifar_augmentation_is_scale_then_pad_crop_flip(input_range):
    image = tf.reshape(tf.range(32 * 32 * 3, dtype=tf.int32) % 251, (32, 32, 3))
    image = tf.cast(image, tf.uint8)
    outs = [
        data_lib.cifar_train_transform(image, 0, tf.constant([1, i], tf.int64), input_range=input_range)[0]
        for i in range(20)
    ]
    plain = data_lib.cifar_eval_transform(image, 0, input_range=input_range)[0].numpy()
    pixels = image.numpy().astype(np.float64) / 255.0
    if input_range == "minus1_1":  # the reference code's (x/255 - 0.5) * 2
        expected = (pixels - 0.5) * 2.0
    else:
        expected = (pixels - np.array(data_lib.CIFAR10_MEAN)) / np.array(data_lib.CIFAR10_STD)
    np.testing.assert_allclose(plain, expected, rtol=1e-5, atol=1e-5)
    assert all(o.shape == (32, 32, 3) for o in outs)
    assert any(not np.allclose(o, plain) for o in outs)  # shifted and/or flipped
    # padding comes after scaling, as in the reference code: zeros of the scaled image
    assert any(np.allclose(o.numpy()[0], 0.0) or np.allclose(o.numpy()[-1], 0.0) for o in outs)
    # every output is a window of the padded, scaled image, possibly mirrored
    padded = np.pad(plain, ((4, 4), (4, 4), (0, 0)))
    windows = [padded[r : r + 32, c : c + 32] for r in range(9) for c in range(9)]
    for o in outs:
        o = o.numpy()
        assert any(np.allclose(o, w, atol=1e-6) or np.allclose(o[:, ::-1], w, atol=1e-6) for w in windows)


def test_imagenet_pipeline_random_resized_crop_and_center_crop():
    with tfds.testing.mock_data(num_examples=8):
        d = data_lib.load("imagenet2012", 4, image_size=64, calibration_examples=4)
    assert d.input_shape == (64, 64, 3) and d.num_classes == 1000
    x, y = next(iter(d.train))
    assert x.shape == (4, 64, 64, 3) and x.dtype == tf.float32
    xv, yv = next(iter(d.val))
    assert xv.shape == (4, 64, 64, 3)
    assert d.calibration.shape == (4, 64, 64, 3)
    # center crop of a 100 x 50 image to 32: shorter side -> 37, crop 32 x 32
    image = tf.cast(tf.random.uniform((100, 50, 3), 0, 255, seed=1), tf.uint8)
    out, _ = data_lib.imagenet_eval_transform(32)(image, 0)
    assert out.shape == (32, 32, 3)
    out, _ = data_lib.imagenet_train_transform(32)(image, 0, tf.constant([0, 1], tf.int64))
    assert out.shape == (32, 32, 3)


@pytest.mark.slow
def test_cifar10_resnet20_float_steps_on_mock_data(tmp_path):
    """The float stage on mocked CIFAR-10 (10 s of CPU). In the default run: the same stage, its
    outputs and selection end to end on MNIST (test_train_mnist.py), the CIFAR-10 recipe's flags
    and its quantized stage from a script-built ResNet-20
    (test_train_recipes.py::test_cifar10_recipe_quantizes_as_the_reference_on_mock_data)."""
    s = run_on_mock(tmp_path, "cifar10", float_epochs=1, steps_per_epoch=2, stages="float")
    run = tmp_path / "run"
    assert s["model"] == "resnet20" and 0.0 <= s["float_accuracy"] <= 1.0
    assert (run / "float" / "final.keras").exists()
    with open(run / "flags.json") as f:
        flags = json.load(f)
    assert flags["optimizer"] == "sgd" and flags["weight_decay"] == 2e-4  # the paper's recipe
    with open(run / "float" / "history.json") as f:
        assert [h["epoch"] for h in json.load(f)] == [1]


@pytest.mark.slow
def test_cifar10_resnet20_float_quant_export_on_mock_data(tmp_path):
    s = run_on_mock(
        tmp_path,
        "cifar10",
        float_epochs=1,
        quant_epochs=1,
        steps_per_epoch=2,
        export_examples=8,
        target_weight_kb=200.0,
        target_activation_kb=8.0,
    )
    run = tmp_path / "run"
    assert s["model"] == "resnet20"
    assert (run / "float" / "final.keras").exists() and (run / "quant" / "final.keras").exists()
    assert 0.0 <= s["quant_accuracy"] <= 1.0
    assert s["constraints_met"].keys() == {"weight", "activation"}
    assert "tflite_accuracy" in s or s.get("export_note")


def test_resnet20_built_by_the_script_has_the_papers_268346_weights():
    import tfdq

    model = models_lib.configure(
        models_lib.build("resnet20", (32, 32, 3), 10), bn_momentum=0.9, bn_epsilon=1e-5
    )
    assert models_lib.counted_weights(model) == 268_346
    bns = [l for l in model.layers if isinstance(l, tf.keras.layers.BatchNormalization)]
    assert len(bns) == 19 and all(l.momentum == 0.9 and l.epsilon == 1e-5 for l in bns)  # the reference's BN
    q = tfdq.quantize_model(model, quantize_input=False)
    total = tfdq.summary(q, print_fn=None)[-1]
    assert total["weight_count"] == 268_346
    # the paper's sizes: 32-bit weights 1048 kB; 4-bit start 131 kB; 19 activation quantizers after ReLUs
    assert 268_346 * 32 / 8 / 1024 == pytest.approx(1048.2, abs=0.1)
    assert total["weight_kb"] == pytest.approx(268_346 * 4 / 8 / 1024)
    assert total["activation_kb_sum"] == pytest.approx(188_416 * 4 / 8 / 1024)
    assert total["activation_kb_max"] == pytest.approx(16 * 32 * 32 * 4 / 8 / 1024)
    assert len([a for a in tfdq.layers.activation_quantizer_layers(q) if a.counted]) == 19  # the paper's maps


@pytest.mark.parametrize("on", ["all", "kernels", "kernels_except_depthwise"])
def test_weight_decay_reaches_the_variables_of_its_scope_as_the_reference_solver(on):
    import tfdq

    model = tf.keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10)
    q = tfdq.quantize_model(models_lib.configure(model), quantize_input=False)
    n = models_lib.apply_weight_decay(q, 2e-4, on)
    decayed = {id(v) for v in models_lib.decayed_variables(q, on)}
    assert n == len(decayed) > 0
    names = {v.path for v in q.trainable_variables if id(v) in decayed}
    depthwise = {l.kernel.path for l in q.layers if isinstance(l, tfdq.layers.QDepthwiseConv2D)}
    quantizer_params = {v.path for l in q.quantizers() for v in l.trainable_variables}
    bn = {v.path for v in q.trainable_variables if v.path.endswith(("gamma", "beta"))}
    if on == "all":
        assert names == {v.path for v in q.trainable_variables}
        assert quantizer_params and quantizer_params <= names and bn <= names
    else:
        assert not (quantizer_params & names) and not (bn & names)
        assert depthwise and (depthwise <= names) == (on == "kernels")
        assert not (depthwise & names) or on == "kernels"
    # the solver's rule: the gradient gets + wd * w (coupled L2 of wd / 2), no more
    with tf.GradientTape() as tape:
        reg = tf.add_n(q.losses)
    grads = tape.gradient(reg, q.trainable_variables)
    for v, g in zip(q.trainable_variables, grads):
        if id(v) in decayed:
            np.testing.assert_allclose(g.numpy(), 2e-4 * v.numpy(), rtol=1e-5, atol=1e-12)
        else:
            assert g is None or not np.any(g.numpy())
    # nothing is saved into the layers' configs
    assert all(l.get_config().get("kernel_regularizer") is None for l in q.layers)


def test_imagenet_models_weight_counts():
    # the paper's Table 4: ResNet-18 44.56 MB, MobileNetV2 13.23 MB of 32-bit weights
    r18 = models_lib.build("resnet18", (224, 224, 3), 1000)
    assert models_lib.counted_weights(r18) == 11_679_912
    assert models_lib.counted_weights(r18) * 4 / 1024**2 == pytest.approx(44.56, abs=0.01)
    assert not any(isinstance(l, tf.keras.layers.Lambda) for l in r18.layers)
    mnv2 = models_lib.build("mobilenetv2", (224, 224, 3), 1000)
    assert models_lib.counted_weights(mnv2) * 4 / 1024**2 == pytest.approx(13.23, abs=0.02)


@pytest.mark.parametrize(
    "model",
    [
        "resnet18",
        # slow (24 s of CPU, most of it building and compiling the training step): the default run
        # trains resnet18 through the same ImageNet pipeline and loop; MobileNetV2's structure is
        # checked by test_imagenet_models_weight_counts, its quantization and weight decay by
        # test_weight_decay_reaches_the_variables_of_its_scope_as_the_reference_solver
        pytest.param("mobilenetv2", marks=pytest.mark.slow),
    ],
)
def test_imagenet_models_train_on_mock_data(tmp_path, model):
    s = run_on_mock(tmp_path, "imagenet2012", model=model, float_epochs=1, stages="float")
    assert s["model"] == model and (tmp_path / "run" / "float" / "final.keras").exists()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet18", "mobilenetv2"])
def test_imagenet_float_and_quant_steps_on_mock_data(tmp_path, model):
    s = run_on_mock(
        tmp_path,
        "imagenet2012",
        model=model,
        float_epochs=1,
        quant_epochs=1,
        stages="float,quant",
        target_weight_kb=4000.0,
    )
    run = tmp_path / "run"
    assert (run / "quant" / "bitwidths.png").exists()
    assert s["constraints_met"].keys() == {"weight"}
    # lambda follows the paper's ImageNet rule: 0.1 (1048 kB / float kB)^2
    import keras

    q = keras.models.load_model(run / "quant" / "final.keras", compile=False)
    float_kb = (
        models_lib.counted_weights(keras.models.load_model(run / "float" / "final.keras", compile=False))
        / 256
    )
    assert q.memory_budget.weight_lambda == pytest.approx(0.1 * (1048 / float_kb) ** 2)
