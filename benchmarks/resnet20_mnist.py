"""The paper's own model at the paper's budgets, at CPU scale: ResNet-20 on
the MNIST subset, learned mixed precision against fixed and TQT quantization.

ResNet-20 (``tfdq.models.resnet20(input_shape=(32, 32, 1))``, 268,058
counted weights with the one-channel stem) on the real MNIST subset (4,000
training / 1,000 held-out digits), the 28x28 digits zero-padded to 32x32 as
the paper feeds MNIST to its CIFAR network. The runner is the one of the
small-CNN Table 3 (``benchmarks.mnist_runs`` with ``model="resnet20"``):
per seed one float model (Adam 1e-3, batch 64, ``--float_epochs``), then
every configuration starts from it (calibrated activations) and trains
``--quant_epochs`` (Adam 1e-3) + ``--finish_epochs`` (5e-4).

Configurations (uniform quantizers; rows named as in ``benchmarks.homogeneous``):

=====================  ============================================================
learned (8a)+(8c)      U3 weights and activations under the paper's budgets: weights
                       70 kB (2-bit size of the 268,058 weights + 7%, 70.02 kB as
                       ``tfdq.memory`` counts it) and the largest feature map 8 kB
                       (32x32x16 values at 4 bits); ``tfdq.constrain`` with the
                       targets only (automatic multipliers, no lambda), one ``fit``
                       whose final phase (``FinishInsideBudget``) ends inside both
fixed 2/4, TQT 2/4     2-bit weights, 4-bit activations: q_max fixed at its initial
                       value / learned (``benchmarks.homogeneous.table_config``)
fixed 4/4, TQT 4/4     the same at 4-bit weights (twice the weight memory)
=====================  ============================================================

The baselines get the same epochs: ``--quant_epochs`` learning, then their
quantizers frozen and ``--finish_epochs`` of weight fine-tuning. Records per
run the held-out error, the sizes (kB of 1024 bytes, ``tfdq.memory``) and,
for the learned run, whether every constraint holds at the end. Results:
``<out_dir>/resnet20_mnist.json``; prints the table::

    python -m benchmarks.resnet20_mnist --threads=1                  # 3 seeds x 5 configurations
    python -m benchmarks.resnet20_mnist --quick --out_dir=/tmp/r20  # smoke run

or one process per seed, side by side, then one report of them (``--merge``)::

    for s in 0 1 2; do
      nice -n 5 python -m benchmarks.resnet20_mnist --threads=1 --seeds=$s --name=resnet20_mnist_seed$s &
    done; wait
    python -m benchmarks.resnet20_mnist --merge=resnet20_mnist_seed0,resnet20_mnist_seed1,resnet20_mnist_seed2

The default schedule (2 float epochs, 1 quantized + 1 final-phase epoch) is
sized for 2 shared CPU cores; the paper trains far longer on a GPU.
"""

import time

from absl import app, flags

from benchmarks import common, homogeneous, mnist_runs

FLAGS = flags.FLAGS

MODEL = "resnet20"
EXPERIMENT = (
    "ResNet-20 on the MNIST subset (28x28 padded to 32x32) at the paper's budgets (70 kB weights, 8 kB "
    "largest activation): learned mixed precision vs fixed / TQT"
)
ROWS = ("learned (8a)+(8c)", "fixed 2/4", "TQT 2/4", "fixed 4/4", "TQT 4/4")
QUICK = {
    "seeds": (0,),
    "float_epochs": 1,
    "quant_epochs": 1,
    "finish_epochs": 1,
    "n_train": 128,
    "n_test": 200,
    "rows": ("learned (8a)+(8c)", "fixed 2/4"),
}
PAPER = {  # the paper's budgets for its ResNet-20 (docs/method.md section 5)
    "weight_kb": 70.0,
    "activation_kb_max": 8.0,
}


def define_flags():
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Random seeds (one float model per seed).")
    flags.DEFINE_integer("float_epochs", 2, "Float training epochs.")
    flags.DEFINE_integer("quant_epochs", 1, "Quantized training epochs (Adam 1e-3).")
    flags.DEFINE_integer(
        "finish_epochs", 1, "Final-phase epochs: quantizers fixed, weights fine-tuned (5e-4)."
    )
    flags.DEFINE_list("rows", list(ROWS), "Configurations to run.")
    flags.DEFINE_integer("n_train", 0, "Training images (0: all 4,000).")
    flags.DEFINE_integer("n_test", 0, "Held-out images (0: all 1,000).")
    flags.DEFINE_string("out_dir", common.RESULTS_DIR, "Output folder.")
    flags.DEFINE_string("name", "resnet20_mnist", "Result file stem (e.g. one per seed, run side by side).")
    flags.DEFINE_integer("threads", 0, common.THREADS_HELP)
    flags.DEFINE_bool("quick", False, "Smoke run (QUICK settings).")
    flags.DEFINE_list(
        "merge", [], "Only merge these per-seed result stems of <out_dir> into <out_dir>/<name>.json."
    )


