"""LiteRT latency and file size of MobileNetV3Small and EfficientNetB0: float32, tfdq int8 and mixed, tfmot.

The networks are ``keras.applications`` models at ImageNet shape (224x224x3,
1,000 classes, ``weights=None``: nothing can be downloaded here), so the
files are for timing and size only. Files per network:

* ``float32``: the float Keras model through ``tf.lite.TFLiteConverter``.
* ``tfdq_int8``: ``tfdq.quantize_model`` (U3 weights and activations, the
  quantizers initialized at 4 bits from the float weights and calibrated on
  generated images), exported with ``int4_kernels=False`` (every kernel
  int8). No training: the integers are the 4-bit initialization's.
* ``tfdq_mixed``: the same model exported with int4 kernels where LiteRT
  keeps them exact (``b <= 4`` and a non-negative output) and int8
  elsewhere: the speed and size of int4 storage against int8 storage of the
  same integers.
* ``tfmot_int8``: tfmot 0.8.1's ``quantize_model`` of the same network in
  tf_keras (``.venv-peers``, setup in ``benchmarks/tfkeras_models.py``),
  converted with the default optimizations; where tfmot cannot quantize
  the network, its error is recorded instead.

Every file takes float32 input and gives float32 output. Latency: batch 1,
``num_threads`` 1 and 2, interleaved rounds (``benchmarks.latency.time_files``:
every (file, threads) pair per round, alternating order; medians over all
timed invocations). Writes ``results/mobile_latency.json``::

    python -m benchmarks.mobile_latency                          # both networks, 10 rounds x 20 invokes
    python -m benchmarks.mobile_latency --models=MobileNetV3Small --rounds=4 --invokes=10
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags, logging

from benchmarks.common import RESULTS_DIR, write_result
from benchmarks.latency import time_files
from benchmarks.peers import PEERS_PYTHON, describe_tflite, peers_env_problem

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("MobileNetV3Small", "EfficientNetB0")


def _define_flags():
    flags.DEFINE_list("models", list(MODELS), "keras.applications networks to export and time.")
    flags.DEFINE_integer("size", 224, "Input height and width.")
    flags.DEFINE_integer("rounds", 10, "Rounds; each round times every (file, threads) pair.")
    flags.DEFINE_integer("invokes", 20, "Timed invocations per pair and round.")
    flags.DEFINE_bool("tfmot", True, "Try tfmot's quantize_model in .venv-peers.")
    flags.DEFINE_string("tfmot_worker", "", "Internal: build tfmot's file of this network (in .venv-peers).")
    flags.DEFINE_string("worker_out", "", "Internal: folder for the worker's file and JSON.")
    flags.DEFINE_string("out_dir", RESULTS_DIR, "Output folder.")


def _build(applications, name, size):
    kwargs = {"weights": None, "input_shape": (size, size, 3), "classes": 1000}
    return getattr(applications, name)(**kwargs)


def tfmot_worker(name, size, out):
    """In .venv-peers: tfmot's 8-bit quantize_model of the tf_keras network, converted; JSON to ``out``."""
    import numpy as np  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415
    import tensorflow_model_optimization as tfmot  # noqa: PLC0415
    import tf_keras  # noqa: PLC0415

    result = {"tfmot": tfmot.__version__, "tf_keras": tf_keras.__version__}
    model = _build(tf_keras.applications, name, size)
    try:
        q = tfmot.quantization.keras.quantize_model(model)
    except Exception as err:  # noqa: BLE001 (the error is the result)
        result["error"] = f"tfmot.quantization.keras.quantize_model: {type(err).__name__}: {err}"[:1500]
    else:
        x = np.random.default_rng(0).uniform(0, 255, (4, size, size, 3)).astype("float32")
        q.predict(x, verbose=0)
        converter = tf.lite.TFLiteConverter.from_keras_model(q)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        path = os.path.join(out, f"{name}_tfmot.tflite")
        with open(path, "wb") as f:
            f.write(converter.convert())
        result["tflite_path"] = path
    with open(os.path.join(out, "tfmot.json"), "w") as f:
        json.dump(result, f)


