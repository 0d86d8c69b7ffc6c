"""LiteRT latency and file size of the paper's ResNet-20: float32, tfdq, tfmot.

No CIFAR-10 here: the ResNet-20 (``tfdq.models.resnet20()``, 32x32x3
inputs, 268,346 weights) is random-initialized and briefly trained on
generated inputs (uniform [0, 1) images, random labels): the files are for
timing and size only, and no accuracy below is a CIFAR-10 result. Files:

* ``float32``: the float Keras model through ``tf.lite.TFLiteConverter``.
* ``tfdq_int8``: ``quantize_model`` (U3 weights and activations) +
  ``constrain`` at a 4-bit-average weight budget (131.0 kB), a short
  constrained ``fit`` on generated inputs (so that the learned bitwidths
  differ between layers), ``enforce_budget``, ``freeze_quantizers``;
  exported with ``storage="int8"`` (every kernel int8).
* ``tfdq_mixed``: the same model exported with ``storage="smallest"``: int4
  kernels for the layers at ``b <= 4`` and int8 for the others. ``tfdq_mixed`` vs ``tfdq_int8`` is
  the speed of int4 storage against int8 storage of the same integers.
* ``tfmot_int8``: tfmot's 8-bit QAT of the same architecture and float
  weights in tf_keras (a few QAT steps on generated inputs), converted with
  the default optimizations; built by a subprocess in ``.venv-peers`` (setup
  in ``benchmarks/tfkeras_models.py``).

All files take float32 input and give float32 output (tfdq exported with
``input_type=output_type="float32"``, as tfmot's converter output), so each
integer file has one QUANTIZE and one DEQUANTIZE. Latency: batch 1, one
LiteRT ``Interpreter`` per file and thread count (``num_threads`` 1 and 2,
default op resolver with XNNPACK), warm-up, then rounds in which every
(file, threads) pair runs ``--invokes`` timed invocations after 3 untimed
ones, so machine noise hits all alike; medians over all timed invocations.
Ratios and targets: tfdq int8 / tfmot int8 latency (<= 1.05), float32 /
tfdq latency at 1 thread (>= 3), mixed file / tfmot int8 file (<= 0.6).
Results: ``results/latency.json``, ``results/latency.png``::

    python -m benchmarks.latency                 # 30 rounds x 50 invokes, about 4 minutes on 2 cores
    python -m benchmarks.latency --quick         # smoke run (no tfmot unless --tfmot), under a minute
    python -m benchmarks.latency --replot        # redraw the PNG from the JSON
"""

import os
import tempfile
import time

from absl import app, flags, logging

from benchmarks import common
from benchmarks.peers import PEERS_PYTHON, describe_tflite, peers_env_problem, run_peers_worker

FLAGS = flags.FLAGS
N_WEIGHTS = 268346
FILES = ("float32", "tfdq_int8", "tfdq_mixed", "tfmot_int8")
TARGETS = {
    "tfdq_int8 / tfmot_int8 latency, 1 thread": ("<=", 1.05),
    "tfdq_int8 / tfmot_int8 latency, 2 threads": ("<=", 1.05),
    "float32 / tfdq_int8 latency, 1 thread": (">=", 3.0),
    "float32 / tfdq_mixed latency, 1 thread": (">=", 3.0),
    "tfdq_mixed / tfmot_int8 file size": ("<=", 0.6),
}


def _define_flags():
    flags.DEFINE_integer("rounds", 30, "Rounds; each round times every (file, threads) pair.")
    flags.DEFINE_integer("invokes", 50, "Timed invocations per pair and round.")
    flags.DEFINE_bool("replot", False, "Only redraw the PNG from the JSON in --out_dir.")
    flags.DEFINE_list("threads", ["1", "2"], "LiteRT num_threads values.")
    flags.DEFINE_integer("float_steps", 16, "Float training steps (batch 64) on generated inputs.")
    flags.DEFINE_integer("quant_steps", 32, "Constrained tfdq steps (batch 128) on generated inputs.")
    flags.DEFINE_float("weight_bits", 4.0, "Average weight bits of tfdq's budget.")
    flags.DEFINE_bool(
        "tfmot", True, "Build the tfmot file in .venv-peers (with --quick: only when given explicitly)."
    )
    flags.DEFINE_string("peers_python", PEERS_PYTHON, "Interpreter of the tf_keras/tfmot environment.")
    flags.DEFINE_string("save_files", "", "Folder to keep the .tflite files in (default: not kept).")
    flags.DEFINE_bool(
        "quick", False, "Smoke run: no training (all tfdq layers stay at 4 bits), 2 rounds x 5 invokes."
    )
    flags.DEFINE_string("out_dir", common.RESULTS_DIR, "Output folder.")


