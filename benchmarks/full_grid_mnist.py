"""Bits charged = bits stored, both ways, on the MNIST budget benchmark.

tfdq charges a uniform quantizer the integer range it actually stores
(``tfdq.memory.stored_bits``); the alternative snaps ``q_max`` to the full
grid of its bitwidth in the forward pass (``U3(full_grid=True)``), so that
the paper's formula ``ceil(log2(q_max/d + 1) + 1)`` is what every stored
grid holds. This runs ``benchmarks.budget_mnist``'s runs (small MNIST CNN,
4,000 / 1,000 MNIST subset, U3, automatic multipliers, final phase) for
both, same seeds and same float models, and records per run the held-out
accuracy, target and achieved kB (each as its own rule charges it), the
weight kB the paper's formula gives for the learned parameters, and per
weight layer the formula bits, the charged bits and the largest stored
integer. Writes ``<out_dir>/full_grid_mnist.json``::

    python -m benchmarks.full_grid_mnist --threads=1 --seeds=0,1,2 --budgets=w2.2,w2.5,w3,a8c3
"""

import time

from absl import app, flags

from benchmarks import budget_mnist, common, mnist_runs

FLAGS = flags.FLAGS
ARMS = {"stored range (default)": None, "full grid (snapped q_max)": {"full_grid": True}}


def _define_flags():
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Random seeds.")
    flags.DEFINE_list("budgets", ["w2.2", "w2.5", "w3", "a8c3"], "Budgets of benchmarks.budget_mnist to run.")
    flags.DEFINE_integer("float_epochs", 8, "Float training epochs.")
    flags.DEFINE_integer("quant_epochs", 1, "Epochs with the quantizers learning under the budget.")
    flags.DEFINE_integer("finish_epochs", 1, "Epochs of the final phase.")
    flags.DEFINE_string("out_dir", common.RESULTS_DIR, "Output folder.")
    flags.DEFINE_integer("threads", 0, common.THREADS_HELP)


def weight_layers(qmodel):
    """Per weight layer: formula bits, charged bits, largest stored integer and the full grid's."""
    import numpy as np  # noqa: PLC0415

    from tfdq import memory  # noqa: PLC0415

    out = {}
    for e in memory.size_entries(qmodel):
        if e.kind != "weight" or e.quantizer is None:
            continue
        p = e.quantizer.forward_params()
        b, d, q_max = float(p["bits"]), float(p["d"]), float(p["q_max"])
        top = min(q_max, float(np.max(np.abs(e.layer.kernel.numpy()))))
        out[e.name] = {
            "count": e.count,
            "formula_bits": b,
            "charged_bits": float(e.bits(p)),
            "largest_stored_integer": int(np.floor(top / d + 0.5)),
            "full_grid_integer": int(2 ** (b - 1) - 1),
        }
    return out


def run(seeds, names, float_epochs, quant_epochs, finish_epochs):
    counts = mnist_runs.feature_counts()
    data = mnist_runs.load_data()
    table = budget_mnist.budgets()
    rows = []
    for seed in seeds:
        float_model, ferr, _ = mnist_runs.train_float(seed, data, float_epochs)
        print(f"float seed {seed}: accuracy {100 * (1 - ferr):.2f}%", flush=True)
        for name in names:
            for arm, options in ARMS.items():
                config = dict(table[name], quantizer_options=options)
                r = mnist_runs.quantized_run(
                    config,
                    seed,
                    data,
                    float_model=float_model,
                    counts=counts,
                    epochs=quant_epochs,
                    finish_epochs=finish_epochs,
                    keep_model=True,
                )
                if "failed" in r:
                    print(f"{name} {arm} seed {seed}: FAILED {r['failed']}", flush=True)
                    rows.append({"budget": name, "arm": arm, "seed": seed, "failed": r["failed"]})
                    continue
                layers = weight_layers(r.pop("model"))
                row, pairs = budget_mnist.result_row(name, config, seed, ferr, r)
                row["arm"] = arm
                row["formula_weight_kb"] = (
                    sum(v["count"] * v["formula_bits"] for v in layers.values()) / 8192.0
                )
                row["weight_layers"] = layers
                rows.append(row)
                text = "  ".join(
                    f"{k} {a:.3f}/{t:.3f} kB ({100 * a / t:.1f}%)" for k, (t, a) in pairs.items()
                )
                print(
                    f"{config['name']:28s} {arm:26s} seed {seed}: {text}  formula {row['formula_weight_kb']:.3f} kB  "
                    f"met {all(r['constraints_met'].values())}  acc {100 * row['accuracy']:.2f}%  "
                    f"bits {row['bits']}",
                    flush=True,
                )
    return rows


def main(argv):
    del argv
    common.set_threads(FLAGS.threads)
    start = time.time()
    seeds = [int(s) for s in FLAGS.seeds]
    rows = run(seeds, FLAGS.budgets, FLAGS.float_epochs, FLAGS.quant_epochs, FLAGS.finish_epochs)
    common.write_result(
        FLAGS.out_dir,
        "full_grid_mnist",
        "bits charged = bits stored: stored integer range charged (default) vs q_max snapped to the full grid",
        "python -m benchmarks.full_grid_mnist --threads=1 "
        f"--seeds={','.join(FLAGS.seeds)} --budgets={','.join(FLAGS.budgets)}",
        {
            "settings": {
                "seeds": FLAGS.seeds,
                "budgets": FLAGS.budgets,
                "float_epochs": FLAGS.float_epochs,
                "quant_epochs": FLAGS.quant_epochs,
                "finish_epochs": FLAGS.finish_epochs,
            },
            "results": rows,
            "seconds": time.time() - start,
        },
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
