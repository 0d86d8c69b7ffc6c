"""BatchNorm under learned quantization: inference mode against training mode.

A residual CNN with BatchNorm, an ``Add`` and global average pooling
(:func:`residual_cnn`) on sklearn's digits
upscaled to 16x16 (1,400 training / 397 held-out images, batch 64: 22 steps
per epoch). Float training (Adam 1e-3, ``--float_epochs``), then per
BatchNorm handling (``--modes``) two flows from the same float model:

* ``budget``: the README's Memory budgets recipe (2-bit average weights + 5%,
  4-bit largest activation map; 5 constrained epochs, ``enforce_budget``,
  ``freeze_quantizers``, 2 epochs Adam 5e-4);
* ``short``: a short fine-tune, U3 without a budget, 250 steps (Adam 1e-3).

Handlings: ``none`` (Keras' moving averages: ``fit(...,
recalibrate_batchnorm=False)``), ``reestimate`` (tfdq's default: ``fit``
re-estimates the statistics, :mod:`tfdq.batchnorm`), ``freeze`` (re-estimate,
then BatchNorm frozen, ``trainable=False``: it normalizes with the fixed
statistics in training too, "fold and freeze", for the weight fine-tune of
the budget flow and for the whole short flow).

Records held-out accuracy in inference mode and in training mode (batch
statistics of the whole held-out set), the float model's accuracy with its
own moving averages and re-estimated, and whether the budget holds::

    python -m benchmarks.batchnorm_residual                   # 2 seeds, about 10 minutes each on 2 cores
    python -m benchmarks.batchnorm_residual --seeds=0 --modes=none,reestimate
"""

import time

from absl import app, flags

from benchmarks.common import RESULTS_DIR, THREADS_HELP, set_threads, write_result

FLAGS = flags.FLAGS
MODES = ("none", "reestimate", "freeze")


def _define_flags():
    flags.DEFINE_list("seeds", ["0", "1"], "Random seeds.")
    flags.DEFINE_list("modes", list(MODES), "BatchNorm handlings to compare.")
    flags.DEFINE_integer("width", 32, "Channels of the residual CNN (the last stage has twice as many).")
    flags.DEFINE_integer("float_epochs", 20, "Float training epochs.")
    flags.DEFINE_integer("short_steps", 250, "Steps of the short fine-tune.")
    flags.DEFINE_string("out_dir", RESULTS_DIR, "Output folder.")
    flags.DEFINE_integer("threads", 0, THREADS_HELP)


def residual_cnn(width=16, input_shape=(16, 16, 1), classes=10):
    """conv-BN-ReLU, a residual block (conv-BN-ReLU-conv-BN + identity, Add,
    ReLU), a strided conv-BN-ReLU, global average pooling, Dense."""
    import keras  # noqa: PLC0415

    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    y = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name="a")(x)
    y = keras.layers.BatchNormalization(name="a_bn")(y)
    y = keras.layers.ReLU(name="a_relu")(y)
    y = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name="b")(y)
    y = keras.layers.BatchNormalization(name="b_bn")(y)
    x = keras.layers.Add(name="add")([x, y])
    x = keras.layers.ReLU(name="add_relu")(x)
    x = keras.layers.Conv2D(2 * width, 3, strides=2, padding="same", use_bias=False, name="down")(x)
    x = keras.layers.BatchNormalization(name="down_bn")(x)
    x = keras.layers.ReLU(name="down_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(classes, name="logits")(x))


def digits(size=16):
    """sklearn's 8x8 digits upscaled to ``size`` (1,400 training / 397 held-out)."""
    import numpy as np  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415
    from sklearn.datasets import load_digits  # noqa: PLC0415

    d = load_digits()
    x = tf.image.resize(d.images.astype(np.float32)[..., None] / 16.0, (size, size)).numpy()
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], d.target.astype(np.int32)[order]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def budget_recipe(model, train, epochs=(5, 2), seed=0, recalibrate=True, before_finish=None):
    """The README's Memory budgets recipe: 2-bit average weights + 5%, 4-bit
    largest activation map, constrained fit, enforce_budget, freeze, fit.

    ``recalibrate``: ``fit``'s BatchNorm re-estimation (tfdq's default);
    ``before_finish(qmodel)`` runs after ``freeze_quantizers``, before the
    last compile."""
    import keras  # noqa: PLC0415

    import tfdq  # noqa: PLC0415

    (x, y) = train
    keras.utils.set_random_seed(seed)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    qmodel = tfdq.quantize_model(model, calibration_data=x[:512])
    entries = tfdq.memory.size_entries(qmodel)
    n = sum(e.count for e in entries if e.kind == "weight")
    largest = max(e.count for e in entries if e.kind == "activation" and not e.is_input)
    qmodel = tfdq.constrain(qmodel, weight_kb=1.05 * n * 2 / 8192, activation_kb=4 * largest / 8192)
    qmodel.compile(keras.optimizers.Adam(1e-3), loss, metrics=["accuracy"])
    qmodel.fit(x, y, batch_size=64, epochs=epochs[0], verbose=0, recalibrate_batchnorm=recalibrate)
    tfdq.constraints.enforce_budget(qmodel)
    tfdq.constraints.freeze_quantizers(qmodel)
    if before_finish is not None:
        before_finish(qmodel)
    qmodel.compile(keras.optimizers.Adam(5e-4), loss, metrics=["accuracy"])
    qmodel.fit(x, y, batch_size=64, epochs=epochs[1], verbose=0, recalibrate_batchnorm=recalibrate)
    return qmodel


