"""tfdq next to HGQ2 and QKeras at the same weight memory (MNIST subset, small CNN).

The same data (``tfdq.data.mnist_subset()``: 4,000 train / 1,000 held out),
the same architecture (``tfdq.models.small_cnn()``, 29,658 counted weights)
and, per seed, the same float weights: one float model is trained here
(Adam 1e-3, batch 64) and saved to ``.npz``; every method starts from it.

* ``hgq2_*``: HGQ2 (per-weight learned bitwidths and learned input
  quantizers, its EBOPs cost times beta), with HGQ2's PID controller steering
  beta so that the weight memory lands at the budget (details in
  ``benchmarks/hgq_worker.py``). Weight bytes: the sum over weights of the
  stored bits (HGQ2's ``b`` plus the sign bit, 0 for a pruned weight) / 8.
* ``qkeras_2bit`` / ``qkeras_4bit``: QKeras (qkeras-v3, Keras 3) at fixed 2
  and 4 bits, ``quantized_bits(b, 0, alpha="auto_po2")`` on kernels and
  bias, float activations. Weight bytes: bits x 29,658 / 8.
* ``tfdq_*``: ``quantize_model`` (U3 weights, float activations) and
  ``constrain(weight_kb=budget)`` with automatic multipliers; one ``fit``
  whose final phase fixes the allocation inside the budget (the recipe of
  ``benchmarks/budget_mnist.py``). Weight bytes as ``tfdq.memory`` counts them.

Budgets: the paper's (8a) 2-bit size + 7% (7.75 kB) and the 4-bit size
(14.48 kB), as in BENCHMARKS.md sections 2 and 3. All methods train the
same epochs (Adam 1e-3, then the last ``--finish_epochs`` at 5e-4).

For each method: held-out accuracy in Keras, weight bytes, and what the
TFLite converter makes of the trained model (plain and with
``Optimize.DEFAULT``): integer operators or a float graph, the file's
accuracy in LiteRT. HGQ2 and QKeras run in their own environment as a
subprocess (``benchmarks/hgq_worker.py`` has the setup commands); without it
the reason is recorded::

    python -m benchmarks.peers_hgq                         # 2 seeds
    python -m benchmarks.peers_hgq --seeds=0 --name=peers_hgq_s0   # one seed per process, then:
    python -m benchmarks.peers_hgq --merge=results/peers_hgq_s0.json,results/peers_hgq_s1.json
    python -m benchmarks.peers_hgq --quick                 # smoke run (500 images, 1 epoch)
"""

import json
import os
import subprocess
import tempfile
import time

from absl import app, flags

from benchmarks import common
from benchmarks.peers import _pct, file_kb, integer_cell, method_runs, not_run

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HGQ_PYTHON = os.path.join(ROOT, ".venv-hgq", "bin", "python")
QKERAS_PATH = os.path.join(ROOT, ".venv-hgq", "qkeras-v3")
N_WEIGHTS = 29658

BUDGETS = {"2bit+7%": (2, 1.07), "4bit": (4, 1.0)}  # name: (average bits, margin)
QKERAS_BITS = (2, 4)
METHODS = [
    "float",
    *(f"{m}_{b}" for b in BUDGETS for m in ("hgq2", "tfdq")),
    *(f"qkeras_{b}bit" for b in QKERAS_BITS),
]
MCT_NOTE = (
    "Sony's Model Compression Toolkit (MCT) supports TensorFlow only up to 2.15 (Keras 2), "
    "so it cannot run next to TensorFlow 2.21 / Keras 3 and is not measured."
)


