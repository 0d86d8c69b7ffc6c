"""File size and LiteRT latency of the kernel storage policies (``to_tflite(storage=...)``).

The same learned integers, three storages: ``fast`` (the default: XNNPACK
everywhere, int4/int2 FULLY_CONNECTED for Dense and 1x1 convolutions with at
most ``FAST_INT4_MAX_ROWS`` output positions per example),
``smallest`` (int4/int2 wherever LiteRT runs it) and ``int8``, against the
float32 TFLite file of the float model. Models (random init, generated
inputs: timing and size only, no accuracy):

* ``mobilenetv2``: ``keras.applications.MobileNetV2`` (alpha 0.5, 96x96x3,
  1000 classes), ``quantize_model(init_bits=4)``: every kernel at 4 bits
  (initialized from the float weights; no training).
* ``mobilenetv2_2bit``: the same at ``init_bits=2`` (int2 where XNNPACK's
  FULLY_CONNECTED takes it: input channels a multiple of 4).
* ``resnet20``: ``tfdq.models.resnet20()`` (3x3 convolutions and one Dense),
  ``init_bits=4``.
* ``mobilenetv3small``: ``keras.applications.MobileNetV3Small`` (alpha 0.75,
  96x96), ``init_bits=4``, when it exports (the error is recorded otherwise).

Each tfdq file is checked with :func:`tfdq.export.verify` (learned integers
in the file, per layer: operator, storage, bytes, XNNPACK or not as LiteRT
reports it). All files take float32 input and give float32 output. Latency:
batch 1, ``benchmarks.latency.time_files`` (one interpreter per file and
thread count, warm-up, interleaved rounds in one process, medians; the
ratios are medians over rounds of the two files' round medians). Beside
MobileNetV2: tfmot's int8 file of the same architecture (tf_keras
``MobileNetV2``, alpha 0.5, random init, ``tfmot.quantization.keras.quantize_model``
with one training step on generated data, converted with the default
optimizations: int8 weights and activations, float32 input and output),
built by a subprocess in ``.venv-peers`` (setup: ``benchmarks/tfkeras_models.py``;
without it the JSON records why). Results:
``results/storage_policy.json``::

    python -m benchmarks.storage_policy              # 20 rounds x 30 invokes, a few minutes on 2 cores
    python -m benchmarks.storage_policy --quick      # smoke run (48x48 MobileNetV2, 2 rounds x 5 invokes)
    python -m benchmarks.storage_policy --layers     # one 1x1 convolution / Dense per file: int8, int4, int2
    python -m benchmarks.storage_policy --rows_sweep --models=mobilenetv2,mobilenetv3small --rounds=60 --invokes=50

``--layers`` times single layers of MobileNetV2's shapes (alpha 0.5, 96x96)
as int8 CONV_2D, int8 / int4 / int2 FULLY_CONNECTED (1 thread), which is
what the ``fast`` policy's int2 rule rests on; results in
``results/storage_policy_layers.json``. ``--rows_sweep`` exports the
``fast`` file of each model at several ``FAST_INT4_MAX_ROWS`` values
(``--max_rows``) and times them against the int8 file in one process
(``results/storage_policy_rows_sweep.json``): where the default limit
comes from.
"""

import json
import os
import subprocess
import tempfile
import time

from absl import app, flags

from benchmarks.common import RESULTS_DIR, write_result, write_run
from benchmarks.latency import judge, time_files

FLAGS = flags.FLAGS
POLICIES = ("fast", "smallest", "int8")
MODELS = ("mobilenetv2", "mobilenetv2_2bit", "resnet20", "mobilenetv3small")
TARGETS = {
    "mobilenetv2: fast / int8 file size": ("<=", 0.6),
    "mobilenetv2: fast / int8 latency, 1 thread": ("<=", 1.0),
    "mobilenetv2: fast / int8 latency, 2 threads": ("<=", 1.0),
    "mobilenetv2_2bit: smallest int2 kernel bytes / learned bytes": ("<=", 1.1),
}