def accuracy(model, data, training=False):
    """Held-out accuracy; ``training=True`` normalizes with the batch's
    statistics (the moving statistics are restored afterwards)."""
    import numpy as np  # noqa: PLC0415

    x, y = data
    state = [v.numpy() for v in model.non_trainable_variables]
    out = float(np.mean(np.argmax(np.asarray(model(x, training=training)), -1) == y))
    for v, s in zip(model.non_trainable_variables, state):
        v.assign(s)
    return out


def _freeze_batchnorm(qmodel, x):
    import tfdq  # noqa: PLC0415

    tfdq.recalibrate_batchnorm(qmodel, x)
    for bn in tfdq.batchnorm.batchnorm_layers(qmodel):
        bn.trainable = False


def run(float_model, train, test, flow, mode, seed, short_steps=250):
    """One quantized run; returns a JSON-ready record."""
    import keras  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    import tfdq  # noqa: PLC0415

    x, y = train
    start = time.time()
    reestimate = mode != "none"
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    keras.utils.set_random_seed(100 + seed)
    if flow == "budget":
        qmodel = budget_recipe(
            float_model,
            train,
            seed=100 + seed,
            recalibrate=reestimate,
            before_finish=(lambda m: _freeze_batchnorm(m, x)) if mode == "freeze" else None,
        )
        met = all(qmodel.memory_budget.satisfied(qmodel).values())
    else:
        qmodel = tfdq.quantize_model(float_model, calibration_data=x[:512])
        if mode == "freeze":
            _freeze_batchnorm(qmodel, x)
        qmodel.compile(keras.optimizers.Adam(1e-3), loss)
        stream = tf.data.Dataset.from_tensor_slices(train).shuffle(len(x), seed=seed).batch(64).repeat()
        qmodel.fit(
            stream, epochs=10, steps_per_epoch=short_steps // 10, verbose=0, recalibrate_batchnorm=reestimate
        )
        met = None
    return {
        "seed": seed,
        "flow": flow,
        "mode": mode,
        "inference_accuracy": accuracy(qmodel, test),
        "training_mode_accuracy": accuracy(qmodel, test, training=True),
        "constraints_met": met,
        "seconds": time.time() - start,
    }


def main(argv):
    del argv
    set_threads(FLAGS.threads)
    import keras  # noqa: PLC0415

    import tfdq  # noqa: PLC0415

    train, test = digits()
    records, floats = [], []
    for seed in (int(s) for s in FLAGS.seeds):
        keras.utils.set_random_seed(seed)
        model = residual_cnn(width=FLAGS.width)
        model.compile(
            keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
        model.fit(*train, batch_size=64, epochs=FLAGS.float_epochs, verbose=0)
        moving = accuracy(model, test)
        tfdq.recalibrate_batchnorm(model, train[0])
        floats.append(
            {
                "seed": seed,
                "moving_averages": moving,
                "reestimated": accuracy(model, test),
                "training_mode": accuracy(model, test, training=True),
            }
        )
        print(
            f"seed {seed} float: moving averages {100 * moving:.1f}%, re-estimated "
            f"{100 * floats[-1]['reestimated']:.1f}%",
            flush=True,
        )
        for flow in ("budget", "short"):
            for mode in FLAGS.modes:
                r = run(model, train, test, flow, mode, seed, FLAGS.short_steps)
                records.append(r)
                print(
                    f"seed {seed} {flow} {mode}: inference {100 * r['inference_accuracy']:.1f}%  training mode "
                    f"{100 * r['training_mode_accuracy']:.1f}%  met {r['constraints_met']}  ({r['seconds']:.0f} s)",
                    flush=True,
                )
    write_result(
        FLAGS.out_dir,
        "batchnorm_residual",
        "BatchNorm handling under learned quantization: residual CNN on the digits, inference vs training mode",
        "python -m benchmarks.batchnorm_residual",
        {
            "width": FLAGS.width,
            "float_epochs": FLAGS.float_epochs,
            "short_steps": FLAGS.short_steps,
            "float": floats,
            "runs": records,
        },
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
