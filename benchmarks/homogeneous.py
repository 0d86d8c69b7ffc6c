"""The paper's Table 3 at CPU scale: learned mixed precision against fixed
and TQT quantization at the same memory, and the accuracy-vs-size curve.

Small MNIST CNN (``tfdq.models.small_cnn``, 29,658 weights) on the real
MNIST subset (4,000 training / 1,000 held-out digits), every quantized run
starting from the float model of its seed (trained once per seed: Adam
1e-3, batch 64, ``--float_epochs``).

Table 3 rows, each in a uniform and a power-of-two version:

=========================  =========================================================
fixed 2/32                 2-bit weights, q_max fixed at its initial value
                           (``U2(learn=(), init_bits=2)`` / ``P1(learn=(), ...)``)
TQT 2/32                   2-bit weights, q_max learned (``learn=("q_max",)``)
learned (8a)               U3 / P3 weights under a weight budget of 2-bit average + 7%
fixed 2/4, TQT 2/4         the same with 4-bit activation quantizers
learned (8a)+(8b)          U3 / P3 weights and activations, (8a) as above and the
                           total activation memory of 4-bit activations
learned (8a)+(8c)          ... and the largest feature map at 4 bits instead
=========================  =========================================================

Sizes as the paper counts them (``tfdq.memory``; kB of 1024 bytes): weights
``(kernel + bias) b_w``, activations ``elements b_x`` of every quantized
feature map but the input image, in sum (8b) and largest (8c); float maps at
32 bits. Every quantized run trains ``--quant_epochs`` (Adam 1e-3), then
the finish: for budgets ``enforce_budget``; for all, ``freeze_quantizers``
and ``--finish_epochs`` of weight fine-tuning (Adam 5e-4), so the baselines
get the same number of epochs and the same schedule as the learned runs.
The learned runs record whether every constraint holds at the end.

The curve: U3 weights (activations float) under (8a) budgets of
``--curve_bits`` (1.5, 2, 3, 4, 6, 8) bits per weight on average, against
fixed ``--fixed_bits`` (2, 3, 4, 8); a budget below the smallest reachable
size (every layer at tfdq's 2-bit minimum for signed weights) is refused by
``tfdq.constrain`` and recorded as infeasible. The fixed 2-bit point is the
table's "fixed 2/32 uniform" run.

Checks (printed and in the JSON): learned mixed precision has a lower mean
error than fixed 2-bit and TQT at the same budget (weights only: (8a) vs
2/32; with activations: (8a)+(8b) and (8a)+(8c) vs 2/4), and the uniform
learned (8a)+(8c) run is within 1.0 point of float. Results:
``<out_dir>/homogeneous.json``, ``homogeneous_table3.png``,
``homogeneous_pareto.png``::

    python -m benchmarks.homogeneous --threads=1               # full: 3 seeds
    python -m benchmarks.homogeneous --quick --out_dir=/tmp/h  # smoke run, under a minute
"""

import json
import os
import time

from absl import app, flags

from benchmarks import common, mnist_runs

MARGIN = 1.07  # the paper's 70 kB against 65.5 kB of 2-bit weights
FAMILIES = {
    "uniform": {"fixed": "fixed", "tqt": "tqt", "learned": "U3"},
    "pow2": {"fixed": "fixed_pow2", "tqt": "tqt_pow2", "learned": "P3"},
}
ROWS = (
    "fixed 2/32",
    "TQT 2/32",
    "learned (8a)",
    "fixed 2/4",
    "TQT 2/4",
    "learned (8a)+(8b)",
    "learned (8a)+(8c)",
)
CURVE_BITS = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
FIXED_BITS = (2, 3, 4, 8)
QUICK = {
    "seeds": (0,),
    "float_epochs": 1,
    "quant_epochs": 1,
    "finish_epochs": 1,
    "n_train": 512,
    "families": ("uniform",),
    "rows": ("fixed 2/4", "learned (8a)+(8c)"),
    "curve_bits": (1.5, 3.0),
    "fixed_bits": (),
}
PAPER = {  # docs/method.md section 7, Table 3 (ResNet-20, CIFAR-10), error in %: uniform, pow-2
    "float": (7.29, None),
    "fixed 2/32": (10.81, 8.99),
    "TQT 2/32": (9.47, 8.79),
    "learned (8a)": (8.59, 8.53),
    "fixed 2/4": (11.30, 11.62),
    "TQT 2/4": (9.62, 11.29),
    "learned (8a)+(8b)": (9.38, 11.29),
    "learned (8a)+(8c)": (8.58, 11.23),
}