def _define_flags():
    flags.DEFINE_list("seeds", ["0", "1"], "Random seeds (training; the data split is always seed 0).")
    flags.DEFINE_integer("float_epochs", 3, "Float training epochs.")
    flags.DEFINE_integer("quant_epochs", 2, "Quantized training epochs at Adam 1e-3 (every method).")
    flags.DEFINE_integer("finish_epochs", 1, "Last epochs at Adam 5e-4 (tfdq: its final phase).")
    flags.DEFINE_string("hgq_python", HGQ_PYTHON, "Interpreter of the HGQ2 / QKeras environment.")
    flags.DEFINE_string("qkeras_path", QKERAS_PATH, "Folder holding qkeras-v3 (pip install --target).")
    flags.DEFINE_bool(
        "quick", False, "Smoke run: 1 seed, 500 training images, 1 epoch, the 2-bit budget only."
    )
    flags.DEFINE_string("name", "", "Result name (default peers_hgq, or peers_hgq_quick).")
    flags.DEFINE_string(
        "float_weights",
        "",
        "Load each seed's float weights from this npz path ({seed} in it) instead of training.",
    )
    flags.DEFINE_list("merge", [], "Only merge these result JSONs (per_seed) into --name.")
    flags.DEFINE_string("out_dir", common.RESULTS_DIR, "Output folder.")


def budget_kb(name):
    bits, margin = BUDGETS[name]
    return margin * bits * N_WEIGHTS / 8192.0


# ---------------------------------------------------------------------------
# The HGQ2 / QKeras worker
# ---------------------------------------------------------------------------


def env_problem(python=HGQ_PYTHON, qkeras_path=QKERAS_PATH):
    """Why the HGQ2 / QKeras side cannot run (None when it can)."""
    if not os.path.exists(python):
        return (
            f"{python} not found; create it with: python3 -m venv .venv-hgq && .venv-hgq/bin/pip install "
            "'tensorflow==2.21.*' keras==3.15.1 hgq2==0.2.0 qkeras-v3==1.2.1 && .venv-hgq/bin/pip install "
            "--no-deps --target .venv-hgq/qkeras-v3 qkeras-v3==1.2.1"
        )
    proc = subprocess.run(
        [python, "-c", f"import sys; import hgq; sys.path.insert(0, {qkeras_path!r}); import qkeras"],
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES=""),
        cwd=ROOT,
    )
    if proc.returncode:
        lines = proc.stderr.strip().splitlines()
        return lines[-1] if lines else f"exit {proc.returncode}"
    return None