def config(row):
    """The run config of one of :data:`ROWS` (uniform family)."""
    if row not in ROWS:
        raise ValueError(f"Unknown row {row!r}: use one of {', '.join(ROWS)}.")
    if row.endswith("4/4"):
        c = homogeneous.table_config(row.replace("4/4", "2/4"), "uniform")
        c.update(weight_bits=4)
    else:
        c = homogeneous.table_config(row, "uniform")
    c.update(name=row, row=row)
    return c


def run(
    seeds=(0, 1, 2),
    float_epochs=2,
    quant_epochs=1,
    finish_epochs=1,
    rows=ROWS,
    n_train=None,
    n_test=None,
    out_dir=common.RESULTS_DIR,
    name="resnet20_mnist",
    quick=False,
    verbose=0,
):
    """Every configuration on every seed; writes the JSON and returns the report."""
    start = time.time()
    seeds = [int(s) for s in seeds]
    todo = [config(r) for r in rows]
    counts = mnist_runs.feature_counts(MODEL)
    data = mnist_runs.load_data(n_train or None, n_test or None, model=MODEL)
    learned = config("learned (8a)+(8c)")
    weight_kb, act_kb, _ = mnist_runs.budget_targets(learned, counts)
    settings = {
        "model": MODEL,
        "input_shape": list(data[0][0].shape[1:]),
        **mnist_runs.schedule_settings(seeds, float_epochs, quant_epochs, finish_epochs, data, counts),
        "largest_activation_count": max(counts["activations"].values()),
        "budget_weight_kb": weight_kb,
        "budget_activation_kb_max": act_kb,
        "paper_budgets_kb": PAPER,
        "configurations": [c["name"] for c in todo],
    }
    name = common.result_name(name, quick)
    command = (
        f"nice -n 5 python -m benchmarks.resnet20_mnist --threads=1 --seeds={','.join(map(str, seeds))} "
        f"--float_epochs={float_epochs} --quant_epochs={quant_epochs} --finish_epochs={finish_epochs} "
        f"--name={name}" + (" --quick" if quick else "")
    )

    def run_one(seed_start, c):
        return seed_start.run(c, quant_epochs, finish_epochs)

    def write(floats, records, complete):
        payload = build_payload(
            settings, mnist_runs.float_sizes(counts), floats, records, time.time() - start
        )
        return common.save_report(
            out_dir, name, EXPERIMENT, command, dict(payload, complete=complete), complete
        )

    floats, records = mnist_runs.run_configs(
        "resnet20_mnist", todo, seeds, data, counts, float_epochs, run_one, write, verbose, model=MODEL
    )
    report = write(floats, records, complete=True)
    print(format_report(report))
    return report


def build_payload(settings, float_sizes, floats, records, seconds):
    """The report's JSON payload (without ``complete``) from the float and run records."""
    todo = [config(r) for r in settings["configurations"]]
    return {
        "settings": settings,
        "float": dict(float_sizes, per_seed=floats, error=mnist_runs.aggregate([f["error"] for f in floats])),
        "summary": mnist_runs.summarize_configs(todo, records),
        "learned_feasible": [
            {"seed": r["seed"], "constraints_met": r.get("constraints_met"), "failed": r.get("failed")}
            for r in records
            if r["name"] == "learned (8a)+(8c)"
        ],
        "runs": records,
        "seconds": seconds,
    }