def define_flags():
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Random seeds (one float model per seed).")
    flags.DEFINE_integer("float_epochs", 8, "Float training epochs.")
    flags.DEFINE_integer("quant_epochs", 4, "Quantized training epochs (Adam 1e-3).")
    flags.DEFINE_integer("finish_epochs", 2, "Weight fine-tuning epochs with frozen quantizers (Adam 5e-4).")
    flags.DEFINE_list("families", list(FAMILIES), "uniform and/or pow2.")
    flags.DEFINE_list("rows", list(ROWS), "Table 3 rows to run.")
    flags.DEFINE_list(
        "curve_bits", [str(b) for b in CURVE_BITS], "Average weight bits of the learned (8a) curve."
    )
    flags.DEFINE_list("fixed_bits", [str(b) for b in FIXED_BITS], "Bits of the fixed curve.")
    flags.DEFINE_integer("n_train", 0, "Training images (0: all 4,000).")
    flags.DEFINE_string("out_dir", common.RESULTS_DIR, "Output folder.")
    flags.DEFINE_integer("threads", 0, common.THREADS_HELP)
    flags.DEFINE_bool("quick", False, "Smoke run (QUICK settings).")
    flags.DEFINE_bool("plot", True, "Write the PNGs.")
    flags.DEFINE_bool("replot", False, "Only redraw the PNGs and reprint the tables from <out_dir>'s JSON.")


def table_config(row, family):
    q = FAMILIES[family]
    c = {"name": f"{row} {family}", "row": row, "family": family}
    if row.startswith(("fixed", "TQT")):
        kind = "fixed" if row.startswith("fixed") else "tqt"
        c.update(weight=q[kind], weight_bits=2)
        if row.endswith("/4"):
            c.update(activation=q[kind], activation_bits=4)
        return c
    c.update(weight=q["learned"], weight_budget_bits=2.0, weight_budget_margin=MARGIN)
    if "(8b)" in row:
        c.update(activation=q["learned"], activation_budget=("sum", 4))
    if "(8c)" in row:
        c.update(activation=q["learned"], activation_budget=("max", 4))
    return c


def curve_configs(curve_bits, fixed_bits):
    out = []
    for b in curve_bits:
        out.append(
            {
                "name": f"curve learned (8a) {b:g} bits",
                "curve": "learned",
                "bits": float(b),
                "weight": "U3",
                "weight_budget_bits": float(b),
                "weight_budget_margin": 1.0,
            }
        )
    for b in fixed_bits:
        out.append(
            {
                "name": f"curve fixed {int(b)} bits",
                "curve": "fixed",
                "bits": float(b),
                "weight": "fixed",
                "weight_bits": int(b),
            }
        )
    return out


def _same_run_key(config):
    """What makes two configs the same training run (labels aside)."""
    keys = (
        "weight",
        "weight_bits",
        "activation",
        "activation_bits",
        "weight_budget_bits",
        "weight_budget_margin",
        "activation_budget",
    )
    return json.dumps({k: config.get(k) for k in keys}, default=list)