def _tfmot_file(name, size, python=PEERS_PYTHON):
    """(bytes or None, info) of tfmot's file, built by a subprocess in .venv-peers."""
    problem = peers_env_problem(python)
    if problem:
        return None, {"error": problem}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [python, "-m", "benchmarks.mobile_latency", f"--tfmot_worker={name}", f"--size={size}"]
        cmd.append(f"--worker_out={tmp}")
        env = dict(os.environ, TF_USE_LEGACY_KERAS="1")
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
        path = os.path.join(tmp, "tfmot.json")
        if not os.path.exists(path):
            return None, {"error": f"worker failed (exit {proc.returncode}): {proc.stderr[-1500:]}"}
        with open(path) as f:
            info = json.load(f)
        if "tflite_path" not in info:
            return None, info
        with open(info.pop("tflite_path"), "rb") as f:
            return f.read(), info


def build_files(name, size, tfmot=True):
    """The .tflite files of one network (bytes by kind) and how they were made."""
    import keras  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    import tfdq  # noqa: PLC0415

    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).uniform(0, 255, (32, size, size, 3)).astype("float32")
    model = _build(keras.applications, name, size)
    files, info = {}, {"weights": int(model.count_params())}
    start = time.time()
    files["float32"] = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    q, report = tfdq.quantize_model(model, calibration_data=x, init_bits=4, strict=True, return_report=True)
    info["quantize_seconds"] = time.time() - start
    info["quantizers"] = {
        "weights": len(report["quantized_layers"]),
        "activations": len(report["activation_quantizers"]),
    }
    for kind, int4 in (("tfdq_int8", False), ("tfdq_mixed", True)):
        tflite, export = tfdq.export.to_tflite(
            q, x, input_type="float32", output_type="float32", int4_kernels=int4, return_report=True
        )
        files[kind] = tflite
        storage = [k["storage"] for k in export["kernels"]]
        info[kind] = {
            "kernels_int4": storage.count("int4"),
            "kernels_int8": storage.count("int8"),
            "calibrated_tensors": len(export["calibrated"]),
        }
        print(f"{name}: {kind} exported ({len(tflite)} bytes)", flush=True)
    if tfmot:
        tflite, tfmot_info = _tfmot_file(name, size)
        info["tfmot"] = tfmot_info
        if tflite is not None:
            files["tfmot_int8"] = tflite
    info["build_seconds"] = time.time() - start
    return files, info


def run(models=MODELS, size=224, rounds=10, invokes=20, tfmot=True):
    """Build and time every network's files; returns the JSON-ready result."""
    out = {"config": {"size": size, "rounds": rounds, "invokes": invokes, "threads": [1, 2], "batch": 1}}
    for name in models:
        files, info = build_files(name, size, tfmot)
        load_before = os.getloadavg()
        latency = time_files(files, (1, 2), rounds, invokes, warmup=5)
        sizes = {k: len(b) for k, b in files.items()}
        ratios = {}
        for t in ("1_thread", "2_threads"):
            base = latency["float32"][t]["median_ms"]
            for k in files:
                if k != "float32":
                    ratios[f"float32 / {k} latency, {t.replace('_', ' ')}"] = (
                        base / latency[k][t]["median_ms"]
                    )
        for k in files:
            if k != "float32":
                ratios[f"{k} / float32 file size"] = sizes[k] / sizes["float32"]
        out[name] = {
            "file_bytes": sizes,
            "latency": latency,
            "ratios": ratios,
            "contents": {
                k: {c: describe_tflite(b)[c] for c in ("integer", "float_ops", "weight_bytes_by_type")}
                for k, b in files.items()
            },
            "build": info,
            "load_average_1_5_15min": {
                "before_timing": list(load_before),
                "after_timing": list(os.getloadavg()),
            },
        }
        for k in files:
            lat = latency[k]
            print(
                f"{name:18s} {k:12s} {sizes[k] / 1024:9.1f} kB "
                f"{lat['1_thread']['median_ms']:8.2f} ms @1t {lat['2_threads']['median_ms']:8.2f} ms @2t",
                flush=True,
            )
        if "error" in info.get("tfmot", {}):
            print(f"{name}: tfmot: {info['tfmot']['error'][:300]}", flush=True)
    return out


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if FLAGS.tfmot_worker:
        tfmot_worker(FLAGS.tfmot_worker, FLAGS.size, FLAGS.worker_out)
        return
    result = run(FLAGS.models, FLAGS.size, FLAGS.rounds, FLAGS.invokes, FLAGS.tfmot)
    write_result(
        FLAGS.out_dir,
        "mobile_latency",
        "LiteRT batch-1 latency and file size of keras.applications MobileNetV3Small / EfficientNetB0 "
        "(224x224, untrained: timing and size only): float32, tfdq int8 and mixed int4/int8, tfmot int8",
        "python -m benchmarks.mobile_latency " + " ".join(sys.argv[1:]),
        result,
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
