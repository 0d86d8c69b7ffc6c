"""The paper's Table 1 at CPU scale: which parametrization trains best.

Small MNIST CNN (``tfdq.models.small_cnn``, 29,658 weights) on the real
MNIST subset (4,000 training / 1,000 held-out digits). For each of the six
parametrizations U1 = (b, d), U2 = (b, q_max), U3 = (d, q_max), P1 = (b,
q_max), P2 = (b, q_min), P3 = (q_min, q_max), two settings:

* ``W``: weights quantized, activations float;
* ``W+A``: weights and activations, the activation quantizer of the same
  parametrization (U* -> the same U*, P* -> the same P*; power-of-two
  activations spend one level on an exact zero, as the reference code);

and two starts:

* ``random``: the quantized network trained from scratch: an untrained
  small CNN, every quantizer at tfdq's default start (uniform d = 2^-3,
  docs/method.md section 4; power of two q_max = 1, q_min = 2^-7; b = 4), no
  calibration (see ``benchmarks.mnist_runs``);
* ``float``: from the float model of the same seed (trained once per seed,
  Adam 1e-3, batch 64), quantizers initialized from the weights and from
  512 calibration images, b = 4.

No memory constraint (as Table 1); tfdq's default bit bounds (weights 2-8,
activations 1-8) apply, so the unconstrained bitwidths may grow. The same
optimizer and learning rate for all six and both starts (``--optimizer``,
``--lr``; default SGD with momentum 0.9 and lr 0.01, the paper's optimizer
and its rate for quantized nets; batch 64), ``--epochs`` from the float
model and ``--random_epochs`` from scratch. SGD, not the Adam of the other
MNIST benchmarks: Adam divides each parameter's step by its gradient scale,
which hides the differences in gradient magnitude between the
parametrizations that the paper's argument is about (``--optimizer=adam
--lr=0.001`` runs that variant). Recorded per run: held-out error, mean
weight bits, final bits per layer (weights and activations), whether the
training loss became NaN/Inf (``diverged``; training stops there), or the
exception if a combination fails. Over seeds: mean, std, min and max.

The check: the paper's finding that U3 has the lowest mean error among
U1/U2/U3 and P3 among P1/P2/P3, per setting and start. Results go to
``<out_dir>/parametrizations.json`` and ``parametrizations.png``::

    python -m benchmarks.parametrizations --threads=1               # full: 3 seeds, 72 runs
    python -m benchmarks.parametrizations --quick --out_dir=/tmp/p  # smoke run, under a minute
"""

import os
import time

from absl import app, flags

from benchmarks import common, mnist_runs

SGD_LR = 0.01  # the paper's learning rate for quantized nets (docs/method.md section 6)

NAMES = ("U1", "U2", "U3", "P1", "P2", "P3")
SETTINGS = ("W", "W+A")
INITS = ("random", "float")
# Smoke mode: one seed, two configurations, a few hundred images, one epoch.
QUICK = {
    "seeds": (0,),
    "float_epochs": 1,
    "epochs": 1,
    "random_epochs": 1,
    "n_train": 512,
    "only": (("U3", "W+A", "random"), ("P3", "W+A", "float")),
}
PAPER = {  # docs/method.md section 7, Table 1: validation error in %, random / float init
    "W": {
        "U1": (17.8, 8.18),
        "U2": (8.80, 7.44),
        "U3": (8.50, 7.32),
        "P1": (11.70, 7.90),
        "P2": (53.07, 23.01),
        "P3": (10.61, 7.56),
    },
    "W+A": {
        "U1": (28.9, 9.03),
        "U2": (9.43, 7.74),
        "U3": (9.23, 7.40),
        "P1": (22.91, 11.68),
        "P2": (None, 35.68),
        "P3": (15.10, 9.86),
    },
}


def define_flags():
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Random seeds (one float model per seed).")
    flags.DEFINE_integer("float_epochs", 8, "Float training epochs.")
    flags.DEFINE_integer("epochs", 4, "Quantized training epochs from the float model.")
    flags.DEFINE_integer("random_epochs", 8, "Quantized training epochs from random initialization.")
    flags.DEFINE_enum(
        "optimizer", "sgd", ["adam", "sgd"], "Optimizer of every quantized run (sgd: momentum 0.9)."
    )
    flags.DEFINE_float("lr", SGD_LR, "Learning rate of every quantized run.")
    flags.DEFINE_list("names", list(NAMES), "Parametrizations.")
    flags.DEFINE_list("settings", list(SETTINGS), "W and/or W+A.")
    flags.DEFINE_list("inits", list(INITS), "random and/or float.")
    flags.DEFINE_integer("n_train", 0, "Training images (0: all 4,000).")
    flags.DEFINE_string("out_dir", common.RESULTS_DIR, "Output folder.")
    flags.DEFINE_integer("threads", 0, common.THREADS_HELP)
    flags.DEFINE_bool("quick", False, "Smoke run (QUICK settings).")
    flags.DEFINE_bool("plot", True, "Write parametrizations.png.")
    flags.DEFINE_bool("replot", False, "Only redraw the PNG and reprint the table from <out_dir>'s JSON.")