def build_files(
    float_steps=16,
    quant_steps=32,
    weight_bits=4.0,
    tfmot=True,
    peers_python=PEERS_PYTHON,
    tfmot_steps=20,
    verbose=0,
):
    """The .tflite files (bytes by name), how they were made, and tfdq's learned bits."""
    import keras  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    import tfdq  # noqa: PLC0415

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(1024, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=1024)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    info = {"data": "generated: uniform [0, 1) 32x32x3 images, random labels (timing and size only)"}
    files = {}
    start = time.time()
    model = tfdq.models.resnet20()
    if float_steps:
        model.compile(keras.optimizers.SGD(0.01, momentum=0.9), loss)
        model.fit(x[: 64 * float_steps], y[: 64 * float_steps], batch_size=64, epochs=1, verbose=verbose)
    files["float32"] = tf.lite.TFLiteConverter.from_keras_model(model).convert()

    q = tfdq.quantize_model(model, calibration_data=x[:256], init_bits=4)
    n_weights = sum(e.count for e in tfdq.memory.size_entries(q) if e.kind == "weight")
    target = weight_bits * n_weights / 8192
    q = tfdq.constrain(q, weight_kb=target)
    q.compile(keras.optimizers.Adam(1e-3), loss)
    if quant_steps:
        n = min(len(x), 128 * quant_steps)
        epochs = max(1, (128 * quant_steps) // n)
        q.fit(x[:n], y[:n], batch_size=128, epochs=epochs, verbose=verbose)
    enforce_steps = tfdq.constraints.enforce_budget(q)
    tfdq.constraints.freeze_quantizers(q)
    rows = tfdq.summary(q, print_fn=None)
    bits = {r["name"]: r["bits"] for r in rows if r["kind"] == "weight"}
    counts = {r["name"]: r["count"] for r in rows if r["kind"] == "weight"}
    exports = {}
    for name, storage in (("tfdq_int8", "int8"), ("tfdq_mixed", "smallest")):
        tflite, report = tfdq.export.to_tflite(
            q, x[:256], input_type="float32", output_type="float32", storage=storage, return_report=True
        )
        check = tfdq.export.verify(q, tflite, x[:200], export_report=report)
        files[name] = tflite
        exports[name] = {
            "storage_policy": storage,
            "top1_agreement_with_keras_on_generated_inputs": check["top1_agreement"],
            "all_kernels_exact": check["all_kernels_exact"],
            "kernel_bytes_in_file": check["sizes"]["kernel_bytes_in_file"],
            "kernel_bytes_by_storage": check["sizes"]["kernel_bytes_by_storage"],
            "storage": {entry["layer"]: entry.get("storage") for entry in check["layers"]},
            "file_range": {entry["layer"]: entry.get("file_range") for entry in check["layers"]},
        }
    info["tfdq"] = {
        "weight_target_kb": target,
        "weight_kb": rows[-1]["weight_kb"],
        "mean_weight_bits": rows[-1]["mean_weight_bits"],
        "budget_met": bool(all(q.memory_budget.satisfied(q).values())),
        "float_steps": float_steps,
        "quant_steps": quant_steps,
        "enforce_steps": enforce_steps,
        "weight_bits": bits,
        "weights_at_bits": {
            str(b): int(sum(c for n, c in counts.items() if bits[n] == b)) for b in sorted(set(bits.values()))
        },
        "activation_bits": {r["name"]: r["bits"] for r in rows if r["kind"] == "activation"},
        "exports": exports,
    }
    info["build_seconds"] = time.time() - start
    if tfmot:
        problem = peers_env_problem(peers_python)
        if problem:
            info["tfmot_error"] = problem
        else:
            from benchmarks.tfkeras_models import save_weights  # noqa: PLC0415

            with tempfile.TemporaryDirectory() as tmp:
                weights = save_weights(model, os.path.join(tmp, "float.npz"))
                result, error = run_peers_worker(
                    [
                        "--task",
                        "resnet20_qat",
                        "--weights",
                        weights,
                        "--out_dir",
                        tmp,
                        "--steps",
                        str(tfmot_steps),
                        "--batch_size",
                        "32",
                    ],
                    peers_python,
                )
                if error:
                    info["tfmot_error"] = error
                else:
                    with open(result.pop("tflite_path"), "rb") as f:
                        files["tfmot_int8"] = f.read()
                    info["tfmot"] = result
    else:
        info["tfmot_error"] = "not requested (--notfmot)"
    return files, info


def time_files(files, threads=(1, 2), rounds=15, invokes=40, warmup=20):
    """Per (file, threads): median ms per batch-1 invocation over interleaved rounds."""
    import numpy as np  # noqa: PLC0415

    from tfdq.export.runtime import LiteRTRunner  # noqa: PLC0415

    rng = np.random.default_rng(1)
    runners = {}
    for name, tflite in files.items():
        for t in threads:
            runner = LiteRTRunner(tflite, int(t))
            shape = runner.interpreter.get_input_details()[0]["shape"]
            runner(
                rng.uniform(size=[1, *shape[1:]]).astype("float32")
            )  # sets the input (quantized as verify does)
            interp = runner.interpreter
            for _ in range(warmup):
                interp.invoke()
            runners[(name, int(t))] = interp
    samples = {key: [] for key in runners}
    round_medians = {key: [] for key in runners}
    for r in range(rounds):
        keys = list(runners)
        if r % 2:  # alternate the order too
            keys.reverse()
        for key in keys:
            interp = runners[key]
            for _ in range(3):
                interp.invoke()
            times = []
            for _ in range(invokes):
                t0 = time.perf_counter()
                interp.invoke()
                times.append(time.perf_counter() - t0)
            samples[key].extend(times)
            round_medians[key].append(float(np.median(times)))
    out = {}
    for (name, t), values in samples.items():
        out.setdefault(name, {})[_key(t)] = {
            "median_ms": 1000 * float(np.median(values)),
            "p10_ms": 1000 * float(np.percentile(values, 10)),
            "p90_ms": 1000 * float(np.percentile(values, 90)),
            "round_median_range_ms": [
                1000 * min(round_medians[(name, t)]),
                1000 * max(round_medians[(name, t)]),
            ],
            "round_medians_ms": [1000 * v for v in round_medians[(name, t)]],
            "samples": len(values),
        }
    return out


def _key(t):
    return f"{t}_thread{'s' if t > 1 else ''}"


def ratios(latency, sizes, threads):
    def lat(name, t):
        return latency.get(name, {}).get(_key(t), {}).get("median_ms")

    out = {}
    for t in threads:
        words = f"{t} thread{'s' if t > 1 else ''}"
        pairs = {
            f"tfdq_int8 / tfmot_int8 latency, {words}": ("tfdq_int8", "tfmot_int8"),
            f"tfdq_mixed / tfmot_int8 latency, {words}": ("tfdq_mixed", "tfmot_int8"),
            f"float32 / tfdq_int8 latency, {words}": ("float32", "tfdq_int8"),
            f"float32 / tfdq_mixed latency, {words}": ("float32", "tfdq_mixed"),
            f"float32 / tfmot_int8 latency, {words}": ("float32", "tfmot_int8"),
            f"tfdq_mixed / tfdq_int8 latency (int4 vs int8 storage), {words}": ("tfdq_mixed", "tfdq_int8"),
        }
        for label, (a, b) in pairs.items():
            la, lb = lat(a, t), lat(b, t)
            out[label] = None if la is None or lb is None else la / lb
    for a, b in (
        ("tfdq_mixed", "tfmot_int8"),
        ("tfdq_int8", "tfmot_int8"),
        ("tfdq_mixed", "float32"),
        ("tfmot_int8", "float32"),
    ):
        out[f"{a} / {b} file size"] = sizes[a] / sizes[b] if a in sizes and b in sizes else None
    return out


def judge(ratio_values, targets=None):
    """Each target (default: this benchmark's ``TARGETS``) against its measured ratio."""
    out = {}
    for label, (op, bound) in (TARGETS if targets is None else targets).items():
        v = ratio_values.get(label)
        if v is None:
            out[label] = {"target": f"{op} {bound}", "measured": None, "status": "not measured"}
            continue
        hit = v <= bound if op == "<=" else v >= bound
        if hit:
            status = "hit"
        else:
            miss = (v / bound - 1) if op == "<=" else (1 - v / bound)
            status = f"missed by {100 * miss:.1f}%"
        out[label] = {"target": f"{op} {bound}", "measured": v, "status": status}
    return out


def plot(latency, sizes, threads, path):
    import numpy as np  # noqa: PLC0415

    plt = common.pyplot()

    names = [n for n in FILES if n in latency]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / len(threads)
    top = 2.5 * max(latency[n][_key(t)]["median_ms"] for n in names for t in threads)
    for j, t in enumerate(threads):
        vals = [latency[n][_key(t)]["median_ms"] for n in names]
        p10 = [latency[n][_key(t)]["p10_ms"] for n in names]
        p90 = [latency[n][_key(t)]["p90_ms"] for n in names]
        xs = np.arange(len(names)) + (j - (len(threads) - 1) / 2) * width
        ax1.bar(
            xs,
            vals,
            width,
            yerr=[[v - lo for v, lo in zip(vals, p10)], [min(hi, top) - v for v, hi in zip(vals, p90)]],
            capsize=3,
            label=f"num_threads={t}",
        )
        for x_, v, hi in zip(xs, vals, p90):
            ax1.text(x_, v / 2, f"{v:.2f}", ha="center", va="center", fontsize=7, rotation=90, color="white")
            if hi > top:
                ax1.text(
                    x_,
                    top * 0.97,
                    f"p90 {hi:.0f} ms",
                    ha="center",
                    va="top",
                    fontsize=7,
                    rotation=90,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 1},
                )
    ax1.set_ylim(0, top)
    ax1.set_xticks(np.arange(len(names)), names)
    ax1.set_ylabel("ms per image (batch 1): median, p10-p90")
    ax1.legend(loc="upper left", fontsize=8)
    ax1.set_title("LiteRT latency")
    ax2.bar(names, [sizes[n] / 1024 for n in names], color="tab:gray")
    for i, n in enumerate(names):
        ax2.text(i, sizes[n] / 1024, f"{sizes[n] / 1024:.0f}", ha="center", va="bottom")
    ax2.set_ylabel("kB")
    ax2.set_title(".tflite file size")
    fig.suptitle("ResNet-20 (268,346 weights), CIFAR shapes, generated inputs: timing and size only")
    return common.save_figure(fig, path, dpi=110)