def start_worker(args, python=HGQ_PYTHON):
    """Start ``benchmarks.hgq_worker`` in the HGQ2 environment; returns the process (see finish_worker)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_USE_LEGACY_KERAS", None)
    proc = subprocess.Popen(
        [python, "-m", "benchmarks.hgq_worker", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    proc.worker_args = args
    return proc


def finish_worker(proc, timeout=3600):
    """Wait for a started worker; returns (json dict, None) or (None, error text)."""
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
    args = proc.worker_args
    out_dir = args[args.index("--out_dir") + 1]
    task = args[args.index("--task") + 1]
    path = os.path.join(out_dir, f"{task}.json")
    if proc.returncode or not os.path.exists(path):
        tail = "\n".join(stderr.strip().splitlines()[-25:])
        return None, f"exit {proc.returncode}: {tail}"
    with open(path) as f:
        return json.load(f), None


def run_worker(args, python=HGQ_PYTHON, timeout=3600):
    """``benchmarks.hgq_worker`` in the HGQ2 environment; returns (json dict, None) or (None, error)."""
    return finish_worker(start_worker(args, python), timeout)


def tflite_verdict(attempts, x, y):
    """Describe each converted file (operators, integer or not, LiteRT accuracy); pick the verdict."""
    from benchmarks.peers import describe_tflite, litert_accuracy  # noqa: PLC0415

    out = {}
    for name, entry in attempts.items():
        if "path" not in entry:
            out[name] = {"converted": False, "error": entry.get("error", "")}
            continue
        with open(entry["path"], "rb") as f:
            tflite = f.read()
        desc = describe_tflite(tflite)
        desc["converted"] = True
        try:
            desc["litert_accuracy"] = litert_accuracy(tflite, x, y)
        except Exception as err:  # noqa: BLE001 (LiteRT raises several kinds)
            desc["litert_error"] = f"{type(err).__name__}: {err}"[:500]
        out[name] = desc
    ok = [a for a in out.values() if a.get("converted")]
    verdict = {"tflite": out, "real_integer_tflite": any(a["integer"] for a in ok)}
    if ok:
        best = next((a for a in ok if a["integer"]), ok[0])
        verdict.update(
            file_bytes=best["file_bytes"],
            tflite_accuracy=best.get("litert_accuracy"),
            tflite_ops=best["ops"],
            tflite_float_ops=best["float_ops"],
        )
    return verdict


def worker_args(task, weights, data_npz, seed, epochs, tmp, qkeras_path, **extra):
    out_dir = os.path.join(tmp, f"{task}_{extra.get('bits', extra.get('target_kb', ''))}_{seed}")
    args = ["--task", task, "--weights", weights, "--data", data_npz, "--out_dir", out_dir]
    args += ["--seed", str(seed), "--epochs", ",".join(str(e) for e in epochs), "--lrs", "1e-3,5e-4"]
    args += ["--qkeras_path", qkeras_path]
    for k, v in extra.items():
        args += [f"--{k}", str(v)]
    return args


def worker_result(result, error, x, y):
    if error:
        return {"error": error}
    result.update(tflite_verdict(result.pop("tflite"), x, y))
    return result


def worker_run(task, weights, data_npz, seed, epochs, tmp, python, qkeras_path, x, y, **extra):
    """Run one worker task to the end; its figures with the TFLite verdict, or ``{"error": ...}``."""
    args = worker_args(task, weights, data_npz, seed, epochs, tmp, qkeras_path, **extra)
    return worker_result(*run_worker(args, python), x, y)


# ---------------------------------------------------------------------------
# tfdq
# ---------------------------------------------------------------------------


def tfdq_run(float_model, data, seed, budget, quant_epochs, finish_epochs, counts):
    """tfdq's budget recipe (benchmarks.mnist_runs.quantized_run), exported and described."""
    import tfdq  # noqa: PLC0415
    from benchmarks import mnist_runs  # noqa: PLC0415

    bits, margin = BUDGETS[budget]
    config = {
        "name": f"tfdq {budget}",
        "weight": "U3",
        "weight_budget_bits": bits,
        "weight_budget_margin": margin,
    }
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
        return {"error": r["failed"]}
    model = r.pop("model")
    (xt, _), (xv, yv) = data
    tflite, report = tfdq.export.to_tflite(model, xt[:1000], return_report=True)
    check = tfdq.export.verify(model, tflite, (xv, yv), export_report=report)
    from benchmarks.peers import describe_tflite  # noqa: PLC0415

    desc = describe_tflite(tflite)
    return {
        "target_kb": r["targets"]["weight_kb"] if isinstance(r.get("targets"), dict) else budget_kb(budget),
        "keras_accuracy": 1.0 - r["error"],
        "weight_bytes": r["weight_kb"] * 1024,
        "weight_kb": r["weight_kb"],
        "mean_weight_bits": r["mean_weight_bits"],
        "weight_bits": r["weight_bits"],
        "constraints_met": r.get("constraints_met"),
        "tflite_accuracy": check["tflite_accuracy"],
        "top1_agreement": check["top1_agreement"],
        "all_kernels_exact": check["all_kernels_exact"],
        "file_bytes": len(tflite),
        "real_integer_tflite": desc["integer"],
        "tflite_ops": desc["ops"],
        "tflite_float_ops": desc["float_ops"],
        "weight_bytes_by_type": desc["weight_bytes_by_type"],
        "seconds": r["seconds"],
    }


# ---------------------------------------------------------------------------
# One seed
# ---------------------------------------------------------------------------


