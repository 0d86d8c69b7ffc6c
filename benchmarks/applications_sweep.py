"""Every ``keras.applications`` family through tfdq: quantize, run, export, run in LiteRT.

For each of the 26 models below (``weights=None``, 10 classes, logits out,
the smallest input the family allows: 32x32 where it may, 71 for Xception,
75 for InceptionV3 / InceptionResNetV2), on sklearn's 8x8 digits upscaled to
that size and replicated to RGB (pixel values 0-255, as the models' own
preprocessing expects):

1. the BatchNorm moving statistics are set from 64 images
   (``tfdq.recalibrate_batchnorm``: a random network otherwise shrinks or
   blows up its feature maps layer after layer);
2. ``tfdq.quantize_model(model, calibration_data=..., target="tflite")``:
   the export problems found before training are recorded;
3. ``tfdq.export.align_biases`` (as a user does before export) and one
   forward pass of the quantized model;
4. ``tfdq.export.to_tflite`` (int8 input and output), and the file run in
   LiteRT on a few held-out images: all ops integer, top-1 agreement with
   the Keras quantized model, largest output difference in output steps.

``--latency`` also writes the float32 ``.tflite`` of the same (float) model
and the int8-storage tfdq file (``storage="int8"``) and times them with the
default-storage file (``"fast"``) at batch 1 in LiteRT, one thread,
interleaved (rounds, medians) in one process.

Each model runs in its own subprocess (``--one NAME`` runs a single model
and prints its JSON line), so one crash or memory blow-up costs one row::

    python -m benchmarks.applications_sweep                 # all 26, results/applications_sweep.json
    python -m benchmarks.applications_sweep --quick         # MobileNet and ResNet50 only
    python -m benchmarks.applications_sweep --models DenseNet121,Xception
    python -m benchmarks.applications_sweep --latency       # + file sizes and LiteRT latency
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

import numpy as np

# name -> (keras.applications constructor, input side, extra keyword arguments)
MODELS = {
    "ConvNeXtTiny": ("ConvNeXtTiny", 32, {}),
    "ConvNeXtSmall": ("ConvNeXtSmall", 32, {}),
    "DenseNet121": ("DenseNet121", 32, {}),
    "EfficientNetB0": ("EfficientNetB0", 32, {}),
    "EfficientNetB1": ("EfficientNetB1", 32, {}),
    "EfficientNetB2": ("EfficientNetB2", 32, {}),
    "EfficientNetB3": ("EfficientNetB3", 32, {}),
    "EfficientNetB4": ("EfficientNetB4", 32, {}),
    "EfficientNetV2B0": ("EfficientNetV2B0", 32, {}),
    "EfficientNetV2B1": ("EfficientNetV2B1", 32, {}),
    "EfficientNetV2B2": ("EfficientNetV2B2", 32, {}),
    "EfficientNetV2B3": ("EfficientNetV2B3", 32, {}),
    "EfficientNetV2S": ("EfficientNetV2S", 32, {}),
    "InceptionResNetV2": ("InceptionResNetV2", 75, {}),
    "InceptionV3": ("InceptionV3", 75, {}),
    "MobileNet": ("MobileNet", 32, {}),
    "MobileNetV2": ("MobileNetV2", 32, {}),
    "MobileNetV3Small": ("MobileNetV3Small", 32, {}),
    "MobileNetV3Large": ("MobileNetV3Large", 32, {}),
    "NASNetMobile": ("NASNetMobile", 32, {}),
    "ResNet50": ("ResNet50", 32, {}),
    "ResNet101": ("ResNet101", 32, {}),
    "ResNet50V2": ("ResNet50V2", 32, {}),
    "ResNet101V2": ("ResNet101V2", 32, {}),
    "VGG16": ("VGG16", 32, {}),
    "Xception": ("Xception", 71, {}),
}
QUICK = ("MobileNet", "ResNet50")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def digits(size, n=None, integer=False):
    """sklearn's digits as RGB images of side ``size`` (nearest upscaling), pixels 0-255, and labels.

    The 17 grey levels times 255/16 are not integers (15.9375, ...); ``integer=True`` rounds them, as
    an image's pixels are (a file whose int8 input has scale 1 rounds them itself, Keras does not).
    """
    from sklearn.datasets import load_digits  # noqa: PLC0415

    d = load_digits()
    x = d.images.astype(np.float32) / 16.0 * 255.0
    if integer:
        x = np.round(x)
    idx = np.arange(size) * 8 // size
    x = x[:, idx][:, :, idx]
    x = np.repeat(x[..., None], 3, -1)
    y = d.target.astype(np.int64)
    return (x, y) if n is None else (x[:n], y[:n])


def build(name, **overrides):
    """The float model of sweep row ``name`` (random weights, 10 classes, logits)."""
    import keras  # noqa: PLC0415

    ctor, side, extra = MODELS[name]
    kwargs = dict(weights=None, input_shape=(side, side, 3), classes=10, classifier_activation=None)
    kwargs.update(extra)
    kwargs.update(overrides)
    return getattr(keras.applications, ctor)(**kwargs)


def run_one(
    name, n_calibration=32, n_eval=16, latency=False, rounds=5, invokes=10, overrides=None, align=True
):
    """Quantize, run, export and run in LiteRT one sweep model; a JSON-ready dict (never raises)."""
    import keras  # noqa: PLC0415

    from benchmarks.common import set_threads  # noqa: PLC0415

    try:
        set_threads(1)
    except RuntimeError:  # TensorFlow already started in this process (a test): keep its threads
        pass

    import tfdq  # noqa: PLC0415
    from tfdq.export import inspect_tflite  # noqa: PLC0415
    from tfdq.export.flatbuffer import float_ops  # noqa: PLC0415
    from tfdq.export.runtime import LiteRTRunner  # noqa: PLC0415

    row = {"model": name, "input": MODELS[name][1], "stage": "build"}
    t0 = time.time()
    try:
        keras.utils.set_random_seed(0)
        x, y = digits(MODELS[name][1])
        calib, held = x[:n_calibration], x[-n_eval:]
        model = build(name, **(overrides or {}))
        row["params"] = int(model.count_params())
        tfdq.recalibrate_batchnorm(model, x[:64], batch_size=64)
        row["stage"] = "quantize_model"
        qmodel, report = tfdq.quantize_model(
            model, calibration_data=calib, target="tflite", return_report=True
        )
        row["export_problems"] = report["export_problems"]
        row["float_layers"] = report["float_layers"]
        row["unknown_operations"] = report["unknown_operations"]
        row["quantized_layers"] = len(report["quantized_layers"])
        if align and not report["export_problems"]:
            # what a user does before export: each folded BatchNorm's bias onto the file's int32 grid, so
            # that Keras computes what the file computes (without it, biases round in the file only)
            row["stage"] = "align_biases"
            tfdq.export.align_biases(qmodel, calib)
            row["aligned_biases"] = True
        row["stage"] = "forward"
        keras_out = np.asarray(qmodel.predict(held, batch_size=n_eval, verbose=0), np.float64)
        row["forward_finite"] = bool(np.all(np.isfinite(keras_out)))
        row["quantized"] = True
        if report["export_problems"]:
            row["stage"] = "refused before training"
            row["exported"] = False
            return row
        row["stage"] = "to_tflite"
        tflite, export_report = tfdq.export.to_tflite(qmodel, calib, return_report=True)
        info = inspect_tflite(tflite)
        row["file_bytes"] = len(tflite)
        row["ops"] = sorted({o["op"] for o in info["ops"]})
        row["calibrated_tensors"] = len(export_report["calibrated"])
        row["stage"] = "litert"
        runner = LiteRTRunner(tflite)
        lite_out = runner(held).reshape(len(held), -1)
        row["float_ops"] = sorted(set(float_ops(info)))
        step = runner.output_scale
        row["top1_agreement"] = float(np.mean(np.argmax(lite_out, -1) == np.argmax(keras_out, -1)))
        row["max_output_diff_steps"] = float(np.max(np.abs(lite_out - keras_out)) / step)
        # untrained networks give logits close together (top-1 flips easily): the file's error relative
        # to the spread of the Keras logits around their mean per example (0: equal, 1: as large as them)
        centered = keras_out - keras_out.mean(-1, keepdims=True)
        error = (lite_out - lite_out.mean(-1, keepdims=True)) - centered
        row["relative_logit_error"] = float(np.sqrt(np.mean(error**2) / max(np.mean(centered**2), 1e-30)))
        row["exported"] = not row["float_ops"]
        if latency:
            row["stage"] = "latency"
            row.update(_latency(model, qmodel, calib, tflite, rounds, invokes))
        row["stage"] = "done"
    except Exception as e:  # noqa: BLE001 (a row per model, whatever fails)
        row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        row["traceback"] = traceback.format_exc()[-3000:]
        row.setdefault("quantized", False)
        row["exported"] = False
    finally:
        row["seconds"] = round(time.time() - t0, 1)
    return row


def finetune_and_verify(
    name, n_train=1000, float_epochs=2, quant_epochs=1, lr=1e-3, seed=0, integer_pixels=False
):
    """A short fine-tune on digits (float, then quantized), align_biases, to_tflite, verify.

    The float network (random weights) trains ``float_epochs`` on ``n_train``
    digits at the model's input size; its BatchNorm statistics are then set
    from the data (keras.applications' momentum 0.99-0.999 leaves them near
    their start after a short fit); quantize_model, ``quant_epochs`` of
    quantized training, align_biases, to_tflite and verify on the held-out
    digits. Returns a JSON-ready dict (agreement, accuracies, calibrated
    tensors, and each learned map of the file against Keras': :func:`map_offsets`).
    ``integer_pixels`` rounds the digits' pixels (:func:`digits`).
    """
    import keras  # noqa: PLC0415

    import tfdq  # noqa: PLC0415

    t0 = time.time()
    keras.utils.set_random_seed(seed)
    x, y = digits(MODELS[name][1], integer=integer_pixels)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    xt, yt, xv, yv = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    model = build(name)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.Adam(lr), loss, metrics=["accuracy"])
    model.fit(xt, yt, epochs=float_epochs, batch_size=32, verbose=2)
    tfdq.recalibrate_batchnorm(model, xt[:256], batch_size=128)
    float_acc = float(model.evaluate(xv, yv, verbose=0)[1])
    qmodel = tfdq.quantize_model(model, calibration_data=xt[:128], strict=True)
    qmodel.compile(keras.optimizers.Adam(lr / 2), loss, metrics=["accuracy"])
    qmodel.fit(xt, yt, epochs=quant_epochs, batch_size=32, verbose=2)
    tfdq.export.align_biases(qmodel, xt[:128])
    tflite, report = tfdq.export.to_tflite(qmodel, xt[:128], return_report=True)
    result = tfdq.export.verify(qmodel, tflite, (xv, yv), export_report=report)
    print(result.format(), flush=True)
    # where the file departs from Keras: every learned map against the file's tensor on its grid
    try:
        maps = map_offsets(qmodel, tflite, xv[:16])
        maps_error = None
    except ValueError as e:  # a nested model called more than once: no single value of its maps
        maps, maps_error = [], f"{type(e).__name__}: {e}"
    off = [m for m in maps if m["max_steps"] is None or m["max_steps"] > 0]
    return {
        "model": name,
        "input": MODELS[name][1],
        "n_train": n_train,
        "integer_pixels": integer_pixels,
        "float_epochs": float_epochs,
        "quant_epochs": quant_epochs,
        "float_accuracy": float_acc,
        "keras_accuracy": result.get("keras_accuracy"),
        "tflite_accuracy": result.get("tflite_accuracy"),
        "top1_agreement": result["top1_agreement"],
        "disagreements": result.get("disagreements"),
        "tied_top_outputs": result.get("tied_top_outputs"),
        "max_output_diff_steps": result["max_abs_output_diff_in_output_steps"],
        "float_ops": result["float_ops"],
        "all_kernels_exact": result["all_kernels_exact"],
        "file_bytes": len(tflite),
        "calibrated_tensors": [c["tensor"] for c in report["calibrated"]],
        "standalone_batchnorms": len(report["batchnorms"]),
        "learned_maps": len(maps),
        "learned_maps_equal": sum(m["max_steps"] == 0 for m in maps),
        "learned_maps_not_found": [m["layer"] for m in maps if m["max_steps"] is None],
        # in model order: the first ones are where the difference starts
        "learned_maps_off": off[:40],
        "learned_maps_error": maps_error,
        "seconds": round(time.time() - t0, 1),
    }


def map_offsets(qmodel, tflite, x):
    """Each learned activation map of ``qmodel`` against the file's int8 tensor on the same grid.

    Runs the file in LiteRT with every intermediate tensor kept and, for each
    :class:`tfdq.layers.ActivationQuantizer` (in model order), finds the int8
    tensors of the file with its output's shape and scale; the largest
    difference from Keras' map in steps of the grid (the best-matching tensor
    where several qualify). ``None`` where the file holds no tensor on that
    grid (the map was fused away or requantized). Quantizers inside nested
    models (keras' ConvNeXt stem and downsampling blocks) are read by
    :func:`quantizer_outputs`. Returns a list of
    ``{"layer", "step", "max_steps", "mean_steps"}``.
    """
    from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415

    import tfdq  # noqa: PLC0415

    layers = tfdq.layers.activation_quantizer_layers(qmodel)
    values = quantizer_outputs(qmodel, x)
    wants = [values[id(layer)] for layer in layers]
    it = Interpreter(model_content=tflite, experimental_preserve_all_tensors=True)
    inp = it.get_input_details()[0]
    it.resize_tensor_input(inp["index"], list(x.shape))
    it.allocate_tensors()
    s, zp = inp["quantization"]
    q = np.sign(x / s) * np.floor(np.abs(x / s) + 0.5) + zp
    it.set_tensor(inp["index"], np.clip(q, -128, 127).astype(np.int8))
    it.invoke()
    details = [t for t in it.get_tensor_details() if t["dtype"] == np.int8]
    out = []
    for layer, want in zip(layers, wants):
        want = np.asarray(want, np.float64)
        step = layer.quantizer.describe()["d"]
        best = None
        for t in details:
            if tuple(t["shape"]) != want.shape or abs(t["quantization"][0] / step - 1) > 1e-6:
                continue
            diff = np.abs((it.get_tensor(t["index"]).astype(np.float64) - t["quantization"][1]) * step - want)
            if best is None or diff.max() / step < best[0]:
                best = (float(diff.max() / step), float(diff.mean() / step))
        out.append(
            {
                "layer": layer.name,
                "step": step,
                "max_steps": None if best is None else best[0],
                "mean_steps": None if best is None else best[1],
            }
        )
    return out


def quantizer_outputs(model, x):
    """The output of every :class:`tfdq.layers.ActivationQuantizer` of ``model`` on ``x``, by ``id(layer)``.

    One probe model per (nested) model: the outputs of its own quantizers and
    the inputs of the nested models it calls, in one ``predict``; each nested
    model is then probed the same way from the value of its input. A nested
    model must be called once in its parent's graph (``ValueError`` otherwise).
    """
    import keras  # noqa: PLC0415

    import tfdq  # noqa: PLC0415

    graph = getattr(model, "_functional", None) or model  # a Sequential keeps its graph there
    own = [layer for layer in model.layers if isinstance(layer, tfdq.layers.ActivationQuantizer)]
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    nodes = [node for level in graph._nodes_by_depth.values() for node in level]
    feeds = []
    for sub in nested:
        calls = [node for node in nodes if node.operation is sub]
        if len(calls) != 1:
            raise ValueError(f"nested model {sub.name!r} is called {len(calls)} times in {model.name!r}")
        feeds.append(list(calls[0].input_tensors))
    outputs = [layer.output for layer in own] + [t for feed in feeds for t in feed]
    if not outputs:
        return {}
    n = len(x[0]) if isinstance(x, (list, tuple)) else len(x)
    got = keras.Model(graph.inputs, outputs).predict(x, batch_size=n, verbose=0)
    got = list(got) if isinstance(got, (list, tuple)) else [got]
    values = {id(layer): np.asarray(v) for layer, v in zip(own, got)}
    k = len(own)
    for sub, feed in zip(nested, feeds):
        sub_x = got[k] if len(feed) == 1 else got[k : k + len(feed)]
        k += len(feed)
        values.update(quantizer_outputs(sub, sub_x))
    return values


def _latency(model, qmodel, calib, tflite_default, rounds, invokes):
    """Sizes and batch-1 LiteRT latency: float32 file, tfdq int8 storage, tfdq default (int4 where b <= 4)."""
    import tensorflow as tf  # noqa: PLC0415

    import tfdq  # noqa: PLC0415
    from tfdq.export.runtime import LiteRTRunner  # noqa: PLC0415

    float_file = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    int8_file = tfdq.export.to_tflite(qmodel, calib, storage="int8")
    files = {"float32": float_file, "tfdq_int8": int8_file, "tfdq_default": tflite_default}
    runners = {k: LiteRTRunner(v, num_threads=1) for k, v in files.items()}
    x = calib[:1]
    times = {k: [] for k in files}
    for r in runners.values():
        for _ in range(3):
            r(x)
    for _ in range(rounds):
        for k, r in runners.items():
            for _ in range(invokes):
                t = time.perf_counter()
                r(x)
                times[k].append(time.perf_counter() - t)
    out = {f"{k}_bytes": len(v) for k, v in files.items()}
    out.update({f"{k}_ms": 1e3 * float(np.median(v)) for k, v in times.items()})
    return out


def _run_subprocess(name, args, timeout):
    cmd = [sys.executable, "-m", "benchmarks.applications_sweep", "--one", name]
    if args.latency:
        cmd.append("--latency")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"model": name, "quantized": False, "exported": False, "error": f"timeout after {timeout} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {
        "model": name,
        "quantized": False,
        "exported": False,
        "error": f"subprocess exit {proc.returncode}: {proc.stderr[-2000:]}",
    }


def summary_table(rows):
    """Markdown table of the sweep."""
    lines = [
        "| model | input | quantizes + runs | all-integer file in LiteRT | relative logit error | file kB | "
        "seconds | refused / error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        why = ""
        if r.get("export_problems"):
            classes = sorted({p["class"] for p in r["export_problems"]})
            why = "refused: " + ", ".join(classes)
        elif r.get("error"):
            message = r["error"]
            if message.startswith("subprocess exit"):  # its stderr is TensorFlow's log: the exit code says it
                code = message.split(":")[0]
                why = code + (" (killed: the kernel's out-of-memory killer)" if code.endswith("-9") else "")
            else:
                why = message[message.find("error:") :] if "error:" in message else message
            why = why.splitlines()[0][:140].replace("|", "/")
        error = f"{r['relative_logit_error']:.2f}" if "relative_logit_error" in r else ""
        size = f"{r['file_bytes'] / 1e3:.0f}" if "file_bytes" in r else ""
        lines.append(
            f"| {r['model']} | {r.get('input', '')} | {'yes' if r.get('quantized') else 'no'} | "
            f"{'yes' if r.get('exported') else 'no'} | {error} | {size} | {r.get('seconds', '')} | {why} |"
        )
    return "\n".join(lines)


def latency_table(rows):
    """Markdown table of file sizes and batch-1 LiteRT latency (rows measured with ``--latency``)."""
    lines = [
        "| model | float32 kB | int8 kB | fast kB | float32 ms | int8 ms | fast ms | int8 / float32 | "
        "fast / float32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "float32_ms" not in r:
            continue
        f32, i8, fast = r["float32_ms"], r["tfdq_int8_ms"], r["tfdq_default_ms"]
        lines.append(
            f"| {r['model']} | {r['float32_bytes'] / 1e3:.0f} | {r['tfdq_int8_bytes'] / 1e3:.0f} | "
            f"{r['tfdq_default_bytes'] / 1e3:.0f} | {f32:.2f} | {i8:.2f} | {fast:.2f} | {i8 / f32:.2f} | "
            f"{fast / f32:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--one", help="run one model in this process and print its JSON line")
    parser.add_argument("--models", help="comma-separated subset (default: all 26)")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--latency", action="store_true", help="also file sizes and LiteRT latency")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per model")
    parser.add_argument(
        "--out",
        help="JSON file (default results/applications_sweep.json; --finetune: applications_finetune.json)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="merge the rows run into --out (each replaces the row of its model) instead of rewriting it",
    )
    parser.add_argument("--finetune", help="comma-separated models: short fine-tune + verify (JSON to --out)")
    parser.add_argument(
        "--integer-pixels",
        action="store_true",
        help="--finetune: round the digits' pixels (digits(integer=True))",
    )
    parser.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    args = parser.parse_args(argv)
    if args.out is None:
        name = "applications_finetune.json" if args.finetune else "applications_sweep.json"
        args.out = os.path.join(RESULTS, name)
    if args.table:
        with open(args.out) as f:
            rows = json.load(f)["models"]
        print(summary_table(rows) + "\n\n" + latency_table(rows))
        return
    if args.finetune:
        from benchmarks.common import save_report  # noqa: PLC0415

        names = args.finetune.split(",")
        rows = []
        for name in names:
            try:
                rows.append(finetune_and_verify(name, integer_pixels=args.integer_pixels))
            except Exception as e:  # noqa: BLE001 (a row per model)
                rows.append(
                    {
                        "model": name,
                        "error": f"{type(e).__name__}: {str(e)[:2000]}",
                        "traceback": traceback.format_exc()[-3000:],
                    }
                )
            print(json.dumps(rows[-1]), flush=True)
            out_dir, out_name = os.path.split(args.out)
            merged = merge_rows(_read_rows(args.out), rows) if args.merge else rows
            save_report(
                out_dir,
                os.path.splitext(out_name)[0],
                "keras.applications: short fine-tune on digits, align_biases, to_tflite, verify",
                "python -m benchmarks.applications_sweep --finetune NAMES (one model per process, --merge)",
                {"models": merged},
                complete=len(rows) == len(names),
            )
        return
    if args.one:
        print(json.dumps(run_one(args.one, latency=args.latency)), flush=True)
        return
    names = list(QUICK) if args.quick else (args.models.split(",") if args.models else list(MODELS))
    rows = []
    for name in names:
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        row = _run_subprocess(name, args, args.timeout)
        rows.append(row)
        print(
            f"    quantized={row.get('quantized')} exported={row.get('exported')} "
            f"{row.get('seconds', '')} s {row.get('error', '')[:200]}",
            flush=True,
        )
        _write(args, rows, complete=len(rows) == len(names))
    print(summary_table(rows))


def _read_rows(path):
    """The rows of an earlier result file (none if it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f).get("models", [])


def merge_rows(old, new):
    """``old`` rows with each of ``new`` replacing the row of its model, in the order of :data:`MODELS`."""
    by_name = {r["model"]: r for r in old}
    by_name.update({r["model"]: r for r in new})
    order = {name: i for i, name in enumerate(MODELS)}
    return sorted(by_name.values(), key=lambda r: order.get(r["model"], len(order)))


def _write(args, rows, complete):
    from benchmarks.common import save_report  # noqa: PLC0415

    if args.merge:
        rows = merge_rows(_read_rows(args.out), rows)
        complete = True  # the file holds every row measured so far (``missing`` names the others)
    payload = {
        "models": rows,
        "quantized": sum(bool(r.get("quantized")) for r in rows),
        "exported": sum(bool(r.get("exported")) for r in rows),
        "total": len(rows),
        "missing": [name for name in MODELS if name not in {r["model"] for r in rows}],
    }
    out_dir, name = os.path.split(args.out)
    save_report(
        out_dir,
        os.path.splitext(name)[0],
        "keras.applications sweep: quantize_model, forward, to_tflite, LiteRT",
        "python -m benchmarks.applications_sweep"
        + (" --latency" if args.latency else "")
        + (" --models NAMES --merge (one model at a time)" if args.merge else ""),
        payload,
        complete=complete,
    )


if __name__ == "__main__":
    main()