def run(
    quick=False,
    rounds=30,
    invokes=50,
    threads=(1, 2),
    float_steps=16,
    quant_steps=32,
    weight_bits=4.0,
    tfmot=True,
    peers_python=PEERS_PYTHON,
    save_files="",
):
    """Build the files, time them; returns the result dict (JSON-ready)."""
    start = time.time()
    warmup = 20
    if quick:
        rounds, invokes, float_steps, quant_steps, warmup = 2, 5, 0, 0, 3
    files, info = build_files(
        float_steps, quant_steps, weight_bits, tfmot, peers_python, tfmot_steps=2 if quick else 20
    )
    if save_files:
        os.makedirs(save_files, exist_ok=True)
        for name, b in files.items():
            with open(os.path.join(save_files, f"resnet20_{name}.tflite"), "wb") as f:
                f.write(b)
    sizes = {name: len(b) for name, b in files.items()}
    contents = {}
    for name, b in files.items():
        d = describe_tflite(b)
        contents[name] = {
            k: d[k]
            for k in (
                "integer",
                "float_ops",
                "ops",
                "constant_bytes",
                "constant_bytes_by_type",
                "weight_bytes",
                "weight_bytes_by_type",
                "input_type",
                "output_type",
            )
        }
    t_start = time.time()
    load_before = os.getloadavg()
    latency = time_files(files, threads, rounds, invokes, warmup)
    load_after = os.getloadavg()
    r = ratios(latency, sizes, threads)
    return {
        "config": {
            "quick": quick,
            "rounds": rounds,
            "invokes": invokes,
            "warmup": warmup,
            "threads": list(threads),
            "batch": 1,
            "n_weights": N_WEIGHTS,
            "float_steps": float_steps,
            "quant_steps": quant_steps,
            "weight_bits": weight_bits,
        },
        "file_bytes": sizes,
        "contents": contents,
        "latency": latency,
        "ratios": r,
        "targets": judge(r),
        "build": info,
        "timing_seconds": time.time() - t_start,
        "load_average_1_5_15min": {
            "before_timing": list(load_before),
            "after_timing": list(load_after),
            "cpus": os.cpu_count(),
        },
        "seconds": time.time() - start,
    }