def run_seed(
    seed,
    float_epochs,
    quant_epochs,
    finish_epochs,
    python=HGQ_PYTHON,
    qkeras_path=QKERAS_PATH,
    budgets=tuple(BUDGETS),
    qkeras_bits=QKERAS_BITS,
    train_limit=None,
    float_weights="",
):
    """Float model, then every method from its weights; returns {method: figures}.

    The HGQ2 / QKeras workers run as subprocesses started together, while
    tfdq trains in this process. ``float_weights`` (a path with ``{seed}``):
    load the float model's weights instead of training it.
    """
    import numpy as np  # noqa: PLC0415

    import tfdq  # noqa: PLC0415
    from benchmarks import mnist_runs  # noqa: PLC0415
    from benchmarks.tfkeras_models import load_weights, save_weights  # noqa: PLC0415

    data = mnist_runs.load_data(n_train=train_limit)
    (xt, yt), (xv, yv) = data
    counts = mnist_runs.feature_counts()
    if float_weights:
        model = load_weights(tfdq.models.small_cnn(), float_weights.format(seed=seed))
        ferr, secs = mnist_runs.error(model, (xv, yv)), 0.0
    else:
        model, ferr, secs = mnist_runs.train_float(seed, data, float_epochs)
    results = {"float": {"keras_accuracy": 1.0 - ferr, "weight_bytes": 4.0 * N_WEIGHTS, "seconds": secs}}
    if float_weights:
        results["float"]["weights_from"] = float_weights.format(seed=seed)
    _log(seed, "float", results["float"])
    problem = env_problem(python, qkeras_path)
    epochs = (quant_epochs, finish_epochs)
    with tempfile.TemporaryDirectory() as tmp:
        weights = save_weights(model, os.path.join(tmp, "float.npz"))
        data_npz = os.path.join(tmp, "data.npz")
        np.savez(data_npz, xt=xt, yt=yt, xv=xv, yv=yv)
        common = dict(
            weights=weights, data_npz=data_npz, seed=seed, epochs=epochs, tmp=tmp, qkeras_path=qkeras_path
        )
        tasks = {f"hgq2_{b}": ("hgq", {"target_kb": budget_kb(b)}) for b in budgets}
        tasks.update({f"qkeras_{bits}bit": ("qkeras", {"bits": bits}) for bits in qkeras_bits})
        started = {}
        for name, (task, extra) in tasks.items():
            if problem:
                results[name] = {"error": problem}
            else:
                started[name] = start_worker(worker_args(task, **common, **extra), python)
        for budget in budgets:
            name = f"tfdq_{budget}"
            results[name] = tfdq_run(model, data, seed, budget, quant_epochs, finish_epochs, counts)
            _log(seed, name, results[name])
        for name, proc in started.items():
            results[name] = worker_result(*finish_worker(proc), xv, yv)
            _log(seed, name, results[name])
    return {m: results[m] for m in METHODS if m in results}


def _log(seed, name, r):
    if "error" in r:
        print(f"seed {seed} {name}: FAILED: {r['error'][:400]}", flush=True)
        return
    print(
        f"seed {seed} {name:14s} keras {_pct(r.get('keras_accuracy'))} tflite {_pct(r.get('tflite_accuracy'))} "
        f"weights {r['weight_bytes'] / 1024:6.2f} kB  integer tflite {r.get('real_integer_tflite')}  "
        f"({r.get('seconds', 0):.0f} s)",
        flush=True,
    )


# ---------------------------------------------------------------------------
# Summary and table
# ---------------------------------------------------------------------------


def summarize(per_seed):
    """Mean, std, min and max over seeds of accuracy and weight bytes; the integer verdict."""
    import numpy as np  # noqa: PLC0415

    out = {}
    for method, runs, entry in method_runs(per_seed, METHODS, failed=lambda r: "error" in r):
        ok = [r for r in runs if "error" not in r]
        for key in ("keras_accuracy", "tflite_accuracy", "weight_bytes", "file_bytes", "mean_weight_bits"):
            vals = [r[key] for r in ok if r.get(key) is not None]
            if vals:
                entry[key] = float(np.mean(vals))
                entry[f"{key}_std"] = float(np.std(vals))
                entry[f"{key}_range"] = [float(min(vals)), float(max(vals))]
                entry[f"{key}_per_seed"] = [float(v) for v in vals]
        if ok and method != "float":
            entry["real_integer_tflite"] = bool(all(r.get("real_integer_tflite") for r in ok))
        out[method] = entry
    return out