def merge(names, out_dir=common.RESULTS_DIR, name="resnet20_mnist"):
    """One report from the per-seed reports ``<out_dir>/<names[i]>.json`` (runs
    side by side, one seed each, with the same settings); complete only if
    each part is. Writes ``<out_dir>/<name>.json`` and returns the report."""
    parts = [common.load_result(out_dir, n) for n in names]
    settings = dict(parts[0]["settings"])
    keys = ("float_epochs", "quant_epochs", "finish_epochs", "n_train", "n_test", "configurations")
    for n, p in zip(names, parts):
        differ = [k for k in keys if p["settings"][k] != settings[k]]
        if differ:
            raise ValueError(f"{n}.json was run with other settings ({', '.join(differ)}): cannot merge")
    settings["seeds"] = [s for p in parts for s in p["settings"]["seeds"]]
    settings["merged_from"] = [f"{n}.json" for n in names]
    float_sizes = {k: v for k, v in parts[0]["float"].items() if k not in ("per_seed", "error")}
    floats = [f for p in parts for f in p["float"]["per_seed"]]
    records = [r for p in parts for r in p["runs"]]
    payload = build_payload(settings, float_sizes, floats, records, max(p["seconds"] for p in parts))
    complete = all(p.get("complete") for p in parts)
    commands = [p.get("command", f"(partial: {n}.json, run in progress)") for n, p in zip(names, parts)]
    command = " & ".join(commands) + f"; python -m benchmarks.resnet20_mnist --merge={','.join(names)}"
    report = common.save_report(out_dir, name, EXPERIMENT, command, dict(payload, complete=complete), True)
    print(format_report(report))
    print(markdown_table(report))
    return report


def _spread(agg, scale=1.0, digits=2):
    if agg is None:
        return "-"
    return (
        f"{scale * agg['mean']:.{digits}f} +- {scale * agg['std']:.{digits}f} "
        f"[{scale * agg['min']:.{digits}f}, {scale * agg['max']:.{digits}f}]"
    )


COLUMNS = (
    ("configuration", 18),
    ("seeds", 5),
    ("error % mean +- std [min, max]", 32),
    ("W kB", 7),
    ("A max kB", 8),
    ("W bits", 6),
    ("met", 5),
)


def table_rows(report):
    """Cells of the table (:data:`COLUMNS`): error (%) mean +- std [min, max]
    over the seeds that finished, sizes (kB, mean), mean weight bits and, for
    the learned run, on how many seeds every constraint held at the end."""
    fl = report["float"]
    rows = []
    if fl["error"]:
        rows.append(
            ["float", str(fl["error"]["n"]), _spread(fl["error"], 100), f"{fl['weight_kb']:.1f}"]
            + [f"{fl['activation_kb_max']:.1f}", "32", "-"]
        )
    for name, summ in report["summary"].items():
        if summ["weight_kb"] is None:
            rows.append(f"{name}: failed {summ['failed']}")
            continue
        met = "-"
        if "all_constraints_met" in summ:
            runs = [r for r in report["runs"] if r["name"] == name and "failed" not in r]
            met = f"{sum(all(r['constraints_met'].values()) for r in runs)}/{summ['runs']}"
        rows.append(
            [
                name,
                str(summ["error"]["n"]),
                _spread(summ["error"], 100),
                f"{summ['weight_kb']['mean']:.2f}",
                f"{summ['activation_kb_max']['mean']:.2f}",
                f"{summ['mean_weight_bits']['mean']:.2f}",
                met,
            ]
        )
    return rows


def format_report(report):
    """The table as text, then the feasibility of every learned run."""
    s = report["settings"]
    lines = [
        f"ResNet-20, MNIST subset {s['input_shape']}, {s['n_train']} train / {s['n_test']} test, "
        f"seeds {s['seeds']}; budgets {s['budget_weight_kb']:.2f} kB weights, "
        f"{s['budget_activation_kb_max']:.2f} kB largest activation",
        common.format_table(COLUMNS, table_rows(report)),
    ]
    for f in report["learned_feasible"]:
        lines.append(
            f"  learned seed {f['seed']}: constraints met {f['constraints_met']}"
            + (f" FAILED {f['failed']}" if f["failed"] else "")
        )
    return "\n".join(lines)


def markdown_table(report):
    """The table in Markdown (for BENCHMARKS.md)."""
    lines = ["| " + " | ".join(t for t, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in table_rows(report):
        lines.append(f"| {row} |" if isinstance(row, str) else "| " + " | ".join(row) + " |")
    return "\n".join(lines)


RUN_FLAGS = (
    "seeds",
    "float_epochs",
    "quant_epochs",
    "finish_epochs",
    "rows",
    "n_train",
    "n_test",
    "out_dir",
    "name",
    "quick",
)


def _run_or_merge(merge_names=(), **kwargs):
    if merge_names:
        return merge(merge_names, kwargs["out_dir"], kwargs["name"])
    return run(**kwargs)


def main(argv):
    """Run (``run``), or with ``--merge`` only merge per-seed results (``merge``)."""
    common.script_main(lambda **kw: _run_or_merge(FLAGS.merge, **kw), RUN_FLAGS, QUICK)(argv)


if __name__ == "__main__":
    define_flags()
    app.run(main)
