"""Training-step cost of QAT: tfmot's against tfdq's, on the paper's ResNet-20.

Times one ``train_on_batch`` step (batch 128, CIFAR-10 shapes, generated
inputs: a timing, not an accuracy) of four models in one process,
alternating them in rounds so that machine noise hits all alike:

* ``keras3_float``: ``tfdq.models.resnet20()`` in Keras 3;
* ``tfdq_u3``: its ``tfdq.quantize_model`` version (U3 weights and
  activations);
* ``tf_keras_float``: the same architecture in tf_keras
  (``benchmarks/tfkeras_models.py``), the same float weights;
* ``tfmot_qat``: tfmot's 8-bit ``quantize_model`` of that model.

All use SGD (lr 0.01, momentum 0.9) without XLA. Reported: median seconds
per step (wall clock, and the process's CPU time, which other users of a
shared machine disturb less) and the ratios tfmot QAT / tf_keras float and tfdq / Keras 3 float,
each measured in this run (``benchmarks/step_time.py`` measures tfdq / Keras
float with and without XLA on its own). Needs tf_keras and tfmot: when they
are not importable here the script re-runs itself with the ``.venv-peers``
interpreter (setup in ``benchmarks/tfkeras_models.py``), or, without it,
times the Keras 3 pair alone and records why. Writes
``results/qat_step_time.json``::

    python -m benchmarks.qat_step_time              # 7 rounds x 5 steps, about 2 minutes on 2 cores
    python -m benchmarks.qat_step_time --quick      # 2 rounds x 2 steps, batch 32
"""

import importlib.util
import os
import subprocess
import sys
import time

from absl import app, flags, logging

from benchmarks.common import RESULTS_DIR, write_run

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS_PYTHON = os.path.join(ROOT, ".venv-peers", "bin", "python")


def _define_flags():
    flags.DEFINE_integer("rounds", 7, "Rounds; each round times every model.")
    flags.DEFINE_integer("steps", 5, "Timed steps per model and round.")
    flags.DEFINE_integer("batch_size", 128, "Batch size (the paper's 128).")
    flags.DEFINE_bool("quick", False, "2 rounds x 2 steps, batch 32.")
    flags.DEFINE_bool("reexec", True, "Re-run in .venv-peers when tf_keras/tfmot are missing here.")
    flags.DEFINE_string("out_dir", RESULTS_DIR, "Output folder.")


def tfmot_available():
    return (
        importlib.util.find_spec("tf_keras") is not None
        and importlib.util.find_spec("tensorflow_model_optimization") is not None
    )


