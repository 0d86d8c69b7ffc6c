"""LiteRT latency and file size of MobileNetV3Small, EfficientNetB0, MobileNetV2: float32, tfdq int8 and mixed, tfmot.

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
* ``tfdq_int8_minimum`` (``--clamp_forms``): the ``tfdq_int8`` file as
  exported before :mod:`tfdq.export.clamps`: every clamp at a grid point
  (a signed quantizer's ``+n d``) an int8 MINIMUM, which XNNPACK does not
  run. The same integers; the before/after of that rewrite in one run.
* ``tfmot_int8``: tfmot 0.8.1's ``quantize_model`` of the same network in
  tf_keras (``.venv-peers``, setup in ``benchmarks/tfkeras_models.py``),
  converted with the default optimizations; where tfmot cannot quantize
  the network, its error is recorded instead.

Every file takes float32 input and gives float32 output. Latency: batch 1,
``num_threads`` 1 and 2, interleaved rounds (``benchmarks.latency.time_files``:
every (file, threads) pair per round, alternating order; medians over all
timed invocations), and the CPU time of an invocation at 1 thread
(:func:`cpu_times`, usable on a loaded machine). Per file, ``outside_xnnpack`` counts the operators that
LiteRT's XNNPACK delegate does not take, by type (asked of the runtime:
:func:`tfdq.export.runtime.xnnpack_delegated`). Writes
``results/mobile_latency.json`` (``--out_name`` another name)::

    python -m benchmarks.mobile_latency                          # both networks, 10 rounds x 20 invokes
    python -m benchmarks.mobile_latency --models=MobileNetV3Small --rounds=4 --invokes=10
    python -m benchmarks.mobile_latency --models=MobileNetV3Small,MobileNetV2 --size=96 \
        --kinds=tfdq_int8 --clamp_forms --notfmot --out_name=mobile_latency_clamps
    python -m benchmarks.mobile_latency --models=MobileNetV3Small,MobileNetV3Small-minimalistic \
        --size=96 --kinds=tfdq_int8 --notfmot --out_name=mobile_latency_hard_swish
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
KINDS = ("tfdq_int8", "tfdq_mixed")


def _define_flags():
    flags.DEFINE_list("models", list(MODELS), "keras.applications networks to export and time.")
    flags.DEFINE_integer("size", 224, "Input height and width.")
    flags.DEFINE_integer("rounds", 10, "Rounds; each round times every (file, threads) pair.")
    flags.DEFINE_integer("invokes", 20, "Timed invocations per pair and round.")
    flags.DEFINE_bool("tfmot", True, "Try tfmot's quantize_model in .venv-peers.")
    flags.DEFINE_list("kinds", list(KINDS), "tfdq files to build (tfdq_int8, tfdq_mixed).")
    flags.DEFINE_bool(
        "clamp_forms", False, "Also the int8 file with MINIMUM clamps (before tfdq.export.clamps)."
    )
    flags.DEFINE_string("out_name", "mobile_latency", "Result file name (without .json).")
    flags.DEFINE_string("tfmot_worker", "", "Internal: build tfmot's file of this network (in .venv-peers).")
    flags.DEFINE_string("worker_out", "", "Internal: folder for the worker's file and JSON.")
    flags.DEFINE_string("out_dir", RESULTS_DIR, "Output folder.")


def _build(applications, name, size):
    """``name`` is a keras.applications function; a ``-minimalistic`` suffix (MobileNetV3) builds the
    variant without hard-swish and squeeze-and-excite."""
    kwargs = {"weights": None, "input_shape": (size, size, 3), "classes": 1000}
    if name.endswith("-minimalistic"):
        name, kwargs["minimalistic"] = name.removesuffix("-minimalistic"), True
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


def _with_minimum_clamps():
    """A context in which ``to_tflite`` leaves every clamp an int8 MINIMUM (the form before
    :mod:`tfdq.export.clamps`): the same integers, for the before/after measurement only."""
    from unittest import mock  # noqa: PLC0415

    return mock.patch("tfdq.export.convert.clamps_as_requantize", lambda tflite: (tflite, []))


def outside_xnnpack(tflite):
    """``{operator: count}`` of the file's operators that LiteRT's XNNPACK delegate does not run."""
    from collections import Counter  # noqa: PLC0415

    from tfdq.export import inspect_tflite  # noqa: PLC0415
    from tfdq.export.runtime import xnnpack_delegated  # noqa: PLC0415

    ops = [o["op"] for o in inspect_tflite(tflite)["ops"]]
    return dict(Counter(op for op, ok in zip(ops, xnnpack_delegated(tflite)) if not ok))


def cpu_times(files, rounds, invokes, warmup=5):
    """Per file: median CPU milliseconds of one batch-1 invocation at 1 thread (``time.thread_time``).

    At one thread LiteRT and its XNNPACK delegate compute in the calling thread, so its CPU
    time is the work of the invocation without the time spent waiting for a core: the measure
    that a machine shared with other jobs leaves usable (caches are still shared). Interleaved
    rounds, alternating order, as :func:`benchmarks.latency.time_files`.
    """
    import numpy as np  # noqa: PLC0415

    from tfdq.export.runtime import LiteRTRunner  # noqa: PLC0415

    rng = np.random.default_rng(1)
    interps = {}
    for name, tflite in files.items():
        runner = LiteRTRunner(tflite, 1)
        shape = runner.interpreter.get_input_details()[0]["shape"]
        runner(rng.uniform(size=[1, *shape[1:]]).astype("float32"))
        for _ in range(warmup):
            runner.interpreter.invoke()
        interps[name] = runner.interpreter
    samples = {name: [] for name in interps}
    for r in range(rounds):
        names = list(interps)[:: -1 if r % 2 else 1]
        for name in names:
            interp = interps[name]
            for _ in range(invokes):
                t0 = time.thread_time()
                interp.invoke()
                samples[name].append(time.thread_time() - t0)
    return {
        name: {
            "median_cpu_ms": 1000 * float(np.median(v)),
            "p10_cpu_ms": 1000 * float(np.percentile(v, 10)),
            "p90_cpu_ms": 1000 * float(np.percentile(v, 90)),
            "samples": len(v),
        }
        for name, v in samples.items()
    }


def build_files(name, size, tfmot=True, kinds=KINDS, clamp_forms=False):
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
    builds = [(k, {"tfdq_int8": "int8", "tfdq_mixed": "smallest"}[k], False) for k in kinds]
    if clamp_forms:
        builds.append(("tfdq_int8_minimum", "int8", True))
    for kind, storage, minimum in builds:
        kwargs = {
            "input_type": "float32",
            "output_type": "float32",
            "storage": storage,
            "return_report": True,
        }
        if minimum:
            with _with_minimum_clamps():
                tflite, export_report = tfdq.export.to_tflite(q, x, **kwargs)
        else:
            tflite, export_report = tfdq.export.to_tflite(q, x, **kwargs)
        files[kind] = tflite
        stored = [k["storage"] for k in export_report["kernels"]]
        info[kind] = {
            "storage": storage,
            "kernels_int4": stored.count("int4"),
            "kernels_int8": stored.count("int8"),
            "calibrated_tensors": len(export_report["calibrated"]),
            "clamps": {
                form: sum(c["form"] == form for c in export_report.get("clamps", []))
                for form in ("QUANTIZE", "QUANTIZE x2", "kept")
            },
        }
        print(f"{name}: {kind} exported ({len(tflite)} bytes)", flush=True)
    if tfmot:
        tflite, tfmot_info = _tfmot_file(name, size)
        info["tfmot"] = tfmot_info
        if tflite is not None:
            files["tfmot_int8"] = tflite
    info["build_seconds"] = time.time() - start
    return files, info


def run(models=MODELS, size=224, rounds=10, invokes=20, tfmot=True, kinds=KINDS, clamp_forms=False):
    """Build and time every network's files; returns the JSON-ready result."""
    out = {
        "config": {
            "size": size,
            "rounds": rounds,
            "invokes": invokes,
            "threads": [1, 2],
            "batch": 1,
            "kinds": list(kinds),
            "clamp_forms": clamp_forms,
        }
    }
    for name in models:
        files, info = build_files(name, size, tfmot, kinds, clamp_forms)
        load_before = os.getloadavg()
        latency = time_files(files, (1, 2), rounds, invokes, warmup=5)
        cpu = cpu_times(files, rounds, invokes)
        for k in files:
            latency[k]["1_thread_cpu"] = cpu[k]
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
                ratios[f"float32 / {k} CPU time, 1 thread"] = (
                    cpu["float32"]["median_cpu_ms"] / cpu[k]["median_cpu_ms"]
                )
                ratios[f"{k} / float32 file size"] = sizes[k] / sizes["float32"]
        outside = {k: outside_xnnpack(b) for k, b in files.items()}
        out[name] = {
            "file_bytes": sizes,
            "operators": {k: sum(describe_tflite(b)["ops"].values()) for k, b in files.items()},
            "outside_xnnpack": outside,
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
                f"{lat['1_thread']['median_ms']:8.2f} ms @1t {lat['2_threads']['median_ms']:8.2f} ms @2t"
                f" {cpu[k]['median_cpu_ms']:8.2f} CPU ms @1t"
                f"  outside XNNPACK: {outside[k] or 'none'}",
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
    result = run(
        FLAGS.models, FLAGS.size, FLAGS.rounds, FLAGS.invokes, FLAGS.tfmot, FLAGS.kinds, FLAGS.clamp_forms
    )
    write_result(
        FLAGS.out_dir,
        FLAGS.out_name,
        f"LiteRT batch-1 latency, file size and operators outside XNNPACK of keras.applications "
        f"{', '.join(FLAGS.models)} ({FLAGS.size}x{FLAGS.size}, untrained: timing and size only): "
        f"float32 and tfdq {', '.join(FLAGS.kinds)}"
        + (" and int8 with MINIMUM clamps" if FLAGS.clamp_forms else ""),
        "python -m benchmarks.mobile_latency " + " ".join(sys.argv[1:]),
        result,
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
