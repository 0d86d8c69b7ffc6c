"""tf_keras twins of tfdq's reference models, and the tfmot QAT worker.

tfmot (``tensorflow-model-optimization``) quantizes ``tf_keras`` (Keras 2)
models only, so its side of the peer benchmarks runs in its own
environment, never in tfdq's test install::

    python3 -m venv .venv-peers
    .venv-peers/bin/pip install -e . "tf-keras==2.21.*" "dm-tree~=0.1.1" scipy mock six
    .venv-peers/bin/pip install --no-deps tensorflow-model-optimization==0.8.1

(``--no-deps`` for tfmot: its 0.8.1 wheel pins ``absl-py~=1.2`` while tfdq
and TensorFlow 2.21 need absl-py 2; with absl-py 2.x tfmot imports and runs.)
Every entry point sets ``TF_USE_LEGACY_KERAS=1`` before TensorFlow is
imported, as tfmot requires.

The models copy the architecture and the layer names of
:func:`tfdq.models.small_cnn` and :func:`tfdq.models.resnet20`, so float
weights trained in Keras 3 load layer by layer (:func:`load_weights`).
:func:`tfmot_quantize` applies tfmot's default 8-bit QAT scheme; the
ResNet-20 shortcut (subsample and zero channels, no weights) is annotated
with a no-op QuantizeConfig, its output keeping its input's scale.

The worker (``python -m benchmarks.tfkeras_models --task=...``, run by
``benchmarks/peers.py`` and ``benchmarks/latency.py`` as a subprocess with
the .venv-peers interpreter) writes a ``.tflite`` file and a JSON of
figures to ``--out_dir``:

* ``--task=mnist_qat``: small CNN on the MNIST subset; float weights from
  ``--weights`` (npz), QAT fine-tune, Keras accuracy, int8 conversion.
* ``--task=resnet20_qat``: ResNet-20 (weights from ``--weights``), a few
  QAT steps on generated inputs (a file for timing and size only), int8
  conversion.
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The architectures are written once, in tfdq.models, over a Keras-like namespace
# (Keras 3 there, tf_keras here); tfdq itself uses Keras 3, which TF_USE_LEGACY_KERAS
# leaves untouched.
from tfdq import models as tfdq_models  # noqa: E402


def _tfk():
    import tf_keras  # noqa: PLC0415

    return tf_keras


def _zero_pad_shortcut_class():
    tfk = _tfk()
    import tensorflow as tf  # noqa: PLC0415

    if hasattr(_zero_pad_shortcut_class, "cls"):
        return _zero_pad_shortcut_class.cls

    @tfk.utils.register_keras_serializable("tfdq_peers")
    class ZeroPadShortcut(tfk.layers.Layer):
        """tf_keras twin of :class:`tfdq.models.ZeroPadShortcut` (the same computation)."""

        def __init__(self, stride=2, extra_channels=0, **kwargs):
            super().__init__(**kwargs)
            self.stride = int(stride)
            self.extra_channels = int(extra_channels)

        def call(self, inputs):
            return tfdq_models.zero_pad_shortcut(inputs, self.stride, self.extra_channels, tf.pad)

        def compute_output_shape(self, input_shape):
            return tfdq_models.zero_pad_shortcut_shape(input_shape, self.stride, self.extra_channels)

        def get_config(self):
            config = super().get_config()
            config.update(stride=self.stride, extra_channels=self.extra_channels)
            return config

    _zero_pad_shortcut_class.cls = ZeroPadShortcut
    return ZeroPadShortcut


def small_cnn(input_shape=(28, 28, 1), num_classes=10):
    """tf_keras version of :func:`tfdq.models.small_cnn` (29,658 weights, same names)."""
    return tfdq_models.build_small_cnn(_tfk(), input_shape, num_classes)


def resnet20(input_shape=(32, 32, 3), num_classes=10):
    """tf_keras version of :func:`tfdq.models.resnet20` (268,346 weights, same names)."""
    return tfdq_models.build_resnet20(_tfk(), _zero_pad_shortcut_class(), input_shape, num_classes)


def save_weights(model, path):
    """Write a Keras 3 (or tf_keras) model's weights by layer name to an ``.npz``."""
    import numpy as np  # noqa: PLC0415

    arrays = {}
    for layer in model.layers:
        for i, w in enumerate(layer.get_weights()):
            arrays[f"{layer.name}:{i}"] = np.asarray(w)
    np.savez(path, **arrays)
    return path


def load_weights(model, path):
    """Set the weights saved by :func:`save_weights`, layer by layer by name."""
    import numpy as np  # noqa: PLC0415

    data = np.load(path)
    by_layer = {}
    for key in data.files:
        name, i = key.rsplit(":", 1)
        by_layer.setdefault(name, {})[int(i)] = data[key]
    for layer in model.layers:
        want = len(layer.get_weights())
        if not want:
            continue
        got = by_layer.pop(layer.name, None)
        if got is None or len(got) != want:
            raise ValueError(
                f"weights for layer {layer.name!r}: expected {want} arrays, found {0 if got is None else len(got)}"
            )
        layer.set_weights([got[i] for i in range(want)])
    if by_layer:
        raise ValueError(f"weights for unknown layers: {sorted(by_layer)}")
    return model