def run(
    seeds=(0, 1, 2),
    float_epochs=8,
    quant_epochs=4,
    finish_epochs=2,
    families=tuple(FAMILIES),
    rows=ROWS,
    curve_bits=CURVE_BITS,
    fixed_bits=FIXED_BITS,
    n_train=None,
    out_dir=common.RESULTS_DIR,
    plot=True,
    verbose=0,
):
    """Run the table and the curve for every seed; write JSON and PNGs; return the report."""
    start = time.time()
    seeds = [int(s) for s in seeds]
    table = [table_config(r, f) for f in families for r in rows]
    curve = curve_configs([float(b) for b in curve_bits], [int(float(b)) for b in fixed_bits])
    todo = table + curve
    counts = mnist_runs.feature_counts()
    data = mnist_runs.load_data(n_train or None)
    settings = {
        **mnist_runs.schedule_settings(seeds, float_epochs, quant_epochs, finish_epochs, data, counts),
        "weight_budget_margin": MARGIN,
        "counts": counts,
        "configurations": [c["name"] for c in todo],
    }
    done = {}

    def run_one(seed_start, config):
        key = (seed_start.seed, _same_run_key(config))
        if key in done:  # e.g. the curve's fixed 2 bits is the table's fixed 2/32 uniform
            return dict(done[key], name=config["name"], same_run_as=done[key]["name"])
        done[key] = seed_start.run(config, quant_epochs, finish_epochs)
        return done[key]

    def write(floats, records, complete, plot=False):
        return _write(out_dir, settings, counts, floats, records, todo, start, complete, plot)

    floats, records = mnist_runs.run_configs(
        "homogeneous", todo, seeds, data, counts, float_epochs, run_one, write, verbose
    )
    report = write(floats, records, complete=True, plot=plot)
    print_report(report)
    return report


def check_targets(summary, float_error):
    """Learned beats fixed 2-bit and TQT at the same budget; (8a)+(8c) uniform within 1 point of float."""

    def mean(name):
        s = summary.get(name)
        return None if s is None or s["error"] is None else s["error"]["mean"]

    comparisons = []
    for family in FAMILIES:
        for learned, baselines in (
            ("learned (8a)", ("fixed 2/32", "TQT 2/32")),
            ("learned (8a)+(8b)", ("fixed 2/4", "TQT 2/4")),
            ("learned (8a)+(8c)", ("fixed 2/4", "TQT 2/4")),
        ):
            lm = mean(f"{learned} {family}")
            for base in baselines:
                bm = mean(f"{base} {family}")
                if lm is None or bm is None:
                    continue
                comparisons.append(
                    {
                        "family": family,
                        "learned": learned,
                        "baseline": base,
                        "learned_error": lm,
                        "baseline_error": bm,
                        "beats": lm < bm,
                    }
                )
    out = {"learned_beats_baselines": comparisons}
    for family in FAMILIES:
        fam = [c["beats"] for c in comparisons if c["family"] == family]
        if fam:
            out[f"learned_beats_all_{family}"] = all(fam)
    if float_error is not None:
        for family in FAMILIES:
            m = mean(f"learned (8a)+(8c) {family}")
            if m is not None:
                gap = m - float_error["mean"]
                out[f"8a8c_{family}_vs_float"] = {
                    "learned_error": m,
                    "float_error": float_error["mean"],
                    "gap_points": 100 * gap,
                    "within_1_point": bool(100 * gap <= 1.0),
                    "constraints_met_all_seeds": summary[f"learned (8a)+(8c) {family}"].get(
                        "all_constraints_met"
                    ),
                }
    return out


def _write(out_dir, settings, counts, floats, records, todo, start, complete, plot):
    summary = mnist_runs.summarize_configs(todo, records)
    float_error = mnist_runs.aggregate([f["error"] for f in floats])
    payload = {
        "complete": complete,
        "settings": settings,
        "float": dict(mnist_runs.float_sizes(counts), per_seed=floats, error=float_error),
        "summary": summary,
        "targets": check_targets(summary, float_error),
        "paper_table3_percent": PAPER,
        "runs": records,
        "seconds": time.time() - start,
    }
    return common.save_report(
        out_dir,
        "homogeneous",
        "Table 3 at CPU scale: learned mixed precision vs fixed / TQT, and error vs weight size, small MNIST CNN",
        "python -m benchmarks.homogeneous --threads=1",
        payload,
        complete,
        draw=draw if plot else None,
    )