def config_name(name, setting, init):
    return f"{name} {setting} {init}"


def make_config(name, setting, init):
    return {
        "name": config_name(name, setting, init),
        "weight": name,
        "activation": name if setting == "W+A" else None,
        "init": init,
    }


def configs(names=NAMES, settings=SETTINGS, inits=INITS, only=None):
    triples = only or [(n, s, i) for i in inits for s in settings for n in names]
    return [make_config(*t) for t in triples]


def check_finding(summary, float_error=None):
    """Per start and setting: is U3 the lowest mean error of U1-U3, P3 of P1-P3?"""
    out = {}
    for init in INITS:
        for setting in SETTINGS:
            key = f"{setting} {init}"
            for family, names in (("uniform", ("U1", "U2", "U3")), ("pow2", ("P1", "P2", "P3"))):
                means = {}
                for n in names:
                    s = summary.get(config_name(n, setting, init))
                    if s is None:
                        continue
                    means[n] = s["error"]["mean"] if s["error"] else None
                if len(means) < len(names):
                    continue  # not every parametrization of the family ran
                ranked = sorted(means, key=lambda n: float("inf") if means[n] is None else means[n])
                best = names[-1]
                out.setdefault(key, {})[family] = {
                    "mean_error": means,
                    "lowest": ranked[0],
                    "holds": ranked[0] == best or means[ranked[0]] == means[best],
                    "margin_to_next": (
                        None
                        if means[best] is None
                        else min(
                            (means[n] for n in names if n != best and means[n] is not None),
                            default=float("inf"),
                        )
                        - means[best]
                    ),
                }
    checked = [v["holds"] for per in out.values() for v in per.values()]
    return {
        "per_setting": out,
        "all_hold": bool(checked) and all(checked),
        "checked": len(checked),
        "holding": sum(checked),
    }


def run(
    seeds=(0, 1, 2),
    float_epochs=8,
    epochs=4,
    random_epochs=8,
    optimizer="sgd",
    lr=SGD_LR,
    names=NAMES,
    settings=SETTINGS,
    inits=INITS,
    only=None,
    n_train=None,
    out_dir=common.RESULTS_DIR,
    plot=True,
    verbose=0,
):
    """Run every configuration for every seed; write the JSON (and PNG); return the report."""
    start = time.time()
    seeds = [int(s) for s in seeds]
    todo = configs(names, settings, inits, only)
    counts = mnist_runs.feature_counts()
    data = mnist_runs.load_data(n_train or None)
    settings_used = {
        "seeds": seeds,
        "float_epochs": float_epochs,
        "epochs_from_float": epochs,
        "epochs_from_random": random_epochs,
        "optimizer": optimizer,
        "lr": lr,
        "batch_size": mnist_runs.BATCH,
        "float_lr": mnist_runs.FLOAT_LR,
        "n_train": len(data[0][0]),
        "n_test": len(data[1][0]),
        "configurations": [c["name"] for c in todo],
        "weight_count": sum(counts["weights"].values()),
        "counts": counts,
    }

    def run_one(seed_start, config):
        n_epochs = random_epochs if config["init"] == "random" else epochs
        return seed_start.run(config, n_epochs, 0, lr=lr, optimizer=optimizer)

    def write(floats, records, complete, plot=False):
        return _write(out_dir, settings_used, floats, records, todo, start, complete, plot)

    needs_float = any(c["init"] == "float" for c in todo)
    floats, records = mnist_runs.run_configs(
        "parametrizations",
        todo,
        seeds,
        data,
        counts,
        float_epochs if needs_float else None,
        run_one,
        write,
        verbose,
    )
    report = write(floats, records, complete=True, plot=plot)
    print_table(report)
    return report


def _write(out_dir, settings_used, floats, records, todo, start, complete, plot):
    summary = mnist_runs.summarize_configs(todo, records)
    float_summary = mnist_runs.aggregate([f["error"] for f in floats])
    finding = check_finding(summary)
    payload = {
        "complete": complete,
        "settings": settings_used,
        "float": {"per_seed": floats, "error": float_summary},
        "summary": summary,
        "paper_finding": finding,
        "paper_table1_percent": PAPER,
        "runs": records,
        "seconds": time.time() - start,
    }
    return common.save_report(
        out_dir,
        "parametrizations",
        "Table 1 at CPU scale: six parametrizations, W and W+A, random and float init, small MNIST CNN",
        "python -m benchmarks.parametrizations --threads=1",
        payload,
        complete,
        draw=draw if plot else None,
    )