def format_table(result):
    threads = result["config"]["threads"]
    lines = [f"{'file':12s} {'kB':>8s} " + " ".join(f"{'ms @' + str(t) + 't':>9s}" for t in threads)]
    for name in FILES:
        if name not in result["latency"]:
            continue
        lat = result["latency"][name]
        lines.append(
            f"{name:12s} {result['file_bytes'][name] / 1024:8.1f} "
            + " ".join(f"{lat[_key(t)]['median_ms']:9.3f}" for t in threads)
        )
    if "tfmot_error" in result["build"]:
        lines.append(f"tfmot_int8: not built: {result['build']['tfmot_error'][:300]}")
    lines.append("")
    for label, v in result["ratios"].items():
        lines.append(f"{label:60s} {'-' if v is None else f'{v:.3f}'}")
    lines.append("")
    for label, t in result["targets"].items():
        m = t["measured"]
        lines.append(
            f"target {label:50s} {t['target']:>7s}  measured {'-' if m is None else f'{m:.3f}'}  {t['status']}"
        )
    b = result["build"]["tfdq"]
    lines.append(
        f"tfdq bits: {b['weight_bits']} ({b['weight_kb']:.2f} / {b['weight_target_kb']:.2f} kB, "
        f"mean {b['mean_weight_bits']:.2f}); weights at each bitwidth {b['weights_at_bits']}"
    )
    return "\n".join(lines)