def _define_flags():
    flags.DEFINE_integer("rounds", 20, "Rounds; each round times every (file, threads) pair.")
    flags.DEFINE_integer("invokes", 30, "Timed invocations per pair and round.")
    flags.DEFINE_list("threads", ["1", "2"], "LiteRT num_threads values.")
    flags.DEFINE_list("models", list(MODELS), f"Models, of {MODELS}.")
    flags.DEFINE_integer("size", 96, "Input height and width of the MobileNets.")
    flags.DEFINE_bool("layers", False, "Time single 1x1 layers per storage instead of whole models.")
    flags.DEFINE_bool(
        "rows_sweep",
        False,
        "Time 'fast' files of each model at several FAST_INT4_MAX_ROWS values against int8.",
    )
    flags.DEFINE_list(
        "max_rows", ["1", "9", "36", "144", "100000"], "FAST_INT4_MAX_ROWS values of --rows_sweep."
    )
    flags.DEFINE_bool("quick", False, "Smoke run: 48x48 MobileNetV2 (4 and 2 bits), 2 rounds x 5 invokes.")
    flags.DEFINE_string("out_dir", RESULTS_DIR, "Output folder.")
    flags.DEFINE_bool("tfmot", True, "Build tfmot's int8 MobileNetV2 file in .venv-peers and time it beside.")
    flags.DEFINE_string(
        "tfmot_worker", "", "Internal: write tfmot's MobileNetV2 file to this folder (in .venv-peers)."
    )


def build_model(name, size=96):
    """``(float model, tfdq model, calibration inputs)`` for one benchmark model."""
    import keras  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    import tfdq  # noqa: PLC0415

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    bits = 2 if name.endswith("_2bit") else 4
    if name.startswith("mobilenetv2"):
        model = keras.applications.MobileNetV2(input_shape=(size, size, 3), alpha=0.5, weights=None)
        x = rng.uniform(-1, 1, (64, size, size, 3)).astype("float32")
    elif name == "mobilenetv3small":
        model = keras.applications.MobileNetV3Small(input_shape=(size, size, 3), alpha=0.75, weights=None)
        x = rng.uniform(0, 255, (64, size, size, 3)).astype("float32")
    elif name == "resnet20":
        model = tfdq.models.resnet20()
        x = rng.uniform(0, 1, (64, 32, 32, 3)).astype("float32")
    else:
        raise ValueError(f"unknown model {name!r}; one of {MODELS}")
    qmodel = tfdq.quantize_model(model, calibration_data=x, init_bits=bits)
    return model, qmodel, x


def tfmot_worker(size, out):
    """In .venv-peers: tfmot's default 8-bit QAT wrapping (``quantize_model``) of the tf_keras
    MobileNetV2 of :func:`build_model` (alpha 0.5, 1000 classes, random init), converted with the
    default optimizations (int8 weights and activations, float32 input and output); JSON to ``out``."""
    import numpy as np  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415
    import tensorflow_model_optimization as tfmot  # noqa: PLC0415
    import tf_keras  # noqa: PLC0415

    tf_keras.utils.set_random_seed(0)
    result = {"tfmot": tfmot.__version__, "tf_keras": tf_keras.__version__, "tensorflow": tf.__version__}
    model = tf_keras.applications.MobileNetV2(input_shape=(size, size, 3), alpha=0.5, weights=None)
    q = tfmot.quantization.keras.quantize_model(model)
    # one training step on generated data moves the activation ranges off their initial values
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (16, size, size, 3)).astype("float32")
    q.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    q.fit(x, rng.integers(0, 1000, 16), batch_size=16, epochs=1, verbose=0)
    converter = tf.lite.TFLiteConverter.from_keras_model(q)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    path = os.path.join(out, "mobilenetv2_tfmot.tflite")
    with open(path, "wb") as f:
        f.write(converter.convert())
    result["tflite_path"] = path
    with open(os.path.join(out, "tfmot.json"), "w") as f:
        json.dump(result, f)


