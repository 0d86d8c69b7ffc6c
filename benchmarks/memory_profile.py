"""Peak resident memory of each stage of the keras.applications fine-tune pipeline.

The stages of ``benchmarks.applications_sweep --finetune`` (float model on the
digits at the sweep's input size), one after the other in one process:
``build`` (float model, compiled), ``float_fit`` (``--float-steps`` training
steps), ``recalibrate`` (``tfdq.recalibrate_batchnorm``), ``quantize``
(``tfdq.quantize_model(model, calibration_data=x[:128])``: calibration,
BatchNorm re-estimation, cloning), ``quant_fit`` (``--quant-steps`` steps of
the quantized model), ``align_biases``, ``to_tflite`` and ``verify``.

For each stage: the process's resident memory (RSS) before and after it, the
highest RSS sampled during it (every 20 ms, by a background thread) and
``ru_maxrss`` (the process's peak so far) after it, all in MB. The sampled
per-stage peak shows a stage's own high-water mark even when an earlier stage
set the process peak.

    python -m benchmarks.memory_profile --model Xception
    python -m benchmarks.memory_profile --model Xception --eager 192 --out benchmarks/results/memory_xception_eager.json
    python -m benchmarks.memory_profile --model DenseNet121 --out benchmarks/results/memory_densenet121.json

``--eager N`` measures ``verify``'s Keras side alone: build, quantize, then the
quantized model on N images eagerly in chunks of 32 (what ``verify`` does now)
and in one call (what it did on each batch before).

Run it niced and alone on a shared machine (``--limit-mb`` stops it, with the
stages measured so far written out, when RSS passes that many MB).
"""

import argparse
import json
import os
import platform
import resource
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


class _Sampler(threading.Thread):
    """Samples this process's RSS every ``interval`` seconds; ``peak`` since the last ``reset``."""

    def __init__(self, interval=0.02, limit_mb=None):
        super().__init__(daemon=True)
        import psutil  # noqa: PLC0415

        self.proc = psutil.Process()
        self.interval = interval
        self.limit = None if limit_mb is None else limit_mb * 2**20
        self.peak = 0
        self.over = False
        self._stop = threading.Event()

    def rss(self):
        return self.proc.memory_info().rss

    def reset(self):
        self.peak = self.rss()

    def run(self):
        while not self._stop.is_set():
            r = self.rss()
            self.peak = max(self.peak, r)
            if self.limit is not None and r > self.limit and not self.over:
                self.over = True
                print(f"memory_profile: RSS {r / 2**20:.0f} MB passed the limit; stopping", flush=True)
                os.kill(os.getpid(), 2)  # KeyboardInterrupt in the main thread
            time.sleep(self.interval)

    def stop(self):
        self._stop.set()


def _mb(b):
    return round(b / 2**20, 1)


