"""Gaussian toy experiment of Uhlich et al., ICLR 2020 (Fig. 3; docs/method.md section 7).

Quantize 10^4 samples of N(0, 1) with each of the six parametrizations
(U1 = (b, d), U2 = (b, q_max), U3 = (d, q_max), P1 = (b, q_max),
P2 = (b, q_min), P3 = (q_min, q_max)) and learn the two parameters of each by
minimizing the mean squared quantization error ``E[(Q(x) - x)^2]`` with plain
SGD (``keras.optimizers.SGD``, no momentum), one learning rate shared by all
six. The paper's claim: U3 and P3 reach the lowest MSE and do not oscillate,
while the parametrizations that learn the bitwidth oscillate or converge
worse.

Setup (all flags, defaults in brackets):

* Data: ``--n_samples`` [10^4] draws of N(0, 1), ``np.random.default_rng(seed)``
  for each seed in ``--seeds`` [0,1,2]; the same samples for all six.
* Initialization, identical for all six: ``q.initialize_from(init_scale * x,
  bits=init_bits)``, i.e. docs/method.md section 4 (start at b = 4, uniform
  ``d = 2^floor(log2(max|x| / 7))``, ``q_max = 7 d``; power of two
  ``q_max = 2^round(log2 max|x|)``, ``q_min = q_max / 2^7``). With
  ``--init_scale`` [1] below 1 every quantizer starts with a range that is
  too small by that factor (a deliberately poor, common start).
* Bit budget: the objective alone always asks for more bits (more bits means
  less error), so comparing MSEs at different bitwidths would compare
  budgets, not parametrizations. Every quantizer therefore gets the same hard
  bound ``max_bits`` [4] (tfdq's bounds, projected after every SGD step; for
  U3/P3 the bound limits ``q_max/d`` resp. ``q_max/q_min``). The table and the
  JSON report the final bitwidth and the largest bitwidth seen during the
  run, so the budget can be checked. ``--max_bits 8`` gives tfdq's default
  bounds (docs/method.md section 3).
* Learning rate ``--lr`` [0.1]: the power-of-two parameters have small
  gradients (only the samples beyond q_max or below q_min contribute), and
  0.1 is where they move within a few thousand steps and P2's coupled
  gradient (``q_max/q_min = 2^7`` times larger outside) shows its bursts.
  Rates from 0.003 to 0.3 were tried (3000 steps, init_scale 1 and 1/8): U1
  oscillates between d = 1/4 and 1/2 at all of them, U2 ends worse from 0.01
  up, and U3 ends worst at all of them (see below); P3 ends worst from 0.01
  up (at 0.003 its drift is slower than the run).
* ``--steps`` [3000] SGD steps (full batch), the step in a ``tf.function``.

Recorded per parametrization: the MSE at every iteration (``mse[k]`` after
k updates, first seed), the final MSE, the oscillation (standard deviation of
the MSE over the last ``--osc_window`` [100] iterations), the minimum MSE,
the final bitwidth and parameters; final MSE and oscillation are medians over
the seeds. Results go to ``<out_dir>/gaussian.json`` and ``gaussian.png``
(MSE per iteration on a log scale and the learned range, uniform and
power-of-two panels) and a table is printed. :func:`check_ordering` tests
the paper's claim; ``tests/test_gaussian.py`` runs the reduced (``--quick``)
configuration.

Uniform step sizes are left unrounded here (``round_step=False``): the
power-of-two rounding of d is a hardware constraint of the DNN experiments
(docs/method.md section 3), not part of this experiment, and with it every
uniform parametrization can only sit on octaves of d.

Observed with tfdq at the time of writing (see the JSON ``checks``): the
ordering holds. At the common 4-bit bound U3 reaches the optimum (d = 0.352,
q_max = 2.465, MSE 0.0129) with no oscillation, as U1 does at this learning
rate; U2 gets there too but wobbles on the way (std 3e-8 over the last 100
steps). P3 reaches P1's optimum (q_min = 2^-5, q_max = 4) with no
oscillation, while P2 keeps bursting (std 2e-5). From a start with a range
8x too small (``--init_scale 0.125``) P3 settles one octave higher (MSE
0.0421 vs 0.0416, within the 2% tolerance). Two details of tfdq's bounds
matter here: where the bit bound binds, the range's gradient also reaches
the step (``ops.ratio_clip``), and the projection never shrinks q_max to the
bound (for P3 it raises q_min instead): with a plain clip, the step's
straight-through gradient, which always asks for a finer step, dragged the
range down one octave at a time (an earlier version ended with U3 at
d = 2^-8 and MSE 0.95).

Usage, from the repository root::

    python -m benchmarks.gaussian                 # full run (about a minute)
    python -m benchmarks.gaussian --quick         # reduced run (tests)
    python -m benchmarks.gaussian --lr 0.01 --max_bits 8 --out_dir /tmp/g
"""