def tfmot_file(size):
    """``(bytes or None, info)``: tfmot's int8 MobileNetV2 file, built by a subprocess in .venv-peers."""
    from benchmarks.peers import PEERS_PYTHON, ROOT, peers_env_problem  # noqa: PLC0415

    problem = peers_env_problem(PEERS_PYTHON)
    if problem:
        return None, {"error": problem}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [PEERS_PYTHON, "-m", "benchmarks.storage_policy", f"--tfmot_worker={tmp}", f"--size={size}"]
        env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
        path = os.path.join(tmp, "tfmot.json")
        if not os.path.exists(path):
            return None, {"error": f"worker failed (exit {proc.returncode}): {proc.stderr[-1500:]}"}
        with open(path) as f:
            info = json.load(f)
        with open(info.pop("tflite_path"), "rb") as f:
            return f.read(), info


def export_policies(qmodel, x, model_name):
    """Per policy: the file and what it holds (per layer and in total)."""
    import tfdq  # noqa: PLC0415
    from tfdq.export.runtime import xnnpack_delegated  # noqa: PLC0415

    files, details = {}, {}
    for policy in POLICIES:
        t0 = time.time()
        tfdq.export.align_biases(qmodel, x, storage=policy)
        tflite, report = tfdq.export.to_tflite(
            qmodel, x, storage=policy, input_type="float32", output_type="float32", return_report=True
        )
        check = tfdq.export.verify(qmodel, tflite, x, export_report=report)
        layers = check["layers"]
        delegated = xnnpack_delegated(tflite)
        ops = [o["op"] for o in tfdq.export.inspect_tflite(tflite)["ops"]]
        int2 = [e for e in layers if e["storage"] == "int2"]
        details[policy] = {
            "file_bytes": len(tflite),
            "kernel_bytes_by_storage": check["sizes"]["kernel_bytes_by_storage"],
            "kernel_bytes_in_file": check["sizes"]["kernel_bytes_in_file"],
            "learned_packed_bytes": check["sizes"]["learned_packed_bytes"],
            "all_kernels_exact": check["all_kernels_exact"],
            "top1_agreement_on_generated_inputs": check["top1_agreement"],
            "max_abs_output_diff_in_output_steps": check["max_abs_output_diff_in_output_steps"],
            "ops_in_xnnpack": int(sum(bool(d) for d in delegated)),
            "ops": len(ops),
            "ops_outside_xnnpack": _count(o for o, d in zip(ops, delegated) if not d),
            "kernels_in_xnnpack": sum(bool(e.get("xnnpack")) for e in layers),
            "kernels": len(layers),
            "kernel_weights_in_xnnpack": sum(e["count"] for e in layers if e.get("xnnpack")),
            "kernel_weights": sum(e["count"] for e in layers),
            "by_operator_and_storage": _tally(layers),
            "int2_layers": len(int2),
            "int2_kernel_bytes": sum(e["bytes"] for e in int2),
            "int2_learned_bytes": sum(e["count"] * e["bits"] / 8 for e in int2),
            "notes": check["notes"],
            "layers": [
                {k: e.get(k) for k in ("layer", "bits", "count", "op", "storage", "bytes", "xnnpack")}
                for e in layers
            ],
            "export_seconds": time.time() - t0,
        }
        files[f"{model_name}:{policy}"] = tflite
        print(
            f"{model_name:>16} {policy:>8}: {len(tflite) / 1024:8.1f} kB, kernels exact "
            f"{check['all_kernels_exact']}, {details[policy]['kernels_in_xnnpack']}/{len(layers)} kernels in "
            f"XNNPACK, storage {_tally(layers)}",
            flush=True,
        )
    return files, details


