"""Training-step cost of learned quantization on the paper's ResNet-20.

Times one ``train_on_batch`` step (batch 128, CIFAR-10 shapes, generated
inputs: a timing, not an accuracy) of the float Keras ResNet-20 and of its
tfdq version with U3 weights and activations (with and without the guard
that skips non-finite steps, ``tfdq.nonfinite``; and under the paper's
memory budget, 70 kB of weights and 8 kB largest activation with automatic
multipliers: the budget's loss term, multiplier step, size logs and
gradient clip all in the step; that budgeted step with each residual
junction as separate ops, ``tfdq_u3_budget_unfused_junctions``, where tfdq
fuses the Add operand's quantizer, the Add, the ReLU and the block output's
quantizer into one op (``tfdq.kernels.fused_relu_quantize``); that budgeted
step with each BatchNorm's output pass and the quantizer after it as
separate ops, ``tfdq_u3_budget_unfused_batchnorm``, where tfdq fuses them
into one op (``tfdq.kernels.fused_affine_quantize``; on a residual branch
into the junction's op); and that budgeted step with the guard's
``tf.cond`` lowered into switch/merge ops, ``tfdq_u3_budget_lowered_guard``,
TensorFlow's default that tfdq turns off): with tfdq's fused quantizer
kernels (the default: the uniform quantizer's forward and backward pass are
one multi-threaded loop each, ``tfdq.kernels``), with the XLA-compiled
quantizer passes instead (``TFDQ_CUSTOM_KERNELS=0``), with plain TensorFlow
ops (``tfdq.config.settings(fused=False)``), and both models with XLA on the whole
step (``jit_compile``). The models
alternate in rounds so that machine noise hits all of them alike. Each step
records wall time and the process's CPU time (all threads; on a shared
machine the CPU time is the steadier measure of work). Reports medians and
the ratios tfdq / float measured in the same run; writes
``results/step_time.json``::

    python -m benchmarks.step_time              # 5 rounds x 5 steps
    python -m benchmarks.step_time --quick      # 2 rounds x 2 steps

The figure the target is read from (float, unbudgeted and budgeted tfdq, and
the budgeted step without the BatchNorm fusion; under 3 minutes on two
cores, 2 min 8 s at load 5)::

    python -m benchmarks.step_time --rounds=7 --steps=5 \
        --configs=float,tfdq_u3,tfdq_u3_budget,tfdq_u3_budget_unfused_batchnorm

Only the selected configurations are built (quantizing and tracing a model
takes seconds each).
"""

import os
import time

from absl import app, flags

from benchmarks.common import RESULTS_DIR, write_result

FLAGS = flags.FLAGS


def _define_flags():
    flags.DEFINE_integer("rounds", 5, "Rounds; each round times every configuration.")
    flags.DEFINE_integer("steps", 5, "Timed steps per configuration and round.")
    flags.DEFINE_integer("batch_size", 128, "Batch size (the paper's 128).")
    flags.DEFINE_bool("quick", False, "2 rounds x 2 steps, batch 32.")
    flags.DEFINE_list(
        "configs", [], "Only these configurations (default: all), e.g. float,tfdq_u3,tfdq_u3_budget."
    )
    flags.DEFINE_string("out_dir", RESULTS_DIR, "Output folder.")


