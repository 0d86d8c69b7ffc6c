"""HGQ2 and QKeras (v3) twins of tfdq's small CNN, and their training worker.

HGQ2 (PyPI ``hgq2``) and QKeras for Keras 3 (PyPI ``qkeras-v3``) are not
tfdq dependencies, and the two cannot share one ``site-packages``: hgq2
0.2.0 ships a compatibility package ``qkeras/qlayers/`` that shadows
``qkeras/qlayers.py`` of qkeras-v3 (``import qkeras`` then fails). So they
run in their own environment, qkeras-v3 from its own folder put first on
``sys.path`` (``--qkeras_path``)::

    python3 -m venv .venv-hgq
    .venv-hgq/bin/pip install "tensorflow==2.21.*" "keras==3.15.1" hgq2==0.2.0 qkeras-v3==1.2.1
    .venv-hgq/bin/pip install --no-deps --target .venv-hgq/qkeras-v3 qkeras-v3==1.2.1

(the first command brings qkeras-v3's dependencies, the second an intact
copy of its package.)

This module imports neither tfdq nor anything outside that environment: the
tfdq side (``benchmarks/peers_hgq.py``) passes the data and the float
weights as ``.npz`` files and reads back a JSON of figures and the
``.tflite`` files this worker tries to write.

* ``--task=hgq``: the small CNN with HGQ2's ``QConv2D`` / ``QDense``
  (per-weight learned bitwidths, learned input quantizers, HGQ2's default
  configuration otherwise: the 10 classifier biases keep HGQ2's default
  bias quantizer, 8 bits + sign at the start), float BatchNorm/ReLU/MaxPool/Flatten as in
  tfdq's model. HGQ2's cost is its EBOPs (bit operations) times a factor
  beta; beta is steered by HGQ2's own PID controller (``hgq.utils.sugar``'s
  ``PID`` in log space, as its ``BetaPID``) but on the stored weight bits
  and every ``--control_every`` steps instead of once per epoch, so that the
  weight memory lands at ``--target_bits`` in a short run.
* ``--task=qkeras``: the same CNN with QKeras' ``QConv2D`` / ``QDense`` and
  ``quantized_bits(bits, 0, alpha="auto_po2")`` kernels and bias (fixed
  ``--bits``; per-channel power-of-two scales), float activations.

Stored bits: HGQ2's ``bits`` of a weight (its ``b``) excludes the sign bit
(``b = 1`` holds {-0.5, 0, 0.5} x 2^i, three levels), so a weight is
charged ``b + k`` bits (``k`` = 1 for signed) when ``b > 0`` and nothing at
``b = 0`` (the weight is zero, pruned). tfdq and QKeras count the sign in
their bitwidth (2 bits: three levels), so the three count alike.
"""

import json
import math
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

LAYER_FILTERS = (16, 32, 32)


def _keras():
    import keras  # noqa: PLC0415

    return keras