def _count(names):
    out = {}
    for n in names:
        out[n] = out.get(n, 0) + 1
    return out


def _tally(layers):
    out = {}
    for e in layers:
        key = f"{e.get('op')} {e['storage']}"
        out[key] = out.get(key, 0) + 1
    return out


def float_file(model):
    import tensorflow as tf  # noqa: PLC0415

    return tf.lite.TFLiteConverter.from_keras_model(model).convert()


def summarize(models, latency, threads):
    """Ratios per model: policy / int8 (size; latency as the median of per-round ratios, both files
    timed in the same round), float32 / policy latency, and tfdq / tfmot where tfmot's file exists."""
    out = {}
    for m, info in models.items():
        if "error" in info:
            continue
        sizes = {p: info["policies"][p]["file_bytes"] for p in POLICIES}
        sizes["float32"] = info["float32_bytes"]
        tfmot = f"{m}:tfmot_int8" in latency
        for p in ("fast", "smallest"):
            out[f"{m}: {p} / int8 file size"] = sizes[p] / sizes["int8"]
        out[f"{m}: fast / float32 file size"] = sizes["fast"] / sizes["float32"]
        if tfmot:
            for p in ("fast", "int8"):
                out[f"{m}: {p} / tfmot int8 file size"] = sizes[p] / info["tfmot_int8"]["file_bytes"]
        for t in threads:
            key = f"{t}_thread{'s' if t > 1 else ''}"
            words = f"{t} thread{'s' if t > 1 else ''}"
            for p in ("fast", "smallest"):
                out[f"{m}: {p} / int8 latency, {words}"] = same_run_ratio(
                    latency, f"{m}:{p}", f"{m}:int8", key
                )
            out[f"{m}: float32 / fast latency, {words}"] = same_run_ratio(
                latency, f"{m}:float32", f"{m}:fast", key
            )
            if tfmot:
                for p in ("fast", "int8"):
                    out[f"{m}: {p} / tfmot int8 latency, {words}"] = same_run_ratio(
                        latency, f"{m}:{p}", f"{m}:tfmot_int8", key
                    )
        p = info["policies"]["smallest"]
        if p["int2_layers"]:
            out[f"{m}: smallest int2 kernel bytes / learned bytes"] = (
                p["int2_kernel_bytes"] / p["int2_learned_bytes"]
            )
    return out


LAYER_SHAPES = [  # (H = W, C_in, C_out) of MobileNetV2 alpha 0.5 at 96x96, and its 1000-class head (H = 1)
    (48, 16, 96),
    (24, 24, 144),
    (12, 32, 192),
    (6, 64, 384),
    (3, 160, 960),
    (3, 320, 1280),
    (1, 1280, 1000),
]


def layer_files():
    """One 1x1 convolution (ReLU) per file, the same learned integers in four storages."""
    import keras  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    import tfdq  # noqa: PLC0415
    from tfdq.export.plan import Plan  # noqa: PLC0415
    from tfdq.export.storage import apply_storage  # noqa: PLC0415

    files = {}
    for hw, cin, cout in LAYER_SHAPES:
        inp = keras.Input((hw, hw, cin))
        model = keras.Model(inp, keras.layers.Conv2D(cout, 1, activation="relu")(inp))
        x = np.random.default_rng(0).uniform(0, 1, (16, hw, hw, cin)).astype("float32")
        qmodel = tfdq.quantize_model(
            model, calibration_data=x, init_bits=2
        )  # integers in [-1, 1]: every type holds them
        name = f"{hw}x{hw}x{cin}->{cout}"
        conv8 = tfdq.export.to_tflite(qmodel, x, storage="int8", input_type="float32", output_type="float32")
        files[f"{name}:int8 CONV_2D"] = conv8
        for storage in ("int8", "int4", "int2"):
            plan = Plan(qmodel, storage="smallest")
            for p in plan.kernels.values():
                p.storage, p.form = storage, "fc"
            files[f"{name}:{storage} FULLY_CONNECTED"] = apply_storage(conv8, plan)
    return files