def draw(report, out_dir):
    """Both PNGs of a report: ``homogeneous_table3.png`` and ``homogeneous_pareto.png``."""
    plot_table(report, os.path.join(out_dir, "homogeneous_table3.png"))
    plot_curve(report, os.path.join(out_dir, "homogeneous_pareto.png"))


def plot_table(report, path):
    """Table 3 as bars: mean error with min-max over seeds, uniform and pow-2."""
    plt = common.pyplot()
    summary = report["summary"]
    fig, ax = plt.subplots(figsize=(10, 4.2))
    width = 0.38
    for k, (family, color) in enumerate(zip(FAMILIES, ("tab:blue", "tab:green"))):
        for i, row in enumerate(ROWS):
            s = summary.get(f"{row} {family}")
            if s is None or s["error"] is None:
                continue
            m, yerr = mnist_runs.percent_range(s["error"])
            x = i + (k - 0.5) * width
            ax.bar(x, m, width, color=color, alpha=0.8, label=family if i == 0 else None)
            ax.errorbar(x, m, yerr=yerr, color="k", capsize=3, lw=1)
            mnist_runs.note_above(ax, f"{m:.2f}", x, s["error"], 3, 7)
    mnist_runs.float_line(ax, report)
    ax.set_xticks(range(len(ROWS)))
    ax.set_xticklabels(ROWS, rotation=15, fontsize=8)
    ax.set_ylabel("held-out error (%), mean and min-max")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(
        f"Table 3 rows, small CNN on the MNIST subset, {len(report['settings']['seeds'])} seed(s)",
        fontsize=10,
    )
    print(f"wrote {common.save_figure(fig, path)}")


def curve_points(report, kind):
    """(bits, weight kB summary, error summary, infeasible message) of one curve."""
    pts = []
    for s in report["summary"].values():
        c = s["config"]
        if c.get("curve") != kind:
            continue
        pts.append((c["bits"], s["weight_kb"], s["error"], s["failed"][0] if s["failed"] else None))
    return sorted(pts, key=lambda p: p[0])