def tfmot_quantize(model):
    """tfmot's default 8-bit QAT model of ``model`` (the shortcut layer passes unquantized)."""
    import tensorflow_model_optimization as tfmot  # noqa: PLC0415

    tfk = _tfk()
    q = tfmot.quantization.keras
    shortcut_cls = _zero_pad_shortcut_class()

    class NoOpQuantizeConfig(q.QuantizeConfig):
        """No weights, no activation, no output quantizer: the output keeps its input's grid."""

        def get_weights_and_quantizers(self, layer):
            return []

        def get_activations_and_quantizers(self, layer):
            return []

        def set_quantize_weights(self, layer, quantize_weights):
            pass

        def set_quantize_activations(self, layer, quantize_activations):
            pass

        def get_output_quantizers(self, layer):
            return []

        def get_config(self):
            return {}

    if not any(isinstance(layer, shortcut_cls) for layer in model.layers):
        return q.quantize_model(model)

    def annotate(layer):
        if isinstance(layer, shortcut_cls):
            return q.quantize_annotate_layer(layer, quantize_config=NoOpQuantizeConfig())
        if isinstance(layer, tfk.layers.InputLayer):
            return layer
        return q.quantize_annotate_layer(layer)

    annotated = tfk.models.clone_model(model, clone_function=annotate)
    annotated.set_weights(model.get_weights())
    with q.quantize_scope({"NoOpQuantizeConfig": NoOpQuantizeConfig, "ZeroPadShortcut": shortcut_cls}):
        return q.quantize_apply(annotated)


def convert_int8(model):
    """tfmot's documented conversion: TFLiteConverter with the default optimizations."""
    import tensorflow as tf  # noqa: PLC0415

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return converter.convert()


def write_int8(model, out_dir, filename):
    """:func:`convert_int8` of ``model`` written to ``<out_dir>/<filename>``:
    ``{"tflite_path", "file_bytes"}``."""
    tflite = convert_int8(model)
    path = os.path.join(out_dir, filename)
    with open(path, "wb") as f:
        f.write(tflite)
    return {"tflite_path": path, "file_bytes": len(tflite)}


def versions():
    import tensorflow as tf  # noqa: PLC0415
    import tensorflow_model_optimization as tfmot  # noqa: PLC0415

    return {"tensorflow": tf.__version__, "tf_keras": _tfk().__version__, "tfmot": tfmot.__version__}


def _sparse_ce():
    return _tfk().losses.SparseCategoricalCrossentropy(from_logits=True)


def mnist_qat(weights, seed, epochs, lrs, batch_size, out_dir, train_limit=None):
    """Float weights -> tf_keras small CNN -> tfmot QAT fine-tune -> int8 ``.tflite``."""
    tfk = _tfk()
    from tfdq.data import mnist_subset  # noqa: PLC0415

    start = time.time()
    tfk.utils.set_random_seed(seed)
    (xt, yt), (xv, yv) = mnist_subset(0)
    if train_limit:
        xt, yt = xt[:train_limit], yt[:train_limit]
    model = small_cnn()
    load_weights(model, weights)
    model.compile(tfk.optimizers.Adam(1e-3), _sparse_ce(), metrics=["accuracy"])
    float_acc = float(model.evaluate(xv, yv, verbose=0)[1])
    qat = tfmot_quantize(model)
    history = {}
    for n_epochs, lr in zip(epochs, lrs):
        if n_epochs <= 0:
            continue
        qat.compile(tfk.optimizers.Adam(lr), _sparse_ce(), metrics=["accuracy"])
        h = qat.fit(xt, yt, batch_size=batch_size, epochs=n_epochs, verbose=0)
        for k, v in h.history.items():
            history.setdefault(k, []).extend(float(x) for x in v)
    qat_acc = float(qat.evaluate(xv, yv, verbose=0)[1])
    return {
        "float_accuracy_tf_keras": float_acc,
        "keras_accuracy": qat_acc,
        "qat_epochs": list(epochs),
        "qat_learning_rates": list(lrs),
        "history": history,
        **write_int8(qat, out_dir, "tfmot_mnist.tflite"),
        "seconds": time.time() - start,
        "versions": versions(),
    }


def resnet20_qat(weights, steps, batch_size, out_dir):
    """ResNet-20 with the given float weights -> tfmot QAT (a few steps on generated inputs) -> int8."""
    import numpy as np  # noqa: PLC0415

    tfk = _tfk()
    start = time.time()
    tfk.utils.set_random_seed(0)
    model = resnet20()
    if weights:
        load_weights(model, weights)
    qat = tfmot_quantize(model)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch_size, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=batch_size)
    qat.compile(tfk.optimizers.SGD(1e-3, momentum=0.9), _sparse_ce())
    for _ in range(steps):  # sets the QAT ranges; generated data: timing and size only
        qat.train_on_batch(x, y)
    return {
        **write_int8(qat, out_dir, "tfmot_resnet20_int8.tflite"),
        "qat_steps": steps,
        "seconds": time.time() - start,
        "versions": versions(),
    }


def main(argv):
    import argparse  # noqa: PLC0415

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", required=True, choices=["mnist_qat", "resnet20_qat"])
    p.add_argument("--weights", default="")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", default="4,2", help="QAT epochs per phase")
    p.add_argument("--lrs", default="1e-3,5e-4", help="Adam learning rate per phase")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="resnet20_qat: QAT steps")
    p.add_argument("--train_limit", type=int, default=0)
    args = p.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    if args.task == "mnist_qat":
        result = mnist_qat(
            args.weights,
            args.seed,
            [int(e) for e in args.epochs.split(",")],
            [float(v) for v in args.lrs.split(",")],
            args.batch_size,
            args.out_dir,
            args.train_limit or None,
        )
    else:
        result = resnet20_qat(args.weights, args.steps, args.batch_size, args.out_dir)
    with open(os.path.join(args.out_dir, f"{args.task}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