def write(out_dir, result):
    """``latency[_quick].json`` and ``.png`` in ``out_dir``; returns both paths."""
    json_path = common.write_run(
        out_dir,
        "latency",
        "LiteRT batch-1 latency and file size of ResNet-20: float32, tfdq int8 and mixed int4/int8, "
        "tfmot int8 QAT (generated inputs: timing and size only)",
        result,
        result["config"]["quick"],
    )
    png_path = replot(result, out_dir)
    print(f"wrote {png_path}")
    return json_path, png_path


def replot(result, out_dir):
    """``latency[_quick].png`` of a result (as :func:`run` returns it or its JSON holds it)."""
    name = common.result_name("latency", result["config"]["quick"])
    return plot(
        result["latency"],
        result["file_bytes"],
        result["config"]["threads"],
        os.path.join(out_dir, f"{name}.png"),
    )


def main(argv):
    del argv
    if FLAGS.replot:
        saved = common.load_result(FLAGS.out_dir, common.result_name("latency", FLAGS.quick))
        print(f"wrote {replot(saved, FLAGS.out_dir)}")
        return
    logging.set_verbosity(logging.WARNING)
    threads = tuple(int(t) for t in FLAGS.threads)
    tfmot = common.given_or_not_quick("tfmot")
    result = run(
        FLAGS.quick,
        FLAGS.rounds,
        FLAGS.invokes,
        threads,
        FLAGS.float_steps,
        FLAGS.quant_steps,
        FLAGS.weight_bits,
        tfmot,
        FLAGS.peers_python,
        FLAGS.save_files,
    )
    print(format_table(result))
    write(FLAGS.out_dir, result)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
