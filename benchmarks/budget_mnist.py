"""Target vs achieved: memory budgets met with no penalty weight given.

The small MNIST CNN (``tfdq.models.small_cnn``, 29,658 weights) on the real
MNIST subset (4,000 / 1,000 split). Per seed one float model (Adam 1e-3,
``--float_epochs``), then, for every budget below, ``quantize_model`` (U3,
calibrated), ``tfdq.constrain`` with the target only (automatic
multipliers, no lambda) and one ``fit`` of ``--quant_epochs`` +
``--finish_epochs`` epochs (Adam 1e-3, then 5e-4 in the final phase that
``FinishInsideBudget`` schedules: allocation fixed inside the budget, slack
filled, weights adapting). Budgets:

* weights (8a), U3 weights, float activations: 2.2, 2.5, 3, 4, 5 and 6 bits
  per weight on average (``N b / 8192`` kB);
* activations, U3 weights and activations: (8b) all feature maps at 2.5
  and at 4 bits per value, (8c) the largest feature map at 3 bits, each
  together with a 4-bit-average weight budget.

Records per run the target, the achieved size (``tfdq.memory``, bits
charged = bits stored), achieved / target, whether every constraint holds,
the held-out accuracy and the learned bits, to
``<out_dir>/budget_mnist.json``; prints the table::

    python -m benchmarks.budget_mnist --threads=1                 # 3 seeds, 9 budgets
    python -m benchmarks.budget_mnist --seeds=0 --quant_epochs=1 --finish_epochs=1 --budgets=w2.2,a8c3
"""

import itertools
import time

from absl import app, flags

from benchmarks import common, mnist_runs

FLAGS = flags.FLAGS

WEIGHT_BITS = (2.2, 2.5, 3.0, 4.0, 5.0, 6.0)
ACTIVATION_BUDGETS = (("sum", 2.5), ("sum", 4.0), ("max", 3.0))
ACT_WEIGHT_BITS = 4.0


def budgets():
    """``name -> config`` of every budget of the table."""
    out = {}
    for b in WEIGHT_BITS:
        out[f"w{b:g}"] = {
            "name": f"(8a) {b:g} bits",
            "weight": "U3",
            "weight_budget_bits": b,
            "weight_budget_margin": 1.0,
        }
    for kind, b in ACTIVATION_BUDGETS:
        tag = "8b" if kind == "sum" else "8c"
        out[f"a{tag}{b:g}"] = {
            "name": f"({tag}) {b:g} bits + (8a) {ACT_WEIGHT_BITS:g} bits",
            "weight": "U3",
            "activation": "U3",
            "activation_budget": (kind, b),
            "weight_budget_bits": ACT_WEIGHT_BITS,
            "weight_budget_margin": 1.0,
        }
    return out


def _define_flags():
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Random seeds.")
    flags.DEFINE_list("budgets", list(budgets()), "Budgets to run (names: w<bits>, a8b<bits>, a8c<bits>).")
    flags.DEFINE_integer("float_epochs", 8, "Float training epochs.")
    flags.DEFINE_integer("quant_epochs", 4, "Epochs with the quantizers learning under the budget.")
    flags.DEFINE_integer(
        "finish_epochs", 2, "Epochs of the final phase (allocation fixed, weights adapting)."
    )
    flags.DEFINE_string("out_dir", common.RESULTS_DIR, "Output folder.")
    flags.DEFINE_integer("threads", 0, common.THREADS_HELP)
    flags.DEFINE_list(
        "gains", [], "Multiplier controller gains to compare, as kp:ki (empty: tfdq's defaults)."
    )


def achieved(record):
    """``{constraint: (target kB, achieved kB)}`` of one run."""
    t = record["targets"]
    out = {}
    if t.get("weight_kb") is not None:
        out["weight"] = (t["weight_kb"], record["weight_kb"])
    if t.get("activation_kb") is not None:
        key = "activation_kb_sum" if t["activation"] == "sum" else "activation_kb_max"
        out[f"activation ({t['activation']})"] = (t["activation_kb"], record[key])
    return out


def _before_final(history, targets, quant_epochs):
    """Achieved / target at the end of the last epoch before the final phase."""
    out = {}
    if targets.get("weight_kb") is not None:
        out["weight"] = history["weight_kb"][quant_epochs - 1] / targets["weight_kb"]
    if targets.get("activation_kb") is not None:
        key = "act_kb_sum" if targets["activation"] == "sum" else "act_kb_max"
        out["activation"] = history[key][quant_epochs - 1] / targets["activation_kb"]
    return out