import json
import os
import time

from absl import app, flags

from benchmarks import common


def define_flags():
    """Define the command-line flags (only when run as a script, so that
    importing this module, e.g. from tests, adds nothing to absl's global
    FLAGS and cannot clash with other scripts' flags such as ``--lr``)."""
    flags.DEFINE_integer("steps", 3000, "SGD steps per parametrization.")
    flags.DEFINE_float("lr", 0.1, "Learning rate, shared by all six parametrizations.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Data seeds (one run per seed).")
    flags.DEFINE_integer("n_samples", 10_000, "Number of N(0, 1) samples.")
    flags.DEFINE_integer("max_bits", 4, "Common bit budget: upper bit bound of every quantizer.")
    flags.DEFINE_float("init_bits", 4.0, "Initial bitwidth (docs/method.md section 4).")
    flags.DEFINE_float(
        "init_scale", 1.0, "Initialize from init_scale * x (1: from the data; < 1: range too small)."
    )
    flags.DEFINE_integer("osc_window", 100, "Oscillation = std of the MSE over this many last steps.")
    flags.DEFINE_list("names", ["U1", "U2", "U3", "P1", "P2", "P3"], "Parametrizations to run.")
    flags.DEFINE_string("out_dir", os.path.join("benchmarks", "results"), "Output folder.")
    flags.DEFINE_bool("quick", False, "Reduced run (QUICK settings) for tests.")
    flags.DEFINE_bool("plot", True, "Write gaussian.png.")


NAMES = ("U1", "U2", "U3", "P1", "P2", "P3")
FAMILIES = {"uniform": ("U1", "U2", "U3"), "pow2": ("P1", "P2", "P3")}
PAPER_CHOICE = {"uniform": "U3", "pow2": "P3"}
LEARNED = {
    "U1": "b, d",
    "U2": "b, q_max",
    "U3": "d, q_max",
    "P1": "b, q_max",
    "P2": "b, q_min",
    "P3": "q_min, q_max",
}
# Reduced run used by --quick and by tests/test_gaussian.py.
QUICK = {"steps": 1000, "seeds": (0,)}


def _family(name):
    return "uniform" if name.startswith("U") else "pow2"


def _round(v, digits=7):
    return float(f"{float(v):.{digits}g}")


def _limit_threads():
    import tensorflow as tf  # noqa: PLC0415

    # Tiny scalar problems: one thread is fastest and leaves the other core free.
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already initialized (e.g. under pytest)
        pass


def gaussian_samples(n, seed):
    import numpy as np  # noqa: PLC0415

    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def train_one(name, x, steps, lr, max_bits=4, init_bits=4.0, init_scale=1.0, round_step=False):
    """Learn one quantizer on samples ``x``; return its curves and final state."""
    import keras  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    from tfdq import quantizers  # noqa: PLC0415

    kwargs = {} if name.startswith("P") else {"round_step": round_step}
    q = quantizers.get(name, signed=True, role="weight", max_bits=max_bits, **kwargs)
    q.initialize_from(init_scale * x, bits=init_bits)
    q.build()
    variables = q.trainable_weights
    opt = keras.optimizers.SGD(learning_rate=lr, momentum=0.0)
    opt.build(variables)
    xt = tf.constant(x)
    small = "d" if _family(name) == "uniform" else "q_min"

    def mse_and_params():
        p = q.forward_params()
        mse = tf.reduce_mean(tf.square(q.quantize_tensor(xt, p) - xt))
        return mse, p

    @tf.function(autograph=False)  # no Python control flow to convert
    def step():
        with tf.GradientTape() as tape:
            mse, p = mse_and_params()
        grads = tape.gradient(mse, variables)
        opt.apply(grads, variables)  # Keras applies the bound projection here
        return mse, p["bits"], p[small], p["q_max"]

    @tf.function(autograph=False)
    def evaluate():
        mse, p = mse_and_params()
        return mse, p["bits"], p[small], p["q_max"]

    init = q.describe()
    out = [step() for _ in range(steps)]
    out.append(evaluate())
    mse, bits, s, q_max = (np.array([float(o[i]) for o in out]) for i in range(4))
    return {
        "init_params": init,
        "final_params": q.describe(),
        "mse": mse,
        "bits": bits,
        small: s,
        "q_max": q_max,
    }