def run_layers(rounds, invokes):
    files = layer_files()
    latency = time_files(files, threads=[1], rounds=rounds, invokes=invokes)
    table = {}
    for key, value in latency.items():
        shape, form = key.split(":")
        table.setdefault(shape, {})[form] = value["1_thread"]["median_ms"]
    for shape, row in table.items():
        base = row["int8 CONV_2D"]
        print(
            f"{shape:>20}: "
            + ", ".join(f"{k} {v / base:.2f}x" for k, v in row.items())
            + f" (int8 conv {base:.4f} ms)"
        )
    write_result(
        FLAGS.out_dir,
        "storage_policy_layers",
        "single 1x1 layers: int8 CONV_2D against int8/int4/int2 FULLY_CONNECTED in LiteRT's XNNPACK, 1 thread",
        "python -m benchmarks.storage_policy --layers",
        {"median_ms": table, "rounds": rounds, "invokes": invokes, "shapes": LAYER_SHAPES},
    )


def FAST_INT4_MAX_ROWS():  # noqa: N802 (the constant, read when the run starts)
    from tfdq.export.plan import FAST_INT4_MAX_ROWS as rows  # noqa: PLC0415

    return rows


def same_run_ratio(latency, a, b, key):
    """Median over rounds of ``a``'s round median over ``b``'s (the two timed in the same round)."""
    import numpy as np  # noqa: PLC0415

    ra, rb = latency[a][key]["round_medians_ms"], latency[b][key]["round_medians_ms"]
    return float(np.median(np.asarray(ra) / np.asarray(rb)))