def measure(rounds=5, steps=5, batch_size=128, only=None):
    """Median seconds per step for each configuration, and the ratios.

    ``only``: names of the configurations to run (default: all); the
    first call (tracing) is timed in wall and CPU seconds."""
    import keras  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    import tfdq  # noqa: PLC0415
    from tfdq import nonfinite  # noqa: PLC0415

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch_size, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=batch_size)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    float_model = tfdq.models.resnet20()
    configs = {}

    first_call, first_call_cpu = {}, {}

    def add(name, build, jit):
        """Build (only the selected configurations: quantizing a model takes seconds), compile, trace."""
        if only and name not in only:
            return
        model = build()
        model.compile(keras.optimizers.SGD(0.01, momentum=0.9), loss, jit_compile=jit)
        # as fit does before its first step (Keras' symbolic build): without it
        # the first train_on_batch creates the momentum slots inside the traced
        # step, and tf.function traces every model's step twice
        model.optimizer.build(model.trainable_variables)
        start, start_cpu = time.perf_counter(), time.process_time()
        model.train_on_batch(x, y)  # trace now: the fused/plain choice is made when tracing
        first_call[name] = time.perf_counter() - start
        first_call_cpu[name] = time.process_time() - start_cpu
        model.train_on_batch(x, y)
        configs[name] = model

    def float_copy():
        return keras.models.clone_model(float_model)

    def quantized():
        return tfdq.quantize_model(float_model, calibration_data=x[:32])

    def budgeted():
        """A fresh quantized ResNet-20 under the paper's budget (70 kB weights, 8 kB largest map)."""
        return tfdq.constrain(quantized(), weight_kb=70.0, activation_kb=8.0, activation="max")

    def add_with(name, build, module, attribute, value):
        """``add`` with a module switch set while the model is built and its step traced."""
        if only and name not in only:
            return
        before = getattr(module, attribute)
        setattr(module, attribute, value)
        try:
            add(name, build, False)
        finally:
            setattr(module, attribute, before)

    def add_in(name, build, **settings):
        """``add`` inside ``tfdq.config.settings(**settings)`` (building and tracing)."""
        if only and name not in only:
            return
        with tfdq.config.settings(**settings):
            add(name, build, False)

    add("float", float_copy, False)
    add("tfdq_u3", quantized, False)
    add("tfdq_u3_budget", budgeted, False)
    # the same budgeted step with the residual junctions as separate ops
    add_with("tfdq_u3_budget_unfused_junctions", budgeted, tfdq.kernels, "FUSE_JUNCTIONS", False)
    # ... and with each BatchNorm's output pass and the quantizer after it as separate ops
    add_with("tfdq_u3_budget_unfused_batchnorm", budgeted, tfdq.kernels, "FUSE_AFFINE", False)
    # the same budgeted step with the guard's tf.cond lowered into switch/merge
    # ops (TensorFlow's default inside a tf.function; tfdq keeps it an If op)
    add_with("tfdq_u3_budget_lowered_guard", budgeted, nonfinite, "LOWER_COND", True)
    # the same step without the non-finite-step guard
    add_in("tfdq_u3_unguarded", quantized, nonfinite_guard=False)
    add_in("tfdq_u3_xla_quantizers", quantized, custom_kernels=False)
    add_in("tfdq_u3_plain_ops", quantized, fused=False)
    add("float_xla", float_copy, True)
    add("tfdq_u3_xla", quantized, True)
    wall = {name: [] for name in configs}
    cpu = {name: [] for name in configs}
    for _ in range(rounds):
        for name, model in configs.items():
            for _ in range(steps):
                start, start_cpu = time.perf_counter(), time.process_time()
                model.train_on_batch(x, y)
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    median = {name: float(np.median(t)) for name, t in wall.items()}
    median_cpu = {name: float(np.median(t)) for name, t in cpu.items()}

    pairs = (
        ("tfdq_u3", "float"),
        ("tfdq_u3_budget", "float"),
        ("tfdq_u3_budget", "tfdq_u3"),
        ("tfdq_u3_budget_unfused_junctions", "float"),
        ("tfdq_u3_budget", "tfdq_u3_budget_unfused_junctions"),
        ("tfdq_u3_budget_unfused_batchnorm", "float"),
        ("tfdq_u3_budget", "tfdq_u3_budget_unfused_batchnorm"),
        ("tfdq_u3_budget", "tfdq_u3_budget_lowered_guard"),
        ("tfdq_u3", "tfdq_u3_unguarded"),
        ("tfdq_u3_xla_quantizers", "float"),
        ("tfdq_u3_plain_ops", "float"),
        ("tfdq_u3_xla", "float_xla"),
        ("tfdq_u3_xla", "float"),
    )

    def ratios(m):
        return {f"{a} / {b}": m[a] / m[b] for a, b in pairs if a in m and b in m}

    return {
        "median_step_seconds": median,
        "median_step_cpu_seconds": median_cpu,
        "ratios": ratios(median),
        "cpu_ratios": ratios(median_cpu),
        "first_call_seconds": first_call,
        "first_call_cpu_seconds": first_call_cpu,
        "load_average": list(os.getloadavg()),
        "target": {
            "tfdq_u3 / float": 1.10,
            "tfdq_u3_budget / float": 1.10,
            "tfdq_u3_budget first call": 15.0,
        },
        "custom_kernels": bool(tfdq.kernels.available()),
        "samples": {k: len(v) for k, v in wall.items()},
    }


def main(argv):
    del argv
    rounds, steps, batch = (2, 2, 32) if FLAGS.quick else (FLAGS.rounds, FLAGS.steps, FLAGS.batch_size)
    result = measure(rounds, steps, batch, only=FLAGS.configs or None)
    result["config"] = {"rounds": rounds, "steps": steps, "batch_size": batch}
    for name, t in result["median_step_seconds"].items():
        print(
            f"{name:18s} {1000 * t:8.1f} ms/step   cpu {1000 * result['median_step_cpu_seconds'][name]:8.1f} ms"
        )
    for name, t in result["first_call_seconds"].items():
        print(f"first call {name:18s} {t:6.1f} s   cpu {result['first_call_cpu_seconds'][name]:6.1f} s")
    for name, r in result["ratios"].items():
        print(f"{name:28s} wall {r:.2f}x   cpu {result['cpu_ratios'][name]:.2f}x")
    if not FLAGS.quick:
        write_result(
            FLAGS.out_dir,
            "step_time" if not FLAGS.configs else "step_time_selected",
            "ResNet-20 training step, U3 weights+activations vs Keras float",
            "python -m benchmarks.step_time"
            + (
                f" --rounds={rounds} --steps={steps} --configs={','.join(FLAGS.configs)}"
                if FLAGS.configs
                else ""
            ),
            result,
        )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