def build_small_cnn(conv, dense, input_shape=(28, 28, 1), num_classes=10):
    """tfdq's small CNN (same layers and names) with ``conv(filters, name)`` / ``dense(units, name)``."""
    keras = _keras()
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    for i, filters in enumerate(LAYER_FILTERS):
        x = conv(filters, f"conv{i + 1}")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3, name=f"bn{i + 1}")(x)
        x = keras.layers.ReLU(name=f"relu{i + 1}")(x)
        if i < 2:
            x = keras.layers.MaxPooling2D(name=f"pool{i + 1}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = dense(num_classes, "logits")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


def load_float_weights(model, path):
    """Kernels, biases and BatchNorm arrays from tfdq's ``save_weights`` npz (``layer:i`` keys)."""
    import numpy as np  # noqa: PLC0415

    data = np.load(path)
    for name in ("conv1", "conv2", "conv3"):
        model.get_layer(name).kernel.assign(data[f"{name}:0"])
    logits = model.get_layer("logits")
    logits.kernel.assign(data["logits:0"])
    logits.bias.assign(data["logits:1"])
    for name in ("bn1", "bn2", "bn3"):
        model.get_layer(name).set_weights([data[f"{name}:{i}"] for i in range(4)])
    return data


def weighted_layers(model):
    return [model.get_layer(n) for n in ("conv1", "conv2", "conv3", "logits")]


# ---------------------------------------------------------------------------
# HGQ2
# ---------------------------------------------------------------------------


def hgq_stored_bits(quantizer, shape):
    """Per-weight stored bits of an HGQ2 KBI quantizer: ``b + k`` where ``b > 0``, else 0."""
    from keras import ops  # noqa: PLC0415

    q = quantizer.quantizer
    b = ops.convert_to_numpy(quantizer.bits_(shape))
    k = ops.convert_to_numpy(q.bw_mapper.bw_to_x(ops.cast(q.k, "float32"), shape))
    import numpy as np  # noqa: PLC0415

    return np.where(b > 0, b + k, 0.0)


def hgq_weight_bits(model):
    """``{layer: (stored bits of kernel + bias, weight count)}`` of an HGQ2 small CNN."""
    out = {}
    for layer in weighted_layers(model):
        total = float(hgq_stored_bits(layer.kq, tuple(layer.kernel.shape)).sum())
        count = int(math.prod(layer.kernel.shape))
        if getattr(layer, "bq", None) is not None:
            total += float(hgq_stored_bits(layer.bq, tuple(layer.bias.shape)).sum())
            count += int(math.prod(layer.bias.shape))
        out[layer.name] = (total, count)
    return out


def hgq_activation_bits(model):
    """Mean learned input bits (HGQ2 ``bits``, sign bit apart) of each quantized layer's input."""
    from keras import ops  # noqa: PLC0415

    out = {}
    for layer in weighted_layers(model):
        if layer.enable_iq:
            shape = (1, *layer.input.shape[1:])
            out[layer.name] = float(ops.mean(layer.iq.bits_(shape)))
    return out


def _beta_controller(target_bits, every, p, i, beta0):
    """A Keras callback: HGQ2's PID (log space, as ``BetaPID``) on the stored weight bits."""
    keras = _keras()
    from hgq.utils.sugar.beta_pid import PID  # noqa: PLC0415
    from keras import ops  # noqa: PLC0415

    class WeightBitsBetaPID(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.pid = PID(p, i, 0.0, neg=True)
            self.beta = beta0
            self.step = 0
            self.trace = []

        def _bits(self):
            return sum(t for t, _ in hgq_weight_bits(self.model).values())

        def _set_beta(self, beta):
            for layer in self.model._flatten_layers():
                if getattr(layer, "_beta", None) is not None:
                    layer._beta.assign(ops.convert_to_tensor(beta, dtype=layer._beta.dtype))

        def on_train_begin(self, logs=None):
            err = math.log10(self._bits() / target_bits)
            # start the integral so that the first output is beta0 (as BetaPID does at its warm-up end)
            self.pid.integral = (math.log10(self.beta) - self.pid.p * err) / self.pid.i - err
            self._set_beta(self.beta)

        def on_train_batch_end(self, batch, logs=None):
            self.step += 1
            if self.step % every:
                return
            bits = self._bits()
            self.beta = 10.0 ** self.pid(0.0, math.log10(bits / target_bits))
            self._set_beta(self.beta)
            self.trace.append((self.step, bits / 8192.0, self.beta))

    return WeightBitsBetaPID()


def build_hgq(b0, i0):
    """The small CNN with HGQ2 layers: kernel bits start at ``b0`` (HGQ2's b, sign apart), ``i0[layer]``."""
    from hgq.layers import QConv2D, QDense  # noqa: PLC0415
    from hgq.quantizer import QuantizerConfig  # noqa: PLC0415

    def kq(name):
        return QuantizerConfig("kbi", "weight", b0=b0, i0=i0[name])

    def conv(filters, name):
        return QConv2D(filters, 3, padding="same", use_bias=False, kq_conf=kq(name), name=name)

    def dense(units, name):
        return QDense(units, kq_conf=kq(name), name=name)

    return build_small_cnn(conv, dense)


def _integer_bits(data):
    """Per layer: ``ceil(log2(max |w|))``, HGQ2's integer bits that hold the float kernel's range."""
    import numpy as np  # noqa: PLC0415

    return {
        n: int(math.ceil(math.log2(float(np.abs(data[f"{n}:0"]).max()) + 1e-12)))
        for n in ("conv1", "conv2", "conv3", "logits")
    }


# ---------------------------------------------------------------------------
# QKeras
# ---------------------------------------------------------------------------


def build_qkeras(bits):
    """The small CNN with QKeras layers: ``quantized_bits(bits, 0, alpha="auto_po2")`` kernels and bias."""
    import qkeras  # noqa: PLC0415

    def quantizer():
        return qkeras.quantized_bits(bits, 0, keep_negative=True, alpha="auto_po2")

    def conv(filters, name):
        return qkeras.QConv2D(
            filters, 3, padding="same", use_bias=False, kernel_quantizer=quantizer(), name=name
        )

    def dense(units, name):
        return qkeras.QDense(units, kernel_quantizer=quantizer(), bias_quantizer=quantizer(), name=name)

    return build_small_cnn(conv, dense)


def qkeras_levels(model):
    """Distinct quantized kernel values per output channel (at most ``2^bits - 1`` for symmetric grids)."""
    import numpy as np  # noqa: PLC0415
    from keras import ops  # noqa: PLC0415

    out = {}
    for layer in weighted_layers(model):
        w = ops.convert_to_numpy(layer.kernel_quantizer_internal(layer.kernel))
        w = w.reshape(-1, w.shape[-1])
        out[layer.name] = int(max(len(np.unique(w[:, c])) for c in range(w.shape[1])))
    return out


# ---------------------------------------------------------------------------
# Training, evaluation, conversion
# ---------------------------------------------------------------------------


def _loss():
    return _keras().losses.SparseCategoricalCrossentropy(from_logits=True)


def train(model, xt, yt, epochs, lrs, batch_size, callbacks=()):
    keras = _keras()
    history = {}
    for n_epochs, lr in zip(epochs, lrs):
        if n_epochs <= 0:
            continue
        model.compile(keras.optimizers.Adam(lr), _loss(), metrics=["accuracy"])
        h = model.fit(xt, yt, batch_size=batch_size, epochs=n_epochs, verbose=0, callbacks=list(callbacks))
        for k, v in h.history.items():
            history.setdefault(k, []).extend(float(x) for x in v)
    return history


def accuracy(model, x, y):
    import numpy as np  # noqa: PLC0415

    logits = np.asarray(model.predict(x, batch_size=250, verbose=0))
    return float(np.mean(np.argmax(logits, -1) == y))


def try_tflite(model, out_dir, stem):
    """TFLiteConverter on the trained model, plain and with ``Optimize.DEFAULT``: paths or errors."""
    import tensorflow as tf  # noqa: PLC0415

    out = {}
    for name, optimize in (("plain", False), ("optimize_default", True)):
        try:
            converter = tf.lite.TFLiteConverter.from_keras_model(model)
            if optimize:
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
            tflite = converter.convert()
        except Exception as err:  # noqa: BLE001 (the converter raises several kinds)
            text = f"{type(err).__name__}: {err}"
            out[name] = {"error": "\n".join(ln for ln in text.splitlines() if ln.strip())[:1500]}
        else:
            path = os.path.join(out_dir, f"{stem}_{name}.tflite")
            with open(path, "wb") as f:
                f.write(tflite)
            out[name] = {"path": path}
    return out


def versions():
    import keras  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    v = {"tensorflow": tf.__version__, "keras": keras.__version__}
    for mod in ("hgq", "qkeras"):
        if mod in sys.modules:
            v[mod] = getattr(sys.modules[mod], "__version__", "?")
    return v


def run_hgq(args, xt, yt, xv, yv):
    import numpy as np  # noqa: PLC0415

    target_bits = args.target_kb * 8192.0
    data = np.load(args.weights)
    n = sum(data[f"{name}:0"].size for name in ("conv1", "conv2", "conv3", "logits")) + data["logits:1"].size
    # HGQ2's b excludes the sign: start just under the rounding edge floor(target - 1) + 1/2, so that
    # the start sits at or under the target and a weight's first move up adds one bit
    b0 = args.b0 if args.b0 >= 0 else math.floor(target_bits / n - 1.0) + 0.49
    model = build_hgq(b0, _integer_bits(data))
    load_float_weights(model, args.weights)
    start_bits = hgq_weight_bits(model)
    controller = _beta_controller(target_bits, args.control_every, args.kp, args.ki, args.beta0)
    history = train(model, xt, yt, args.epochs, args.lrs, args.batch_size, [controller])
    bits = hgq_weight_bits(model)
    total = sum(t for t, _ in bits.values())
    return {
        "method": "hgq2",
        "target_kb": args.target_kb,
        "b0": b0,
        "keras_accuracy": accuracy(model, xv, yv),
        "weight_bytes": total / 8.0,
        "weight_kb": total / 8192.0,
        "mean_weight_bits": total / sum(c for _, c in bits.values()),
        "start_weight_kb": sum(t for t, _ in start_bits.values()) / 8192.0,
        "layer_mean_bits": {k: t / c for k, (t, c) in bits.items()},
        "zero_bit_fraction": {
            layer.name: float(np.mean(hgq_stored_bits(layer.kq, tuple(layer.kernel.shape)) == 0))
            for layer in weighted_layers(model)
        },
        "activation_bits": hgq_activation_bits(model),
        "beta_final": controller.beta,
        "control_trace": controller.trace,
        "history": history,
        "tflite": try_tflite(model, args.out_dir, "hgq2"),
        "versions": versions(),
    }


def run_qkeras(args, xt, yt, xv, yv):
    model = build_qkeras(args.bits)
    load_float_weights(model, args.weights)
    history = train(model, xt, yt, args.epochs, args.lrs, args.batch_size)
    n = sum(
        int(math.prod(w.shape))
        for layer in weighted_layers(model)
        for w in (layer.kernel, layer.bias)
        if w is not None
    )
    return {
        "method": f"qkeras_{args.bits}bit",
        "bits": args.bits,
        "keras_accuracy": accuracy(model, xv, yv),
        "weight_bytes": args.bits * n / 8.0,
        "weight_kb": args.bits * n / 8192.0,
        "mean_weight_bits": float(args.bits),
        "max_levels_per_channel": qkeras_levels(model),
        "history": history,
        "tflite": try_tflite(model, args.out_dir, f"qkeras_{args.bits}bit"),
        "versions": versions(),
    }


def main(argv):
    import argparse  # noqa: PLC0415

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", required=True, choices=["hgq", "qkeras"])
    p.add_argument("--weights", required=True, help="float weights (npz, tfdq's save_weights)")
    p.add_argument("--data", required=True, help="npz with xt, yt, xv, yv")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", default="4,2", help="epochs per phase")
    p.add_argument("--lrs", default="1e-3,5e-4", help="Adam learning rate per phase")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--target_kb", type=float, default=7.75, help="hgq: weight memory target (kB)")
    p.add_argument("--b0", type=float, default=-1.0, help="hgq: initial b (default: from the target)")
    p.add_argument("--beta0", type=float, default=1e-7, help="hgq: initial beta")
    p.add_argument("--kp", type=float, default=1.0, help="hgq: PID proportional gain (log10 space)")
    p.add_argument("--ki", type=float, default=0.1, help="hgq: PID integral gain per control step")
    p.add_argument("--control_every", type=int, default=2, help="hgq: steps between beta updates")
    p.add_argument("--bits", type=int, default=4, help="qkeras: kernel and bias bits")
    p.add_argument("--qkeras_path", default="", help="folder with qkeras-v3 (pip --target), put first")
    args = p.parse_args(argv)
    args.epochs = [int(e) for e in args.epochs.split(",")]
    args.lrs = [float(v) for v in args.lrs.split(",")]
    if args.qkeras_path:
        sys.path.insert(0, args.qkeras_path)
    os.makedirs(args.out_dir, exist_ok=True)
    import numpy as np  # noqa: PLC0415

    keras = _keras()
    keras.utils.set_random_seed(args.seed)
    d = np.load(args.data)
    start = time.time()
    fn = run_hgq if args.task == "hgq" else run_qkeras
    result = fn(args, d["xt"], d["yt"], d["xv"], d["yv"])
    result["seconds"] = time.time() - start
    result["seed"] = args.seed
    result["epochs"], result["learning_rates"] = args.epochs, args.lrs
    with open(os.path.join(args.out_dir, f"{args.task}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
