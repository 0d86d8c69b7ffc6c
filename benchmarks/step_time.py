"""Training-step cost of learned quantization on the paper's ResNet-20.

Times one ``train_on_batch`` step (batch 128, CIFAR-10 shapes, generated
inputs: a timing, not an accuracy) of the float Keras ResNet-20 and of its
tfdq version with U3 weights and activations, with and without XLA
(``jit_compile``), alternating the models in rounds so that machine noise
hits all of them alike. Reports the median step time of each and the ratios
tfdq / float measured in the same run; writes ``results/step_time.json``::

    python -m benchmarks.step_time              # 5 rounds x 5 steps
    python -m benchmarks.step_time --quick      # 2 rounds x 2 steps
"""

import os
import time

from absl import app, flags

from benchmarks.results_io import write_result

FLAGS = flags.FLAGS


def _define_flags():
    flags.DEFINE_integer("rounds", 5, "Rounds; each round times every configuration.")
    flags.DEFINE_integer("steps", 5, "Timed steps per configuration and round.")
    flags.DEFINE_integer("batch_size", 128, "Batch size (the paper's 128).")
    flags.DEFINE_bool("quick", False, "2 rounds x 2 steps, batch 32.")
    flags.DEFINE_string("out_dir", os.path.join(os.path.dirname(__file__), "results"), "Output folder.")


def measure(rounds=5, steps=5, batch_size=128):
    """Median seconds per step for each configuration, and the ratios."""
    import keras  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    import tfdq  # noqa: PLC0415

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch_size, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=batch_size)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    float_model = tfdq.models.resnet20()
    configs = {}
    for jit in (False, True):
        f = keras.models.clone_model(float_model)
        f.compile(keras.optimizers.SGD(0.01, momentum=0.9), loss, jit_compile=jit)
        q = tfdq.quantize_model(float_model, calibration_data=x[:32])
        q.compile(keras.optimizers.SGD(0.01, momentum=0.9), loss, jit_compile=jit)
        configs[f"float{'_xla' if jit else ''}"] = f
        configs[f"tfdq_u3{'_xla' if jit else ''}"] = q
    times = {name: [] for name in configs}
    for model in configs.values():  # trace and warm up
        model.train_on_batch(x, y)
        model.train_on_batch(x, y)
    for _ in range(rounds):
        for name, model in configs.items():
            for _ in range(steps):
                start = time.perf_counter()
                model.train_on_batch(x, y)
                times[name].append(time.perf_counter() - start)
    median = {name: float(np.median(t)) for name, t in times.items()}
    ratios = {
        "tfdq_u3 / float": median["tfdq_u3"] / median["float"],
        "tfdq_u3_xla / float_xla": median["tfdq_u3_xla"] / median["float_xla"],
        "tfdq_u3_xla / float": median["tfdq_u3_xla"] / median["float"],
    }
    return {"median_step_seconds": median, "ratios": ratios, "samples": {k: len(v) for k, v in times.items()}}


def main(argv):
    del argv
    rounds, steps, batch = (2, 2, 32) if FLAGS.quick else (FLAGS.rounds, FLAGS.steps, FLAGS.batch_size)
    result = measure(rounds, steps, batch)
    result["config"] = {"rounds": rounds, "steps": steps, "batch_size": batch}
    for name, t in result["median_step_seconds"].items():
        print(f"{name:14s} {1000 * t:8.1f} ms/step")
    for name, r in result["ratios"].items():
        print(f"{name:26s} {r:.2f}x")
    if not FLAGS.quick:
        write_result(
            FLAGS.out_dir,
            "step_time",
            "ResNet-20 training step, U3 weights+activations vs Keras float",
            "python -m benchmarks.step_time",
            result,
        )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