def format_table(summary):
    columns = [
        ("method", 14),
        ("accuracy % (mean +- std)", 26),
        ("weight kB", 10),
        ("bits/w", 6),
        ("TFLite acc", 10),
        ("file kB", 8),
        ("integer", 7),
    ]
    rows = [
        not_run(method, s, 14)
        or [
            method,
            f"{100 * s['keras_accuracy']:.2f} +- {100 * s['keras_accuracy_std']:.2f}",
            f"{s['weight_bytes'] / 1024:.2f}",
            f"{8 * s['weight_bytes'] / N_WEIGHTS:.2f}",
            _pct(s.get("tflite_accuracy")),
            file_kb(s),
            integer_cell(s),
        ]
        for method, s in summary.items()
    ]
    return common.format_table(columns, rows)


QUICK = dict(
    float_epochs=1, quant_epochs=1, finish_epochs=0, budgets=("2bit+7%",), qkeras_bits=(2,), train_limit=500
)


def write(out_dir, name, per_seed, config, command, seconds):
    summary = summarize(per_seed)
    print(format_table(summary))
    payload = {
        "config": config,
        "budgets_kb": {b: budget_kb(b) for b in BUDGETS},
        "note": MCT_NOTE,
        "summary": summary,
        "per_seed": per_seed,
        "seconds": seconds,
    }
    payload["json_path"] = common.write_result(
        out_dir, name, "tfdq vs HGQ2 (learned bits) and QKeras (fixed 2/4 bits) at the same weight memory", command,
        payload,
    )  # fmt: skip
    return payload


def run(
    out_dir,
    seeds=(0, 1),
    quick=False,
    python=HGQ_PYTHON,
    qkeras_path=QKERAS_PATH,
    float_epochs=3,
    quant_epochs=2,
    finish_epochs=1,
    name="",
    float_weights="",
):
    """Every method for every seed; writes ``<name>.json`` after each seed; returns the payload."""
    start = time.time()
    if quick:
        seeds, kw = [0], dict(QUICK)
    else:
        kw = dict(float_epochs=float_epochs, quant_epochs=quant_epochs, finish_epochs=finish_epochs)
    name = name or common.result_name("peers_hgq", quick)
    config = {
        "seeds": [int(s) for s in seeds],
        "n_weights": N_WEIGHTS,
        "batch_size": 64,
        "optimizers": "Adam 1e-3 (float and quant_epochs), 5e-4 (finish_epochs)",
        "float_weights": float_weights,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()},
    }
    command = "python -m benchmarks.peers_hgq" + (
        " --quick" if quick else f" --seeds={','.join(map(str, seeds))}"
    )
    per_seed = []
    payload = None
    for seed in seeds:
        per_seed.append(
            run_seed(int(seed), python=python, qkeras_path=qkeras_path, float_weights=float_weights, **kw)
        )
        payload = write(out_dir, name, per_seed, config, command, time.time() - start)
    return payload


def merge(paths, out_dir, name):
    """Combine the per-seed records of several result files (seeds run in separate processes)."""
    per_seed, configs, commands, seconds = [], [], [], 0.0
    for path in paths:
        with open(path) as f:
            saved = json.load(f)
        per_seed += saved["per_seed"]
        configs.append(saved["config"])
        commands.append(saved["command"])
        seconds = max(seconds, saved["seconds"])
    config = dict(configs[0], seeds=[s for c in configs for s in c["seeds"]])
    command = "; ".join(commands) + f"; then --merge of {len(paths)} files"
    return write(out_dir, name or "peers_hgq", per_seed, config, command, seconds)


def main(argv):
    del argv
    if FLAGS.merge:
        merge(FLAGS.merge, FLAGS.out_dir, FLAGS.name)
        return
    run(
        FLAGS.out_dir,
        FLAGS.seeds,
        FLAGS.quick,
        FLAGS.hgq_python,
        FLAGS.qkeras_path,
        FLAGS.float_epochs,
        FLAGS.quant_epochs,
        FLAGS.finish_epochs,
        FLAGS.name,
        FLAGS.float_weights,
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