def result_row(name, config, seed, float_error, r):
    """The fields every budget run's row has: ``(row, achieved pairs)``."""
    pairs = achieved(r)
    row = {
        "budget": name,
        "label": config["name"],
        "seed": seed,
        "float_accuracy": 1 - float_error,
        "accuracy": 1 - r["error"],
        "constraints": {k: {"target_kb": t, "achieved_kb": a, "ratio": a / t} for k, (t, a) in pairs.items()},
        "constraints_met": r["constraints_met"],
        "mean_weight_bits": r["mean_weight_bits"],
        "bits": {**r["weight_bits"], **r["activation_bits"]},
        "seconds": r["seconds"],
    }
    return row, pairs


def run(seeds, names, float_epochs, quant_epochs, finish_epochs, gains=(None,), verbose=0):
    counts = mnist_runs.feature_counts()
    data = mnist_runs.load_data()
    table = budgets()
    rows = []
    for seed in seeds:
        seed_start = mnist_runs.SeedStart(seed, data, counts, float_epochs, verbose=verbose)
        ferr = seed_start.float_record["error"]
        print(f"float seed {seed}: accuracy {100 * (1 - ferr):.2f}%", flush=True)
        for name, gain in itertools.product(names, gains):
            config = dict(table[name])
            if gain is not None:
                config.update(kp=gain[0], ki=gain[1], name=f"{config['name']} kp={gain[0]:g} ki={gain[1]:g}")
            r = seed_start.run(config, quant_epochs, finish_epochs)
            if "failed" in r:
                print(f"{name} seed {seed}: FAILED {r['failed']}", flush=True)
                rows.append({"budget": name, "seed": seed, "failed": r["failed"]})
                continue
            row, pairs = result_row(name, config, seed, ferr, r)
            row.update(
                {
                    "bit_changes_at_finish": r.get("enforce_steps"),
                    "lambda_final": {
                        k[len("lambda_") :]: v[-1] for k, v in r["history"].items() if k.startswith("lambda_")
                    },
                    "gains": None if gain is None else {"kp": gain[0], "ki": gain[1]},
                    "met_before_final_phase": [v for v in r["history"]["budget_met"][:quant_epochs]],
                    "ratio_before_final_phase": _before_final(r["history"], r["targets"], quant_epochs),
                }
            )
            rows.append(row)
            text = "  ".join(f"{k} {a:.3f}/{t:.3f} kB ({100 * a / t:.1f}%)" for k, (t, a) in pairs.items())
            print(
                f"{config['name']:28s} seed {seed}: {text}  met {all(r['constraints_met'].values())}  "
                f"acc {100 * row['accuracy']:.2f}%  ({r['seconds']:.0f} s)",
                flush=True,
            )
    return rows


def summarize(rows):
    ok = [r for r in rows if "failed" not in r]
    ratios = [c["ratio"] for r in ok for c in r["constraints"].values()]
    return {
        "runs": len(rows),
        "failed": len(rows) - len(ok),
        "all_met": all(all(r["constraints_met"].values()) for r in ok),
        "ratio_min": min(ratios) if ratios else None,
        "ratio_max": max(ratios) if ratios else None,
        "all_within_95_100": all(0.95 <= x <= 1.0 for x in ratios),
    }


def main(argv):
    del argv
    common.set_threads(FLAGS.threads)
    start = time.time()
    gains = [tuple(float(v) for v in g.split(":")) for g in FLAGS.gains] or [None]
    rows = run(
        [int(s) for s in FLAGS.seeds],
        FLAGS.budgets,
        FLAGS.float_epochs,
        FLAGS.quant_epochs,
        FLAGS.finish_epochs,
        gains,
    )
    summary = summarize(rows)
    print(f"\n{summary}")
    common.write_result(
        FLAGS.out_dir,
        "budget_mnist",
        "target vs achieved memory, small MNIST CNN, automatic multipliers (no lambda given)",
        "python -m benchmarks.budget_mnist --threads=1",
        {
            "settings": {
                "seeds": FLAGS.seeds,
                "budgets": FLAGS.budgets,
                "float_epochs": FLAGS.float_epochs,
                "quant_epochs": FLAGS.quant_epochs,
                "finish_epochs": FLAGS.finish_epochs,
            },
            "summary": summary,
            "results": rows,
            "seconds": time.time() - start,
        },
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