def summarize(curve, osc_window):
    import numpy as np  # noqa: PLC0415

    return {
        "final_mse": float(curve[-1]),
        "min_mse": float(np.min(curve)),
        "last_mean_mse": float(np.mean(curve[-osc_window:])),
        "oscillation": float(np.std(curve[-osc_window:])),
    }


def check_ordering(results, rtol=0.02, osc_atol=1e-6):
    """The paper's claim on ``results`` (name -> summary); returns failures.

    Per family: the paper's parametrization (U3, P3) has a final MSE no worse
    than the best of the other two times ``1 + rtol``, and an oscillation no
    larger than the smallest of the other two plus ``osc_atol``. Families
    with a missing parametrization are skipped. An empty list means the
    claim holds.
    """
    failures = []
    for family, members in FAMILIES.items():
        if not all(m in results for m in members):
            continue
        mine = PAPER_CHOICE[family]
        others = [m for m in members if m != mine]
        best_other = min(others, key=lambda m: results[m]["final_mse"])
        if results[mine]["final_mse"] > results[best_other]["final_mse"] * (1 + rtol):
            failures.append(
                f"{mine} final MSE {results[mine]['final_mse']:.5g} > "
                f"{best_other} {results[best_other]['final_mse']:.5g} (rtol {rtol})"
            )
        calm_other = min(others, key=lambda m: results[m]["oscillation"])
        if results[mine]["oscillation"] > results[calm_other]["oscillation"] + osc_atol:
            failures.append(
                f"{mine} oscillation {results[mine]['oscillation']:.3g} > "
                f"{calm_other} {results[calm_other]['oscillation']:.3g}"
            )
    return failures