def measure(rounds=5, steps=5, batch_size=128, with_tfmot=True):
    """Median seconds per step of each model, and the ratios."""
    import keras  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    import tfdq  # noqa: PLC0415

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(batch_size, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=batch_size)
    keras.utils.set_random_seed(0)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    float_model = tfdq.models.resnet20()
    q = tfdq.quantize_model(float_model, calibration_data=x[:32])
    models = {}
    f = keras.models.clone_model(float_model)
    f.set_weights(float_model.get_weights())
    f.compile(keras.optimizers.SGD(0.01, momentum=0.9), loss)
    q.compile(keras.optimizers.SGD(0.01, momentum=0.9), loss)
    models["keras3_float"] = f
    models["tfdq_u3"] = q
    if with_tfmot:
        import tempfile  # noqa: PLC0415

        from benchmarks import tfkeras_models as tkm  # noqa: PLC0415

        tfk = tkm._tfk()
        with tempfile.TemporaryDirectory() as tmp:
            weights = tkm.save_weights(float_model, os.path.join(tmp, "w.npz"))
            tf_float = tkm.load_weights(tkm.resnet20(), weights)
        tf_loss = tfk.losses.SparseCategoricalCrossentropy(from_logits=True)
        tf_float.compile(tfk.optimizers.SGD(0.01, momentum=0.9), tf_loss)
        tf_qat = tkm.tfmot_quantize(tf_float)
        tf_qat.compile(tfk.optimizers.SGD(0.01, momentum=0.9), tf_loss)
        models["tf_keras_float"] = tf_float
        models["tfmot_qat"] = tf_qat
    for model in models.values():  # trace and warm up
        model.train_on_batch(x, y)
        model.train_on_batch(x, y)
    times = {name: [] for name in models}
    cpu = {name: [] for name in models}
    for r in range(rounds):
        order = list(models) if r % 2 == 0 else list(models)[::-1]
        for name in order:
            model = models[name]
            for _ in range(steps):
                start, start_cpu = time.perf_counter(), time.process_time()
                model.train_on_batch(x, y)
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)

    def ratios_of(median):
        out = {"tfdq_u3 / keras3_float": median["tfdq_u3"] / median["keras3_float"]}
        if with_tfmot:
            out["tfmot_qat / tf_keras_float"] = median["tfmot_qat"] / median["tf_keras_float"]
            out["tfdq_u3 / tfmot_qat"] = median["tfdq_u3"] / median["tfmot_qat"]
            out["tf_keras_float / keras3_float"] = median["tf_keras_float"] / median["keras3_float"]
        return out

    median = {name: float(np.median(t)) for name, t in times.items()}
    median_cpu = {name: float(np.median(t)) for name, t in cpu.items()}
    return {
        "median_step_seconds": median,
        "ratios": ratios_of(median),
        "median_step_cpu_seconds": median_cpu,
        "cpu_ratios": ratios_of(median_cpu),
        "samples": {k: len(v) for k, v in times.items()},
        "round_medians_seconds": {
            k: [float(np.median(v[i * steps : (i + 1) * steps])) for i in range(rounds)]
            for k, v in times.items()
        },
        "all_step_seconds": {k: [float(v) for v in vals] for k, vals in times.items()},
    }


def main(argv):
    logging.set_verbosity(logging.WARNING)
    if (
        not tfmot_available()
        and FLAGS.reexec
        and os.path.exists(PEERS_PYTHON)
        and os.path.realpath(sys.prefix) != os.path.realpath(os.path.dirname(os.path.dirname(PEERS_PYTHON)))
    ):
        env = dict(os.environ, TF_USE_LEGACY_KERAS="1")
        cmd = [PEERS_PYTHON, "-m", "benchmarks.qat_step_time", *sys.argv[1:], "--noreexec"]
        print(f"tf_keras/tfmot not importable here; running {' '.join(cmd)}", flush=True)
        sys.exit(subprocess.run(cmd, cwd=ROOT, env=env).returncode)
    rounds, steps, batch = (2, 2, 32) if FLAGS.quick else (FLAGS.rounds, FLAGS.steps, FLAGS.batch_size)
    with_tfmot = tfmot_available()
    result = measure(rounds, steps, batch, with_tfmot)
    result["config"] = {
        "rounds": rounds,
        "steps": steps,
        "batch_size": batch,
        "xla": False,
        "optimizer": "SGD(0.01, momentum=0.9)",
    }
    if with_tfmot:
        from benchmarks.tfkeras_models import versions  # noqa: PLC0415

        result["versions"] = versions()
    else:
        result["tfmot_error"] = (
            "tf_keras / tensorflow_model_optimization not importable in "
            f"{sys.executable} and no .venv-peers (setup: benchmarks/tfkeras_models.py)"
        )
    for name, t in result["median_step_seconds"].items():
        print(
            f"{name:16s} {1000 * t:8.1f} ms/step wall, {1000 * result['median_step_cpu_seconds'][name]:8.1f} ms CPU"
        )
    for name, r in result["ratios"].items():
        print(f"{name:30s} {r:.2f}x wall, {result['cpu_ratios'][name]:.2f}x CPU time")
    write_run(
        FLAGS.out_dir,
        "qat_step_time",
        "ResNet-20 training step: tfmot 8-bit QAT / tf_keras float beside tfdq U3 / Keras 3 float",
        result,
        FLAGS.quick,
    )


if __name__ == "__main__":
    os.environ.setdefault(
        "TF_USE_LEGACY_KERAS", "1"
    )  # before TensorFlow: tfmot needs tf.keras to be tf_keras
    _define_flags()
    app.run(main)