def draw(report, out_dir):
    """``parametrizations.png`` of a report."""
    plot_errors(report, os.path.join(out_dir, "parametrizations.png"))


def plot_errors(report, path):
    """Error per parametrization: one panel per start, W and W+A side by side,
    mean (marker) with the min-max range over seeds (bar), log scale;
    diverged runs are counted above their point."""
    plt = common.pyplot()
    summary = report["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    offset = 0.15
    for ax, init in zip(axes, INITS):
        for k, (setting, color, marker) in enumerate(zip(SETTINGS, ("tab:blue", "tab:orange"), ("o", "s"))):
            labelled = False
            for i, name in enumerate(NAMES):
                s = summary.get(config_name(name, setting, init))
                x = i + (2 * k - 1) * offset
                if s is None:
                    continue
                if s["error"] is None:
                    ax.text(x, 50, "failed", rotation=90, ha="center", va="center", fontsize=7, color=color)
                    continue
                m, yerr = mnist_runs.percent_range(s["error"])
                ax.errorbar(
                    x,
                    m,
                    yerr=yerr,
                    color=color,
                    marker=marker,
                    capsize=3,
                    lw=1.2,
                    ls="none",
                    label=None if labelled else setting,
                )
                labelled = True
                ax.annotate(f"{m:.1f}", (x, m), textcoords="offset points", xytext=(4, -3), fontsize=6)
                if s["diverged"]:
                    mnist_runs.note_above(ax, f"{s['diverged']} NaN", x, s["error"], 5, 6)
        mnist_runs.float_line(ax, report)
        ax.set_xticks(range(len(NAMES)))
        ax.set_xticklabels(NAMES)
        ax.set_xlim(-0.5, len(NAMES) - 0.5)
        ax.set_yscale("log")
        ax.set_title(f"{init} initialization")
        ax.grid(axis="y", alpha=0.3, which="both")
    axes[0].set_ylabel("held-out error (%): mean, min-max over seeds")
    axes[1].legend(loc="center", fontsize=8)
    n = len(report["settings"]["seeds"])
    fig.suptitle(
        f"Small CNN on the MNIST subset, {n} seed(s), no memory constraint, "
        f"{report['settings']['optimizer']} lr {report['settings']['lr']:g}"
    )
    print(f"wrote {common.save_figure(fig, path)}")


def print_table(report):
    summary = report["summary"]
    print("\nheld-out error %, mean +- std over seeds [mean weight bits]; random / float init")
    for setting in SETTINGS:
        cells = []
        for name in NAMES:
            parts = []
            for init in INITS:
                s = summary.get(config_name(name, setting, init))
                if s is None:
                    parts.append("-")
                elif s["error"] is None:
                    parts.append("failed")
                else:
                    div = f" ({s['diverged']} div.)" if s["diverged"] else ""
                    parts.append(
                        f"{100 * s['error']['mean']:.2f}+-{100 * s['error']['std']:.2f}"
                        f" [{s['mean_weight_bits']['mean']:.1f}]{div}"
                    )
            cells.append(f"{name}: {' / '.join(parts)}")
        print(f"{setting:4s} " + " | ".join(cells))
    ferr = report["float"]["error"]
    if ferr:
        print(f"float: {100 * ferr['mean']:.2f}+-{100 * ferr['std']:.2f}")
    finding = report["paper_finding"]
    for key, per in finding["per_setting"].items():
        for family, v in per.items():
            means = ", ".join(
                f"{n} {100 * m:.2f}" if m is not None else f"{n} -" for n, m in v["mean_error"].items()
            )
            print(
                f"{key:12s} {family:7s}: lowest {v['lowest']} ({means}) -> paper's finding "
                f"{'holds' if v['holds'] else 'does not hold'}"
            )
    print(f"paper's finding holds in {finding['holding']} of {finding['checked']} comparisons")


RUN_FLAGS = (
    "seeds",
    "float_epochs",
    "epochs",
    "random_epochs",
    "optimizer",
    "lr",
    "names",
    "settings",
    "inits",
    "n_train",
    "out_dir",
    "plot",
)


def _replot(report, out_dir):
    draw(report, out_dir)
    print_table(report)


main = common.script_main(run, RUN_FLAGS, QUICK, replot=("parametrizations", _replot))


if __name__ == "__main__":
    define_flags()
    app.run(main)