def run(
    steps=3000,
    lr=0.1,
    seeds=(0, 1, 2),
    n_samples=10_000,
    max_bits=4,
    init_bits=4.0,
    init_scale=1.0,
    osc_window=100,
    names=NAMES,
    out_dir=os.path.join("benchmarks", "results"),
    plot=True,
    verbose=True,
):
    """Run the experiment, write ``gaussian.json`` (and ``.png``); return the dict."""
    import keras  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    _limit_threads()
    # One tf.function per quantizer is intended; silence the retracing warning.
    tf_logger_level = tf.get_logger().level
    tf.get_logger().setLevel("ERROR")
    seeds = [int(s) for s in seeds]
    names = [n.upper() for n in names]
    start = time.time()
    results, curves = {}, {}
    for name in names:
        per_seed = []
        for i, seed in enumerate(seeds):
            x = gaussian_samples(n_samples, seed)
            t0 = time.time()
            r = train_one(name, x, steps, lr, max_bits, init_bits, init_scale)
            s = summarize(r["mse"], osc_window)
            s.update(
                seed=seed,
                final_bits=r["final_params"]["bits"],
                max_bits_seen=float(np.max(r["bits"])),
                final_params={k: _round(v) for k, v in r["final_params"].items()},
                seconds=round(time.time() - t0, 2),
            )
            per_seed.append(s)
            if i == 0:
                curves[name] = r
        first = per_seed[0]
        results[name] = {
            "family": _family(name),
            "learned": LEARNED[name],
            "final_mse": float(np.median([s["final_mse"] for s in per_seed])),
            "oscillation": float(np.median([s["oscillation"] for s in per_seed])),
            "min_mse": float(np.median([s["min_mse"] for s in per_seed])),
            "last_mean_mse": float(np.median([s["last_mean_mse"] for s in per_seed])),
            "final_bits": first["final_bits"],
            "max_bits_seen": float(max(s["max_bits_seen"] for s in per_seed)),
            "init_params": {k: _round(v) for k, v in curves[name]["init_params"].items()},
            "final_params": first["final_params"],
            "mse": [_round(v) for v in curves[name]["mse"]],
            "per_seed": per_seed,
        }
        if verbose:
            print(
                f"{name}: final MSE {results[name]['final_mse']:.5g}, "
                f"oscillation {results[name]['oscillation']:.3g} "
                f"({sum(s['seconds'] for s in per_seed):.1f} s)",
                flush=True,
            )
    tf.get_logger().setLevel(tf_logger_level)
    failures = check_ordering(results)
    checks = {}
    for family, members in FAMILIES.items():
        present = [m for m in members if m in results]
        if not present:
            continue
        checks[family] = {
            "lowest_final_mse": min(present, key=lambda m: results[m]["final_mse"]),
            "least_oscillation": min(present, key=lambda m: results[m]["oscillation"]),
        }
    checks["paper_ordering_holds"] = not failures
    checks["failures"] = failures
    report = {
        "experiment": "Gaussian data, Uhlich et al. ICLR 2020 Fig. 3",
        "config": {
            "steps": steps,
            "lr": lr,
            "seeds": seeds,
            "n_samples": n_samples,
            "max_bits": max_bits,
            "init_bits": init_bits,
            "init_scale": init_scale,
            "uniform_step": "float (round_step=False); power-of-two levels are exact powers of two",
            "osc_window": osc_window,
            "optimizer": "keras.optimizers.SGD(momentum=0)",
            "objective": "mean((Q(x) - x)^2), full batch",
            "init": "q.initialize_from(init_scale * x, bits=init_bits) (docs/method.md section 4)",
            "bit_budget": "hard bound max_bits for all parametrizations (tfdq projection)",
            "mse_curve": "mse[k] = MSE after k updates, first seed",
            "summary": "final_mse, oscillation, min_mse, last_mean_mse (mean over the "
            "oscillation window): median over seeds; "
            "final_bits, final_params: first seed",
        },
        "results": results,
        "checks": checks,
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        "seconds": round(time.time() - start, 1),
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gaussian.json"), "w") as f:
        json.dump(report, f, indent=1)
    if plot:
        plot_curves(curves, report, os.path.join(out_dir, "gaussian.png"))
    if verbose:
        print_table(report)
    return report


def plot_curves(curves, report, path):
    import numpy as np  # noqa: PLC0415

    plt = common.pyplot()

    cfg = report["config"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), sharex=True)
    titles = {"uniform": "Uniform quantization", "pow2": "Power-of-two quantization"}
    colors = {"1": "tab:blue", "2": "tab:orange", "3": "tab:green"}
    for col, (family, members) in enumerate(FAMILIES.items()):
        ax, ax_r = axes[0, col], axes[1, col]
        small = "d" if family == "uniform" else "q_min"
        for name in members:
            if name not in curves:
                continue
            r, res = curves[name], report["results"][name]
            it = np.arange(len(r["mse"]))
            c = colors[name[1]]
            ax.plot(
                it,
                r["mse"],
                color=c,
                lw=1.2,
                label=f"{name} ({res['learned']}): final {r['mse'][-1]:.4f}, "
                f"{r['final_params']['bits']:.0f} bits",
            )
            ax_r.plot(it, r["q_max"], color=c, lw=1.2, label=f"{name} q_max")
            ax_r.plot(it, r[small], color=c, lw=1.0, ls="--", label=f"{name} {small}")
        ax.set_yscale("log")
        ax.set_title(titles[family])
        ax.set_ylabel("MSE  E[(Q(x) - x)^2]")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        ax_r.set_yscale("log", base=2)
        ax_r.set_ylabel(f"q_max (solid), {small} (dashed)")
        ax_r.set_xlabel("SGD iteration")
        ax_r.grid(True, which="both", alpha=0.3)
        ax_r.legend(fontsize=7, ncol=3, loc="best")
    start = "data" if cfg["init_scale"] == 1 else f"{cfg['init_scale']:g} x data"
    fig.suptitle(
        f"N(0,1), {cfg['n_samples']} samples: SGD lr={cfg['lr']} (shared), "
        f"bits <= {cfg['max_bits']}, init b={cfg['init_bits']:g} from {start}, "
        f"seed {cfg['seeds'][0]}",
        fontsize=11,
    )
    common.save_figure(fig, path, dpi=110)


def print_table(report):
    res = report["results"]
    print()
    print(
        f"{'name':4} {'learned':13} {'final MSE':>10} {'last mean':>10} {'min MSE':>10} "
        f"{'oscill.':>9} {'bits':>4} {'max b':>5}  final parameters"
    )
    for name, r in res.items():
        params = ", ".join(f"{k}={v:.4g}" for k, v in r["final_params"].items() if k != "bits")
        print(
            f"{name:4} {r['learned']:13} {r['final_mse']:10.5f} {r['last_mean_mse']:10.5f} "
            f"{r['min_mse']:10.5f} "
            f"{r['oscillation']:9.2e} {r['final_bits']:4.0f} {r['max_bits_seen']:5.0f}  {params}"
        )
    checks = report["checks"]
    print()
    print(
        "paper ordering (U3, P3 lowest final MSE and least oscillation):",
        "holds" if checks["paper_ordering_holds"] else "DOES NOT HOLD",
    )
    for f in checks["failures"]:
        print("  -", f)
    print(f"({report['seconds']} s)")


RUN_FLAGS = (
    "steps",
    "lr",
    "seeds",
    "n_samples",
    "max_bits",
    "init_bits",
    "init_scale",
    "osc_window",
    "names",
    "out_dir",
    "plot",
)


main = common.script_main(run, RUN_FLAGS, QUICK)


if __name__ == "__main__":
    define_flags()
    app.run(main)