def run_rows_sweep(names, size, threads, rounds, invokes):
    """'fast' files at several FAST_INT4_MAX_ROWS values (the same integers) against int8."""
    import tfdq  # noqa: PLC0415
    from tfdq.export import plan as plan_module  # noqa: PLC0415

    files, sizes, int4_weights = {}, {}, {}
    default = plan_module.FAST_INT4_MAX_ROWS
    for name in names:
        _, qmodel, x = build_model(name, size)
        for rows in [None, *(int(r) for r in FLAGS.max_rows)]:
            policy = "int8" if rows is None else "fast"
            plan_module.FAST_INT4_MAX_ROWS = default if rows is None else rows
            try:
                tfdq.export.align_biases(qmodel, x, storage=policy)
                tflite, report = tfdq.export.to_tflite(
                    qmodel, x, storage=policy, input_type="float32", output_type="float32", return_report=True
                )
            finally:
                plan_module.FAST_INT4_MAX_ROWS = default
            label = f"{name}:{'int8' if rows is None else f'fast rows<={rows}'}"
            files[label], sizes[label] = tflite, len(tflite)
            int4_weights[label] = sum(k["count"] for k in report["kernels"] if k["storage"] != "int8")
            print(f"{label}: {len(tflite) / 1024:.1f} kB, {int4_weights[label]} sub-byte weights", flush=True)
    latency = time_files(files, threads=threads, rounds=rounds, invokes=invokes)
    table = {}
    for label in files:
        name = label.split(":")[0]
        row = {"file_bytes": sizes[label], "sub_byte_weights": int4_weights[label]}
        row["size_vs_int8"] = sizes[label] / sizes[f"{name}:int8"]
        for t in threads:
            key = f"{t}_thread{'s' if t > 1 else ''}"
            row[f"median_ms, {key}"] = latency[label][key]["median_ms"]
            row[f"same-run ratio vs int8, {key}"] = same_run_ratio(latency, label, f"{name}:int8", key)
        table[label] = row
        print(label, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    write_result(
        FLAGS.out_dir,
        "storage_policy_rows_sweep",
        "'fast' storage with int4 FULLY_CONNECTED only up to N rows (output positions), against int8",
        "python -m benchmarks.storage_policy --rows_sweep",
        {"table": table, "rounds": rounds, "invokes": invokes, "threads": threads, "size": size},
    )


def main(argv):
    del argv
    if FLAGS.tfmot_worker:
        return tfmot_worker(FLAGS.size, FLAGS.tfmot_worker)
    if FLAGS.layers:
        return run_layers(FLAGS.rounds, FLAGS.invokes)
    if FLAGS.rows_sweep:
        threads = [int(t) for t in FLAGS.threads]
        return run_rows_sweep(list(FLAGS.models), FLAGS.size, threads, FLAGS.rounds, FLAGS.invokes)
    rounds, invokes, size, names = FLAGS.rounds, FLAGS.invokes, FLAGS.size, list(FLAGS.models)
    if FLAGS.quick:
        rounds, invokes, size, names = 2, 5, 48, ["mobilenetv2", "mobilenetv2_2bit"]
    threads = [int(t) for t in FLAGS.threads]
    files, models = {}, {}
    for name in names:
        t0 = time.time()
        try:
            model, qmodel, x = build_model(name, size)
            model_files, details = export_policies(qmodel, x, name)
        except Exception as e:  # noqa: BLE001 (a model that does not export yet is a result)
            models[name] = {"error": f"{type(e).__name__}: {str(e)[:600]}"}
            print(f"{name}: {models[name]['error']}", flush=True)
            continue
        files.update(model_files)
        files[f"{name}:float32"] = float_file(model)
        models[name] = {
            "weights": int(sum(v["count"] for v in details["int8"]["layers"])),
            "input": list(x.shape[1:]),
            "float32_bytes": len(files[f"{name}:float32"]),
            "policies": details,
            "build_seconds": time.time() - t0,
        }
    if FLAGS.tfmot and "mobilenetv2" in models and "error" not in models["mobilenetv2"]:
        t0 = time.time()
        tflite, info = tfmot_file(size)
        if tflite is not None:
            files["mobilenetv2:tfmot_int8"] = tflite
            info["file_bytes"] = len(tflite)
        info["build_seconds"] = time.time() - t0
        models["mobilenetv2"]["tfmot_int8"] = info
        print(f"tfmot int8 MobileNetV2: {info}", flush=True)
    print(f"timing {len(files)} files x {threads} threads, {rounds} rounds x {invokes} invokes", flush=True)
    latency = time_files(files, threads=threads, rounds=rounds, invokes=invokes)
    for name, info in models.items():
        if "error" in info:
            continue
        kinds = [p for p in (*POLICIES, "float32", "tfmot_int8") if f"{name}:{p}" in latency]
        info["latency"] = {p: latency[f"{name}:{p}"] for p in kinds}
        for p in kinds:
            ms = " ".join(
                f"{latency[f'{name}:{p}'][f'{t}_thread' + ('s' if t > 1 else '')]['median_ms']:.3f}"
                for t in threads
            )
            kb = {
                "float32": info["float32_bytes"],
                "tfmot_int8": info.get("tfmot_int8", {}).get("file_bytes"),
            }
            kb = (info["policies"][p]["file_bytes"] if p in POLICIES else kb[p]) / 1024
            print(f"{name:>16} {p:>8}: {kb:8.1f} kB, ms at {threads} threads: {ms}")
    ratios = summarize(models, latency, threads)
    for k, v in ratios.items():
        print(f"  {k}: {v:.3f}")
    payload = {
        "models": models,
        "ratios": ratios,
        "targets": judge(ratios, TARGETS),
        "threads": threads,
        "rounds": rounds,
        "invokes": invokes,
        "fast_int4_max_rows": FAST_INT4_MAX_ROWS(),
        "data": "generated inputs, untrained (init_bits from the float weights): size and timing only",
    }
    write_run(
        FLAGS.out_dir,
        "storage_policy",
        "kernel storage policies: file size and LiteRT latency",
        payload,
        FLAGS.quick,
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