def plot_curve(report, path):
    """Held-out error against weight kB: learned (8a) budgets and fixed bitwidths."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, color, marker in (("learned", "tab:red", "o"), ("fixed", "tab:blue", "s")):
        pts = [p for p in curve_points(report, kind) if p[2] is not None]
        if not pts:
            continue
        xs = [p[1]["mean"] for p in pts]
        ys = [100 * p[2]["mean"] for p in pts]
        yerr = [
            [y - 100 * p[2]["min"] for y, p in zip(ys, pts)],
            [100 * p[2]["max"] - y for y, p in zip(ys, pts)],
        ]
        xerr = [[x - p[1]["min"] for x, p in zip(xs, pts)], [p[1]["max"] - x for x, p in zip(xs, pts)]]
        label = "learned U3, (8a) budget" if kind == "learned" else "fixed (U2, q_max fixed)"
        ax.errorbar(xs, ys, yerr=yerr, xerr=xerr, color=color, marker=marker, capsize=3, label=label)
        for p, x, y in zip(pts, xs, ys):
            ax.annotate(
                f"{p[0]:g}b", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color
            )
    infeasible = [p for p in curve_points(report, "learned") if p[2] is None]
    if infeasible:
        ax.text(
            0.02,
            0.02,
            "infeasible: "
            + ", ".join(f"{p[0]:g} bits" for p in infeasible)
            + " (below every layer at 2 bits)",
            transform=ax.transAxes,
            fontsize=7,
        )
    fl = report["float"]
    if fl["error"]:
        ax.errorbar(
            [fl["weight_kb"]],
            [100 * fl["error"]["mean"]],
            yerr=[
                [100 * (fl["error"]["mean"] - fl["error"]["min"])],
                [100 * (fl["error"]["max"] - fl["error"]["mean"])],
            ],
            color="k",
            marker="*",
            ms=10,
            capsize=3,
            ls="none",
            label="float (32 bits)",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("weight memory (kB), mean and min-max over seeds")
    ax.set_ylabel("held-out error (%), mean and min-max")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("Error vs weight size, small CNN on the MNIST subset (activations float)")
    print(f"wrote {common.save_figure(fig, path)}")


def _cell(s):
    if s is None:
        return "-"
    if s["error"] is None:
        return "failed"
    e = s["error"]
    return f"{100 * e['mean']:.2f}+-{100 * e['std']:.2f}"


def print_report(report):
    summary = report["summary"]
    fl = report["float"]
    print("\nTable 3 (held-out error %, mean +- std over seeds; sizes in kB, mean)")
    print(f"{'row':20s} {'W kB':>7s} {'A max':>7s} {'A sum':>7s} {'uniform':>13s} {'pow2':>13s}  met (u/p)")
    if fl["error"]:
        print(
            f"{'float':20s} {fl['weight_kb']:7.2f} {fl['activation_kb_max']:7.2f} {fl['activation_kb_sum']:7.2f} "
            f"{_cell({'error': fl['error']}):>13s}"
        )
    for row in ROWS:
        su, sp = summary.get(f"{row} uniform"), summary.get(f"{row} pow2")
        ref = su or sp
        if ref is None or ref["weight_kb"] is None:
            continue
        met = "/".join(str(s.get("all_constraints_met", "-")) if s else "-" for s in (su, sp))
        print(
            f"{row:20s} {ref['weight_kb']['mean']:7.2f} {ref['activation_kb_max']['mean']:7.2f} "
            f"{ref['activation_kb_sum']['mean']:7.2f} {_cell(su):>13s} {_cell(sp):>13s}  {met}"
        )
    print("\nerror vs weight size (weights only)")
    for kind in ("learned", "fixed"):
        for bits, wkb, err, failed in curve_points(report, kind):
            if err is None:
                print(f"  {kind:8s} {bits:4g} bits: {failed}")
            else:
                print(
                    f"  {kind:8s} {bits:4g} bits: {wkb['mean']:7.2f} kB  error {100 * err['mean']:.2f}"
                    f"+-{100 * err['std']:.2f}%"
                )
    t = report["targets"]
    print("\ntargets")
    for c in t["learned_beats_baselines"]:
        print(
            f"  {c['family']:7s} {c['learned']:18s} {100 * c['learned_error']:.2f}% vs {c['baseline']:10s} "
            f"{100 * c['baseline_error']:.2f}%: {'beats' if c['beats'] else 'does NOT beat'}"
        )
    for family in FAMILIES:
        if f"learned_beats_all_{family}" in t:
            print(f"  learned beats every baseline ({family}): {t[f'learned_beats_all_{family}']}")
        v = t.get(f"8a8c_{family}_vs_float")
        if v:
            print(
                f"  (8a)+(8c) {family}: {100 * v['learned_error']:.2f}% vs float {100 * v['float_error']:.2f}%, "
                f"gap {v['gap_points']:+.2f} points: within 1.0 point {v['within_1_point']}"
                f" (constraints met on every seed: {v['constraints_met_all_seeds']})"
            )


RUN_FLAGS = (
    "seeds",
    "float_epochs",
    "quant_epochs",
    "finish_epochs",
    "families",
    "rows",
    "curve_bits",
    "fixed_bits",
    "n_train",
    "out_dir",
    "plot",
)


def _replot(report, out_dir):
    draw(report, out_dir)
    print_report(report)


main = common.script_main(run, RUN_FLAGS, QUICK, replot=("homogeneous", _replot))


if __name__ == "__main__":
    define_flags()
    app.run(main)
