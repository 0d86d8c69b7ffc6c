"""The first training step (tracing) of a quantized MobileNetV3Small beside the float model's.

Keras traces the training step on the first ``fit`` / ``train_on_batch``
call; on a large graph that first step takes minutes while later steps take
a fraction of a second (a user measured 236 s for the first epoch of a
quantized MobileNetV3Small against 4-5 s for later ones). This script times,
in one process and in alternating order per round, the first step and the
median of the next steps of four fresh models:

* ``float``: ``keras.applications.MobileNetV3Small`` (Keras as it is: the
  optimizer's variables are created inside the first trace, which then
  runs twice);
* ``float_prebuilt``: the same with ``optimizer.build`` called before the
  first step (what ``tfdq.QuantizedModel`` does);
* ``tfdq``: its ``tfdq.quantize_model`` version (U3 weights and
  activations) as tfdq trains it;
* ``tfdq_optimizer_in_trace``: the same with Keras' own
  ``make_train_function`` (the optimizer built inside the trace: tfdq
  before this change).

Adam, batch 32, 32x32x3 generated inputs (a timing, not an accuracy), no
XLA (Keras' default on CPU). Also times ``quantize_model`` itself. Writes
``results/first_step_time.json``::

    python -m benchmarks.first_step_time              # 2 rounds (about 30 min on 2 shared cores)
    python -m benchmarks.first_step_time --rounds=1
"""

import os
import time

import numpy as np
from absl import app, flags, logging

from benchmarks.common import RESULTS_DIR, write_result

FLAGS = flags.FLAGS


def _define_flags():
    flags.DEFINE_integer("rounds", 2, "Rounds; each round times a fresh model of every kind.")
    flags.DEFINE_integer("later_steps", 5, "Steps timed after the first (median reported).")
    flags.DEFINE_integer("batch_size", 32, "Batch size.")
    flags.DEFINE_integer("size", 32, "Input height and width.")
    flags.DEFINE_string("out_dir", RESULTS_DIR, "Output folder.")


def _timed(fn):
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - start_cpu


def measure(rounds=2, later_steps=5, batch_size=32, size=32):
    """Per kind: first-step seconds (wall and CPU) per round, median later step; quantize_model time."""
    import keras  # noqa: PLC0415

    import tfdq  # noqa: PLC0415

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch_size, size, size, 3)).astype("float32")
    y = rng.integers(0, 10, batch_size)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV3Small(
        weights=None, input_shape=(size, size, 3), classes=10, classifier_activation=None
    )
    weights = base.get_weights()

    def float_model():
        m = keras.models.clone_model(base)
        m.set_weights(weights)
        return m

    quantize_seconds = []

    def quantized():
        m = float_model()
        start = time.perf_counter()
        q = tfdq.quantize_model(m, calibration_data=x)
        quantize_seconds.append(time.perf_counter() - start)
        return q

    def build(kind):
        model = quantized() if kind.startswith("tfdq") else float_model()
        model.compile(keras.optimizers.Adam(1e-3), loss)
        if kind == "float_prebuilt":
            model.optimizer.build(model.trainable_variables)
        if kind == "tfdq_optimizer_in_trace":
            # Keras' own make_train_function: the optimizer is built inside the first trace
            model.make_train_function = lambda force=False: keras.Model.make_train_function(model, force)
        return model

    kinds = ["float", "float_prebuilt", "tfdq", "tfdq_optimizer_in_trace"]
    first = {k: [] for k in kinds}
    first_cpu = {k: [] for k in kinds}
    later = {k: [] for k in kinds}
    counts = {}
    for r in range(rounds):
        for kind in kinds if r % 2 == 0 else kinds[::-1]:
            model = build(kind)
            counts[kind] = {
                "trainable_variables": len(model.trainable_variables),
                "layers": len(model.layers),
            }
            wall, cpu = _timed(lambda m=model: m.train_on_batch(x, y))
            first[kind].append(wall)
            first_cpu[kind].append(cpu)
            for _ in range(later_steps):
                later[kind].append(_timed(lambda m=model: m.train_on_batch(x, y))[0])
            print(f"round {r} {kind:24s} first step {wall:7.1f} s wall, {cpu:7.1f} s CPU", flush=True)
            del model
            keras.backend.clear_session(free_memory=False)
    median_first = {k: float(np.median(v)) for k, v in first.items()}
    return {
        "first_step_seconds": {k: [float(t) for t in v] for k, v in first.items()},
        "first_step_cpu_seconds": {k: [float(t) for t in v] for k, v in first_cpu.items()},
        "median_first_step_seconds": median_first,
        "median_later_step_seconds": {k: float(np.median(v)) for k, v in later.items()},
        "ratios": {
            "tfdq / float": median_first["tfdq"] / median_first["float"],
            "tfdq / float_prebuilt": median_first["tfdq"] / median_first["float_prebuilt"],
            "tfdq_optimizer_in_trace / tfdq": median_first["tfdq_optimizer_in_trace"] / median_first["tfdq"],
        },
        "quantize_model_seconds": [float(t) for t in quantize_seconds],
        "models": counts,
        "load_average_at_end": list(os.getloadavg()),
    }


def main(argv):
    logging.set_verbosity(logging.WARNING)
    result = measure(FLAGS.rounds, FLAGS.later_steps, FLAGS.batch_size, FLAGS.size)
    result["config"] = {
        "rounds": FLAGS.rounds,
        "later_steps": FLAGS.later_steps,
        "batch_size": FLAGS.batch_size,
        "input": [FLAGS.size, FLAGS.size, 3],
        "optimizer": "Adam(1e-3)",
        "xla": False,
    }
    for k, t in result["median_first_step_seconds"].items():
        print(f"{k:24s} first step {t:7.1f} s, later steps {result['median_later_step_seconds'][k]:.3f} s")
    for k, v in result["ratios"].items():
        print(f"{k:34s} {v:.2f}x")
    write_result(
        FLAGS.out_dir,
        "first_step_time",
        "First training step (tracing) of MobileNetV3Small: float against tfdq, optimizer built before or "
        "inside the trace",
        "python -m benchmarks.first_step_time",
        result,
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