def profile(name, float_steps=4, quant_steps=4, n_calibration=128, n_verify=128, limit_mb=None, eager=0):
    import keras  # noqa: PLC0415

    import tfdq  # noqa: PLC0415
    from benchmarks.applications_sweep import MODELS, build, digits  # noqa: PLC0415

    sampler = _Sampler(limit_mb=limit_mb)
    sampler.start()
    rows = []
    state = {}

    def stage(label, fn):
        sampler.reset()
        before = sampler.rss()
        t0 = time.process_time()
        fn()
        after = sampler.rss()
        rows.append(
            {
                "stage": label,
                "rss_before_mb": _mb(before),
                "rss_after_mb": _mb(after),
                "stage_peak_mb": _mb(max(sampler.peak, after)),
                "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "cpu_s": round(time.process_time() - t0, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    keras.utils.set_random_seed(0)
    x, y = digits(MODELS[name][1])
    xt, yt = x[: 32 * max(float_steps, quant_steps, 1)], y[: 32 * max(float_steps, quant_steps, 1)]
    calib, xv, yv = x[:n_calibration], x[-n_verify:], y[-n_verify:]
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def do_build():
        state["model"] = build(name)
        state["model"].compile(keras.optimizers.Adam(1e-3), loss, metrics=["accuracy"])

    def do_float_fit():
        state["model"].fit(xt[: 32 * float_steps], yt[: 32 * float_steps], epochs=1, batch_size=32, verbose=0)

    def do_recalibrate():
        tfdq.recalibrate_batchnorm(state["model"], xt[:256], batch_size=128)

    def do_quantize():
        state["qmodel"] = tfdq.quantize_model(state["model"], calibration_data=calib, strict=True)

    def do_quant_fit():
        state["qmodel"].compile(keras.optimizers.Adam(5e-4), loss, metrics=["accuracy"])
        state["qmodel"].fit(
            xt[: 32 * quant_steps], yt[: 32 * quant_steps], epochs=1, batch_size=32, verbose=0
        )

    def do_align():
        tfdq.export.align_biases(state["qmodel"], calib)

    def do_export():
        state["tflite"], state["report"] = tfdq.export.to_tflite(state["qmodel"], calib, return_report=True)

    def do_verify():
        state["verify"] = tfdq.export.verify(
            state["qmodel"], state["tflite"], (xv, yv), export_report=state["report"]
        )

    def do_chunks():
        from tfdq.export.verify import keras_outputs  # noqa: PLC0415

        state["chunks"] = keras_outputs(state["qmodel"], x[:eager])

    def do_whole():
        whole = np.asarray(state["qmodel"](x[:eager], training=False), np.float64)
        state["equal"] = bool(np.array_equal(whole, state["chunks"]))

    if eager:  # verify's Keras side: chunks of 32 (now) against one eager call (before)
        stages = [
            ("build", do_build),
            ("quantize", do_quantize),
            (f"keras_outputs_{eager}_in_chunks_of_32", do_chunks),
            (f"one_eager_call_on_{eager}", do_whole),
        ]
    else:
        stages = [
            ("build", do_build),
            ("float_fit", do_float_fit),
            ("recalibrate", do_recalibrate),
            ("quantize", do_quantize),
            ("quant_fit", do_quant_fit),
            ("align_biases", do_align),
            ("to_tflite", do_export),
            ("verify", do_verify),
        ]
    error = None
    try:
        for label, fn in stages:
            stage(label, fn)
    except KeyboardInterrupt:
        error = f"stopped: RSS passed {limit_mb} MB"
    sampler.stop()
    if "equal" in state:
        rows.append({"chunked_outputs_equal_one_call": state["equal"]})
    return rows, error


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Xception", help="a benchmarks.applications_sweep model name")
    parser.add_argument("--float-steps", type=int, default=4)
    parser.add_argument("--quant-steps", type=int, default=4)
    parser.add_argument("--limit-mb", type=float, default=8000)
    parser.add_argument(
        "--eager",
        type=int,
        default=0,
        help="instead of the pipeline: build, quantize, then the quantized model on this many images "
        "eagerly in chunks of 32 (verify now) and in one call (verify before)",
    )
    parser.add_argument("--label", default="", help="a tag for the run (e.g. 'before', 'after')")
    parser.add_argument("--out", help="JSON file (default benchmarks/results/memory_<model>.json)")
    args = parser.parse_args(argv)
    rows, error = profile(
        args.model, args.float_steps, args.quant_steps, limit_mb=args.limit_mb, eager=args.eager
    )
    out = args.out or os.path.join(RESULTS, f"memory_{args.model.lower()}.json")
    import tensorflow as tf  # noqa: PLC0415

    result = {
        "command": "python -m benchmarks.memory_profile "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model,
        "label": args.label,
        "float_steps": args.float_steps,
        "quant_steps": args.quant_steps,
        "eager": args.eager,
        "stages": rows,
        "error": error,
        "tensorflow": tf.__version__,
        "python": platform.python_version(),
    }
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")
    return 0 if error is None else 1


if __name__ == "__main__":
    raise SystemExit(main())
