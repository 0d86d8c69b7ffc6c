"""The paper's four ResNet-20 / CIFAR-10 runs as ``tfdq-train`` commands.

:data:`RUNS` is the one table of this module: for each of the Table 3 rows
that the training script reproduces (the paper's Table 3, uniform column;
the schedule and the reference code's training details come from
``tfdq.train.config.RECIPES["cifar10"]``), the exact flag set and the validation
error the paper reports:

============  =========================================  ============
run           quantization                               paper error
============  =========================================  ============
float         none (32/32)                               7.29%
fixed24       fixed 2-bit weights / 4-bit activations    11.30%
tqt24         TQT (learned q_max) 2 / 4 bits             9.62%
learned8a8c   learned U3, 70.1 kB weights (8a),          8.58%
              8.1 kB largest activation (8c)
============  =========================================  ============

The three quantized runs fine-tune the float run's ``float/best.keras``
(``--init_checkpoint``; its best epoch, as the reference code's
``params_best.h5``) with ``--stages=quant,export``. The budgets are the
reference code's ``target_weight_kbytes = 70.1`` and
``target_activation_kbytes = 8.1`` (a little above 70 and 8 kB, so that a
size equal to the target is never lost to rounding). CIFAR-10 itself
cannot be fetched on this machine, so the module never trains on it; it has
three modes:

* ``--print_commands``: the four shell commands (what the docs show);
* ``--mock``: every run for a few steps, end to end, on
  ``tfds.testing.mock_data`` (random images with CIFAR-10's feature specs),
  in temporary folders: which stages finished, the summary numbers (of
  generated data: they say that the pipeline works, nothing about accuracy),
  the per-layer bitwidths and budgets of the quantized model, and whether
  the export wrote a ``.tflite``;
* ``--time``: the cost of one CIFAR-10 epoch of each run on this machine
  (batch 128, 391 steps, CIFAR-shaped generated inputs; 50,000 training and
  10,000 held-out examples, PNG-decoded per read as tfds reads CIFAR-10):
  each training stage runs ``--steps`` steps with a callback that times
  every step (wall and CPU seconds). The mean of steps 2.. is the cost of a
  step; the stage's own ``seconds`` (``result.json`` of the stage, written
  by ``tfdq/train/train.py``) minus those steps is its fixed cost (building,
  tracing, saving); the step whose batch starts the second pass over the
  50,000 examples (step 391) minus the median step is the pass-boundary
  stall. The held-out pass over 10,000 examples that ends every epoch is
  timed separately (a timer around ``tfdq.train.train.evaluate``). From these:
  the one-epoch time (measured where ``--steps`` is 391, else extrapolated
  and labelled so) and the paper's full schedule (160 epochs each) in hours.
  ``--before`` also times the float run with the input pipeline as it was
  before issue 16 (no cache: every pass decodes every image again).

Results (both modes) go to ``results/cifar10_recipes.json`` and the chart of
the epoch times to ``results/cifar10_recipes.png``::

    python -m benchmarks.cifar10_recipes --print_commands
    python -m benchmarks.cifar10_recipes --mock --time     # --steps=391 (a full epoch)
    python -m benchmarks.cifar10_recipes --time --before   # and the float run on the old pipeline
    python -m benchmarks.cifar10_recipes --quick           # smoke run of both modes (to a temp folder)

``--mock`` and ``--time`` may run in separate invocations: each replaces its
own section of the JSON (with its command and date) and keeps the other.
"""

import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import tempfile
import time

from absl import app, flags

from benchmarks import common

FLAGS = flags.FLAGS
NAME = "cifar10_recipes"
RESULTS_DIR = common.RESULTS_DIR

FLOAT_DIR = "runs/r20_float"
FLOAT_CHECKPOINT = f"{FLOAT_DIR}/float/best.keras"
_COMMON = {"dataset": "cifar10", "model": "resnet20"}
_QUANT = dict(_COMMON, stages="quant,export", init_checkpoint=FLOAT_CHECKPOINT)


def _baseline(kind, label, paper_error):
    """A fixed-bitwidth row of Table 3: 2-bit weights, 4-bit activations, no
    budget; ``kind`` "fixed" (q_max fixed) or "tqt" (q_max learned)."""
    return {
        "name": f"{kind}24",
        "label": label,
        "paper_error": paper_error,
        "flags": dict(
            _QUANT,
            weight_quantizer=kind,
            activation_quantizer=kind,
            weight_bits=2,
            activation_bits=4,
            target_weight_kb=0.0,
            target_activation_kb=0.0,
            model_dir=f"runs/r20_{kind}24",
        ),
    }


# The paper's runs (Table 3, uniform column). Every other option (SGD 0.9,
# weight decay 2e-4 on every trainable variable, batch 128, 160 + 160 epochs,
# lr 0.1 / 0.01, lr / 10 at 50% and 75% of a stage, lambda 0.1, BatchNorm
# 0.9 / 1e-5, [-1, 1] inputs, the image not quantized, activation quantizers
# from d = 2^-3, the best epoch kept) is the cifar10 recipe of train/config.py.
RUNS = (
    {
        "name": "float",
        "label": "float 32/32",
        "paper_error": 7.29,
        "flags": dict(_COMMON, stages="float", model_dir=FLOAT_DIR),
    },
    _baseline("fixed", "fixed 2/4", 11.30),
    _baseline("tqt", "TQT 2/4", 9.62),
    {
        "name": "learned8a8c",
        "label": "learned (8a)+(8c)",
        "paper_error": 8.58,
        "flags": dict(
            _QUANT,
            weight_quantizer="U3",
            activation_quantizer="U3",
            target_weight_kb=70.1,
            target_activation_kb=8.1,
            activation_constraint="max",
            model_dir="runs/r20_8a8c",
        ),
    },
)
PAPER_EPOCHS = {"float": 160, "quant": 160}  # the paper's schedule
CIFAR10_TRAIN, CIFAR10_TEST = 50_000, 10_000
EPOCH_STEPS = -(-CIFAR10_TRAIN // 128)  # 391 steps of batch 128

MOCK = {"steps": 3, "batch_size": 8, "num_examples": 48, "epochs": 1}
TIME = {"steps": EPOCH_STEPS, "batch_size": 128}
QUICK = {
    "mock": {"steps": 1, "batch_size": 4, "num_examples": 12, "epochs": 1},
    # the cheapest quantized run (fixed 2/4) stands for the three in the smoke timing
    "time": {
        "steps": 5,  # a pass of 16 examples is 4 batches of 4: step 5 starts the second pass
        "batch_size": 4,
        "n_train": 16,
        "n_val": 8,
        "runs": ("float", "fixed24"),
        "before": True,
    },
}


def run_by_name(name):
    for run in RUNS:
        if run["name"] == name:
            return run
    raise KeyError(name)


def stage_names(run):
    return [s for s in run["flags"]["stages"].split(",") if s]


# -- commands -----------------------------------------------------------------------


def _flag(name, value):
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no{name}"
    if isinstance(value, float):
        value = f"{value:g}"
    return f"--{name}={shlex.quote(str(value))}"


def command(run, **overrides):
    """The shell command of ``run`` (flags of the table, then ``overrides``)."""
    values = dict(run["flags"], **overrides)
    return " ".join(["tfdq-train"] + [_flag(k, v) for k, v in values.items()])


def commands_text():
    """The four commands with their paper errors, as the docs show them."""
    lines = []
    for run in RUNS:
        lines.append(f"# {run['label']} (paper: {run['paper_error']:.2f}% validation error)")
        lines.append(command(run))
    return "\n".join(lines)


# -- running the training script in-process -------------------------------------------


def _train(values, echo, callbacks=()):
    """``tfdq.train.train.run(values)``: (summary, wall seconds, CPU seconds of this process)."""
    import keras  # noqa: PLC0415

    from tfdq.train import train as train_lib  # noqa: PLC0415

    def print_fn(*args):
        if echo:
            print(" ".join(str(a) for a in args), flush=True)

    keras.backend.clear_session()  # each run traces its own graphs; drop the previous run's
    start, cpu = time.perf_counter(), time.process_time()
    summary = train_lib.run(values, print_fn=print_fn, callbacks=callbacks)
    return summary, time.perf_counter() - start, time.process_time() - cpu


def _read_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def quantized_model_facts(path):
    """Per-layer bitwidths and the memory budget recorded in a saved tfdq model."""
    import keras  # noqa: PLC0415

    import tfdq  # noqa: PLC0415

    model = keras.models.load_model(path, compile=False)
    rows = tfdq.summary(model, print_fn=None)
    layers, total = rows[:-1], rows[-1]
    acts = [r for r in layers if r["kind"] == "activation"]
    budget = getattr(model, "memory_budget", None)
    return {
        "weight_bits": {r["name"]: float(r["bits"]) for r in layers if r["kind"] == "weight"},
        "activation_bits": {r["name"]: float(r["bits"]) for r in acts if not r["input"]},
        "input_bits": {r["name"]: float(r["bits"]) for r in acts if r["input"]},
        "weight_quantizers": sorted({str(r["quantizer"]) for r in layers if r["kind"] == "weight"}),
        "activation_quantizers": sorted({str(r["quantizer"]) for r in acts}),
        "weight_count": int(total["weight_count"]),
        "weight_kb": float(total["weight_kb"]),
        "activation_kb_sum": float(total["activation_kb_sum"]),
        "activation_kb_max": float(total["activation_kb_max"]),
        "budget": None
        if budget is None
        else {
            "weight_kb": budget.weight_kb,
            "activation_kb": budget.activation_kb,
            "activation": budget.activation,
            "weight_lambda": float(budget.weight_lambda),
            "activation_lambda": float(budget.activation_lambda),
        },
    }


SUMMARY_KEYS = (
    "float_accuracy",
    "quant_accuracy",
    "tflite_accuracy",
    "weight_kb",
    "float_weight_kb",
    "activation_kb_sum",
    "activation_kb_max",
    "mean_weight_bits",
    "mean_activation_bits",
    "constraints_met",
    "target_weight_kb",
    "target_activation_kb",
    "activation_constraint",
    "tflite_kb",
    "export_note",
    "val_examples",
    "times",
    "selection",
    "paper_rule",
    "float_accuracy_best",
    "float_accuracy_final",
    "quant_accuracy_best",
    "quant_accuracy_final",
    "quant_final_feasible",
)


def mock(steps=3, batch_size=8, num_examples=48, epochs=1, echo=False, work_dir=None):
    """Each run of :data:`RUNS` for ``steps`` steps on ``tfds.testing.mock_data``.

    The float run (``--stages=float``) comes first; the quantized runs start
    from its ``float/best.keras``. Returns one record per run.
    """
    import tensorflow_datasets as tfds  # noqa: PLC0415

    own = work_dir is None
    work_dir = work_dir or tempfile.mkdtemp(prefix="cifar10_recipes_mock_")
    small = {
        "batch_size": batch_size,
        "steps_per_epoch": steps,
        "float_epochs": epochs,
        "quant_epochs": epochs,
        "val_examples": num_examples,
        "calibration_examples": min(num_examples, 32),
        "export_examples": min(num_examples, 16),
        "verbose": 0,
        "data_dir": os.path.join(work_dir, "tfds"),
    }
    records = []
    float_ckpt = os.path.join(work_dir, "float", "float", "best.keras")
    try:
        with tfds.testing.mock_data(num_examples=num_examples):
            for run in RUNS:
                model_dir = os.path.join(work_dir, run["name"])
                paths = {"model_dir": model_dir}
                if "init_checkpoint" in run["flags"]:
                    paths["init_checkpoint"] = float_ckpt
                values = dict(run["flags"], **paths, **small)
                record = {
                    "name": run["name"],
                    "label": run["label"],
                    "stages": stage_names(run),
                    "command": command(run, **paths, **{k: v for k, v in small.items() if k != "data_dir"}),
                }
                try:
                    summary, seconds, cpu = _train(values, echo)
                except Exception as e:  # noqa: BLE001 (record the failure, go on with the next run)
                    record["failed"] = f"{type(e).__name__}: {e}"
                    records.append(record)
                    continue
                record["wall_seconds"] = seconds
                record["cpu_seconds"] = cpu
                record["finished_stages"] = [
                    s for s in record["stages"] if os.path.exists(os.path.join(model_dir, s, "result.json"))
                ]
                record["flags_json"] = _read_json(os.path.join(model_dir, "flags.json"))
                record["mock_data_numbers"] = {k: summary.get(k) for k in SUMMARY_KEYS if k in summary}
                if summary.get("quant_checkpoint"):
                    record["quantized_model"] = quantized_model_facts(summary["quant_checkpoint"])
                if "export" in record["stages"]:
                    tflite = os.path.join(model_dir, "export", "model.tflite")
                    record["tflite_written"] = os.path.exists(tflite) and os.path.getsize(tflite) > 0
                    record["tflite_bytes"] = os.path.getsize(tflite) if os.path.exists(tflite) else 0
                    export = _read_json(os.path.join(model_dir, "export", "result.json")) or {}
                    record["export_seconds"] = export.get("seconds")
                    record["export_error"] = summary.get("export_note")
                    # LiteRT against Keras on the same mock examples (tfdq.export.verify)
                    record["export_check"] = {
                        k: export.get(k)
                        for k in ("top1_agreement", "all_kernels_exact", "keras_accuracy", "tflite_accuracy")
                    }
                records.append(record)
    finally:
        if own:
            shutil.rmtree(work_dir, ignore_errors=True)
    return {
        "data": "tfds.testing.mock_data: generated random images with CIFAR-10's feature specs. "
        "Every accuracy and size here is of generated data after a few steps: a check that the "
        "pipeline runs, never a CIFAR-10 result.",
        "settings": {
            "steps_per_epoch": steps,
            "batch_size": batch_size,
            "num_examples": num_examples,
            "epochs": epochs,
        },
        "runs": records,
    }


# -- timing -------------------------------------------------------------------------

PNG_POOL = 1024  # distinct PNG-encoded images the timing mock cycles through


@contextlib.contextmanager
def cifar_shaped_mock(n_train=CIFAR10_TRAIN, n_val=CIFAR10_TEST, pool=PNG_POOL):
    """``tfds.testing.mock_data`` with CIFAR-10's split sizes, read as tfds reads CIFAR-10.

    tensorflow-datasets stores CIFAR-10's images as PNGs and decodes them on
    every read; so does this mock: ``pool`` random 32x32 images are
    PNG-encoded once and served in turn, each decoded by
    ``tf.io.decode_png`` inside the ``tf.data`` graph (the default mock
    builds every example in Python instead, about 0.3 ms each under the GIL,
    a cost the real pipeline does not have). The timing then sees what the
    training script's own pipeline does with the data (decode, or cache;
    shuffle, pad-crop-flip, normalization, batching), and the model.
    """
    import numpy as np  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415
    import tensorflow_datasets as tfds  # noqa: PLC0415

    rng = np.random.default_rng(0)
    pngs = tf.constant(
        [tf.io.encode_png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).numpy() for _ in range(pool)]
    )

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False, **kwargs):
        del self, decoders, read_config, shuffle_files, kwargs
        test = "test" in str(split)
        n = n_val if test else n_train
        salt = tf.constant(1 if test else 0, tf.int64)

        def example(i):
            image = tf.io.decode_png(pngs[(i + salt * 7) % pool], channels=3)
            label = tf.random.stateless_uniform([], tf.stack([i, salt]), minval=0, maxval=10, dtype=tf.int64)
            return {"image": tf.ensure_shape(image, (32, 32, 3)), "label": label}

        ds = tf.data.Dataset.range(n).map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.apply(tf.data.experimental.assert_cardinality(n))

    with tfds.testing.mock_data(num_examples=n_train, as_dataset_fn=as_dataset):
        yield


def step_timer():
    """A Keras callback recording each training step's wall and CPU seconds
    (from ``on_train_batch_begin`` to ``on_train_batch_end``: the step's
    wait for its batch, the step itself and the other callbacks' batch work)."""
    import keras  # noqa: PLC0415

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.wall, self.cpu = [], []
            self._start = None

        def on_train_batch_begin(self, batch, logs=None):
            self._start = (time.perf_counter(), time.process_time())

        def on_train_batch_end(self, batch, logs=None):
            wall, cpu = self._start
            self.wall.append(time.perf_counter() - wall)
            self.cpu.append(time.process_time() - cpu)

    return StepTimer()


def pass_boundary_steps(steps, batch_size, n_train):
    """Indices (0-based) of the steps whose batch holds the first example of a
    new pass over the ``n_train`` training examples (the stream is batched
    across passes: batch 390 of 128 holds CIFAR-10's last 80 examples of a
    pass and the first 48 of the next)."""
    return [
        k for k in range(1, steps) if ((k + 1) * batch_size - 1) // n_train > (k * batch_size - 1) // n_train
    ]


def step_statistics(wall, cpu, stage_seconds, boundary_steps):
    """Per-step cost, fixed cost and pass-boundary stall from one stage's step times.

    ``wall``/``cpu``: seconds of each step (:func:`step_timer`), all from the
    same run, so nothing is subtracted across runs (the earlier method took
    the difference of two runs' stage times, which went negative when the
    machine's load changed between them). The first step (tracing) is left
    out of the per-step figures and counted in the fixed cost.
    """
    import numpy as np  # noqa: PLC0415

    wall, cpu = np.asarray(wall, float), np.asarray(cpu, float)
    if len(wall) < 2:
        raise ValueError(f"need at least 2 timed steps, got {len(wall)}")
    steady = wall[1:]
    per_step = float(np.mean(steady))
    median = float(np.median(steady))
    stalls = {int(k): float(wall[k] - median) for k in boundary_steps if 0 < k < len(wall)}
    # the same in this process's CPU seconds: the work done in the step (a stall decoding the
    # next pass shows in both; a step slowed by other jobs on the machine only in the wall time)
    cpu_median = float(np.median(cpu[1:]))
    cpu_stalls = {k: float(cpu[k] - cpu_median) for k in stalls}
    others = np.delete(wall, [0, *stalls])
    return {
        "seconds_per_step": per_step,  # mean of steps 2.. (what an epoch costs per step)
        "median_seconds_per_step": median,
        "cpu_seconds_per_step": float(np.mean(cpu[1:])),
        "median_cpu_seconds_per_step": float(np.median(cpu[1:])),
        "first_step_seconds": float(wall[0]),
        # the stage's time outside the steps 2.. (build or load + quantize, compile, the first
        # step's tracing, checkpoints and saves)
        "fixed_seconds": float(stage_seconds - np.sum(steady)),
        "pass_boundary_steps": sorted(stalls),
        "pass_boundary_stall_seconds": stalls,
        "max_stall_seconds": max(stalls.values()) if stalls else None,
        "pass_boundary_stall_cpu_seconds": cpu_stalls,
        "slowest_other_step_seconds": float(np.max(others)) if len(others) else None,
    }


def _stage_seconds(model_dir, stage):
    result = _read_json(os.path.join(model_dir, stage, "result.json"))
    if result is None or "seconds" not in result:
        raise RuntimeError(f"{model_dir}: stage {stage} wrote no result.json with seconds")
    return float(result["seconds"])


def _validation_seconds(model_path, batch_size, n_val, data_dir):
    """Seconds of one held-out pass over ``n_val`` examples (after a traced warm-up pass)."""
    import keras  # noqa: PLC0415

    import tfdq  # noqa: PLC0415, F401  (registers the quantized layers for load_model)

    del tfdq
    from tfdq.train import data as data_lib  # noqa: PLC0415
    from tfdq.train import train as train_lib  # noqa: PLC0415

    data = data_lib.load("cifar10", batch_size, data_dir=data_dir, val_examples=n_val, calibration_examples=8)
    model = keras.models.load_model(model_path, compile=False)
    train_lib.evaluate(model, data.val.take(2))  # trace
    start = time.perf_counter()
    train_lib.evaluate(model, data.val)
    return time.perf_counter() - start


BEFORE = "35370b7"  # main before issue 16 (the pipeline that re-decoded CIFAR-10 every pass)


@contextlib.contextmanager
def pipeline_before(base=BEFORE):
    """The training script reading through ``train/data.py`` as it was at
    commit ``base`` (no cache: every pass decodes every image again)."""
    from unittest import mock as mock_lib  # noqa: PLC0415

    from benchmarks import input_pipelines  # noqa: PLC0415
    from tfdq.train import data as data_lib  # noqa: PLC0415

    old = input_pipelines.old_data_module(base)

    def load(name, batch_size, *, input_range="normalized", **kwargs):
        d = old.load(name, batch_size, **kwargs)
        fields = {f.name: getattr(d, f.name) for f in dataclasses.fields(d)}
        return data_lib.Data(**fields, input_range=input_range)

    with mock_lib.patch.object(data_lib, "load", load):
        yield


def timing(
    steps=EPOCH_STEPS,
    batch_size=128,
    n_train=CIFAR10_TRAIN,
    n_val=CIFAR10_TEST,
    runs=None,
    before=False,
    echo=False,
    work_dir=None,
):
    """Per-step and fixed cost of each run's training stage, its pass-boundary
    stall; one-epoch and full-schedule estimates.

    Each run's training stage runs ``steps`` steps (391: one CIFAR-10 epoch,
    crossing one pass boundary) with :func:`step_timer`. ``runs``: names of
    :data:`RUNS` to time (default all; a quantized run needs the float run,
    which is then timed as well). ``before``: also time the float run with
    the pipeline of commit :data:`BEFORE` (the stall before issue 16).
    """
    if steps < 2:
        raise ValueError(f"need at least 2 steps, got {steps}")
    names = [r["name"] for r in RUNS if runs is None or r["name"] in runs or r["name"] == "float"]
    jobs = [(name, "now") for name in names]
    if before:
        jobs.insert(0, ("float", "before"))
    own = work_dir is None
    work_dir = work_dir or tempfile.mkdtemp(prefix="cifar10_recipes_time_")
    data_dir = os.path.join(work_dir, "tfds")
    base = {
        "batch_size": batch_size,
        "float_epochs": 1,
        "quant_epochs": 1,
        "val_examples": batch_size,
        "verbose": 2 if echo else 0,
        "data_dir": data_dir,
    }
    boundaries = pass_boundary_steps(steps, batch_size, n_train)
    records = []
    float_ckpt = None
    try:
        with cifar_shaped_mock(n_train, n_val):
            for name, pipeline in jobs:
                run = run_by_name(name)
                stage = "float" if run["flags"]["stages"] == "float" else "quant"
                model_dir = os.path.join(work_dir, f"{name}_{pipeline}")
                over = {"model_dir": model_dir, "steps_per_epoch": steps, "stages": stage}
                if stage == "quant":
                    over["init_checkpoint"] = float_ckpt
                timer = step_timer()
                with pipeline_before() if pipeline == "before" else contextlib.nullcontext():
                    _, wall, cpu = _train(dict(run["flags"], **base, **over), echo, callbacks=[timer])
                if len(timer.wall) != steps:
                    raise RuntimeError(f"{name}: timed {len(timer.wall)} steps, expected {steps}")
                stage_s = _stage_seconds(model_dir, stage)
                record = {
                    "name": name,
                    "label": run["label"],
                    "stage": stage,
                    "pipeline": pipeline,
                    "steps": steps,
                    "stage_seconds": stage_s,
                    "run_wall_seconds": wall,
                    "run_cpu_seconds": cpu,
                    "command": command(run, **over, **{k: v for k, v in base.items() if k != "data_dir"}),
                    "step_wall_seconds": [round(t, 5) for t in timer.wall],
                    "step_cpu_seconds": [round(t, 5) for t in timer.cpu],
                }
                record.update(step_statistics(timer.wall, timer.cpu, stage_s, boundaries))
                final = os.path.join(model_dir, stage, "final.keras")
                if stage == "float" and pipeline == "now":
                    float_ckpt = final
                per_step, fixed = record["seconds_per_step"], record["fixed_seconds"]
                val = _validation_seconds(final, batch_size, n_val, data_dir)
                epochs = PAPER_EPOCHS[stage]
                measured = steps == EPOCH_STEPS
                record.update(
                    validation_seconds_per_epoch=val,
                    epoch_train_seconds=EPOCH_STEPS * per_step,
                    # one epoch of the paper's schedule: the stage (fixed cost included) + a held-out pass
                    epoch_seconds=(stage_s if measured else fixed + EPOCH_STEPS * per_step) + val,
                    epoch_seconds_kind="measured" if measured else f"extrapolated from {steps} steps",
                    paper_epochs=epochs,
                    full_schedule_hours=(fixed + epochs * (EPOCH_STEPS * per_step + val)) / 3600.0,
                )
                if echo:
                    stall = record["max_stall_seconds"]
                    print(
                        f"[time] {name} ({pipeline} pipeline): {per_step:.3f} s/step (median "
                        f"{record['median_seconds_per_step']:.3f}), {record['cpu_seconds_per_step']:.3f} CPU "
                        f"s/step, fixed {fixed:.1f} s, pass-boundary stall "
                        + ("-" if stall is None else f"{stall:.2f} s")
                        + f", validation {val:.1f} s, epoch {record['epoch_seconds']:.0f} s "
                        f"({record['epoch_seconds_kind']}), {epochs} epochs {record['full_schedule_hours']:.1f} h",
                        flush=True,
                    )
                records.append(record)
    finally:
        if own:
            shutil.rmtree(work_dir, ignore_errors=True)
    now = [r for r in records if r["pipeline"] == "now"]
    float_now = now[0]
    for r in now:
        r["step_over_float"] = r["seconds_per_step"] / float_now["seconds_per_step"]
        r["cpu_step_over_float"] = r["cpu_seconds_per_step"] / float_now["cpu_seconds_per_step"]
    return {
        "data": f"tfds.testing.mock_data serving {PNG_POOL} random PNG-encoded 32x32 images in turn, decoded per "
        f"read as tfds reads CIFAR-10: {n_train} training and {n_val} held-out examples (a timing; no "
        "accuracy is meaningful)",
        "method": (
            f"Each run's training stage (float: --stages=float; quantized: --stages=quant from this benchmark's "
            f"float run's final.keras) runs one epoch of --steps_per_epoch={steps}, batch {batch_size}, one "
            "held-out batch per epoch, in a fresh model_dir, with a callback timing every step (wall and process "
            "CPU seconds from on_train_batch_begin to on_train_batch_end). seconds_per_step: mean of steps 2.. "
            "(step 1 traces); fixed_seconds: the stage's own 'seconds' (<model_dir>/<stage>/result.json) minus "
            "steps 2..; pass_boundary_stall_seconds: the step whose batch starts a new pass over the training set "
            f"minus the median step (steps {boundaries}). validation_seconds_per_epoch: a timer around "
            f"tfdq.train.train.evaluate over {n_val} held-out examples (after a warm-up). epoch_seconds: the stage "
            f"+ validation when {steps} = {EPOCH_STEPS} (measured), else fixed + {EPOCH_STEPS} x seconds_per_step "
            f"+ validation (extrapolated). full_schedule_hours: fixed once + paper_epochs x ({EPOCH_STEPS} x "
            "seconds_per_step + validation). pipeline 'before': the float run reading through train/data.py "
            f"of commit {BEFORE} (no cache)."
        ),
        "settings": {
            "steps": steps,
            "batch_size": batch_size,
            "n_train": n_train,
            "n_val": n_val,
            "epoch_steps": EPOCH_STEPS,
            "pass_boundary_steps": boundaries,
        },
        "runs": now,
        "before": [r for r in records if r["pipeline"] == "before"],
        "total_full_schedule_hours": sum(r["full_schedule_hours"] for r in now),
    }


# -- outputs ------------------------------------------------------------------------


def plot(timing_result, path):
    """Bar chart of one epoch per run: training steps, validation, fixed cost."""
    plt = common.pyplot()
    runs = timing_result["runs"]
    labels = [r["label"] for r in runs]
    train_s = [r["epoch_train_seconds"] for r in runs]
    val_s = [r["validation_seconds_per_epoch"] for r in runs]
    fixed_s = [max(0.0, r["fixed_seconds"]) for r in runs]
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    x = range(len(runs))
    ax.bar(x, train_s, color="tab:blue", label=f"{timing_result['settings']['epoch_steps']} training steps")
    ax.bar(
        x,
        val_s,
        bottom=train_s,
        color="tab:orange",
        label=f"held-out pass ({timing_result['settings']['n_val']:,} examples)",
    )
    bottom = [a + b for a, b in zip(train_s, val_s)]
    ax.bar(x, fixed_s, bottom=bottom, color="tab:gray", alpha=0.6, label="fixed cost (build, trace, save)")
    for i, r in enumerate(runs):
        ax.text(
            i,
            bottom[i] + fixed_s[i],
            f"{r['epoch_seconds']:.0f} s\n{r['seconds_per_step'] * 1000:.0f} ms/step",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels)
    ax.set_ylabel("seconds")
    kinds = {r["epoch_seconds_kind"] for r in runs}
    kind = kinds.pop() if len(kinds) == 1 else "mixed"
    ax.set_title(
        f"ResNet-20 CIFAR-10: one epoch, batch {timing_result['settings']['batch_size']} ({kind})",
        fontsize=10,
    )
    ax.set_ylim(0, max(b + f for b, f in zip(bottom, fixed_s)) * 1.25)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    return common.save_figure(fig, path, dpi=110)


def print_report(report):
    t = report.get("timing")
    if t:
        print(f"\nOne CIFAR-10 epoch per run ({t['data']}):")
        print(
            f"  {'run':<27} {'s/step':>7} {'CPU s/st':>8} {'stall s':>7} {'fixed s':>8} {'val s':>6} "
            f"{'epoch s':>8}  {'kind':<26} {'160 ep. h':>9}"
        )
        for r in t.get("before", []) + t["runs"]:
            stall = r["max_stall_seconds"]
            print(
                f"  {r['label'] + ' (' + r['pipeline'] + ')':<27} {r['seconds_per_step']:7.3f} "
                f"{r['cpu_seconds_per_step']:8.3f} {'-' if stall is None else format(stall, '7.2f'):>7} "
                f"{r['fixed_seconds']:8.1f} {r['validation_seconds_per_epoch']:6.1f} {r['epoch_seconds']:8.0f}  "
                f"{r['epoch_seconds_kind']:<26} {r['full_schedule_hours']:9.1f}"
            )
        print(f"  all runs timed, paper schedule: {t['total_full_schedule_hours']:.1f} h")
    m = report.get("mock")
    if m:
        print(f"\nMock runs ({m['data']}):")
        for r in m["runs"]:
            if "failed" in r:
                print(f"  {r['label']:<20} FAILED: {r['failed']}")
                continue
            n = r["mock_data_numbers"]
            q = r.get("quantized_model") or {}
            bits = ""
            if q:
                w = sorted(set(q["weight_bits"].values()))
                a = sorted(set(q["activation_bits"].values()))
                bits = f" weight bits {w}, activation bits {a}, input {sorted(set(q['input_bits'].values()))}"
            print(
                f"  {r['label']:<20} stages {r['finished_stages']}/{r['stages']}"
                + (f", tflite {r['tflite_written']}" if "tflite_written" in r else "")
                + bits
            )
            if n.get("weight_kb") is not None:
                print(
                    f"  {'':<20} mock-data sizes: weights {n['weight_kb']:.1f} kB, largest activation "
                    f"{n['activation_kb_max']:.1f} kB, constraints {n.get('constraints_met')}"
                )


def run(
    modes=("mock", "time"),
    mock_settings=None,
    time_settings=None,
    out_dir=RESULTS_DIR,
    command_line=None,
    echo=False,
    chart=True,
):
    """Run the chosen modes, write ``<out_dir>/cifar10_recipes.json`` (merging
    sections of earlier invocations) and the chart; return the report."""
    path = os.path.join(out_dir, f"{NAME}.json")
    old = _read_json(path) or {}
    report = {k: old[k] for k in ("mock", "timing") if k in old}
    date = time.strftime("%Y-%m-%d")
    cmd = command_line or "python -m benchmarks.cifar10_recipes"
    if "mock" in modes:
        report["mock"] = dict(mock(**(mock_settings or MOCK), echo=echo), command=cmd, date=date)
    if "time" in modes:
        report["timing"] = dict(timing(**(time_settings or TIME), echo=echo), command=cmd, date=date)
    payload = {
        "paper_runs": [
            {
                "name": r["name"],
                "label": r["label"],
                "paper_error_percent": r["paper_error"],
                "flags": r["flags"],
                "command": command(r),
            }
            for r in RUNS
        ],
        "recipe": _recipe(),
    }
    payload.update(report)
    if chart and "timing" in report:
        payload["chart"] = plot(report["timing"], os.path.join(out_dir, f"{NAME}.png"))
    common.write_result(
        out_dir,
        NAME,
        "The paper's ResNet-20 CIFAR-10 runs (Table 3): commands, mock runs, epoch timing",
        cmd,
        payload,
    )
    return payload


def _recipe():
    from tfdq.train import config as cfg  # noqa: PLC0415

    return dict(cfg.RECIPES["cifar10"])


def define_flags():
    flags.DEFINE_bool("print_commands", False, "Print the four paper commands and exit.")
    flags.DEFINE_bool("mock", False, "Run every configuration for a few steps on tfds mock data.")
    flags.DEFINE_bool("time", False, "Time one epoch of every configuration (CIFAR-shaped generated inputs).")
    flags.DEFINE_bool("quick", False, "Smoke run of both modes (1-5 steps, tiny timing).")
    flags.DEFINE_integer(
        "steps", TIME["steps"], "Steps of the long timing run (391: one CIFAR-10 epoch, measured)."
    )
    flags.DEFINE_list("runs", None, "Runs to time (names of RUNS; default all; float is always timed).")
    flags.DEFINE_bool("before", False, "Also time the float run on the pipeline before issue 16.")
    flags.DEFINE_integer("batch_size", TIME["batch_size"], "Batch size of the timing runs (the paper's 128).")
    flags.DEFINE_integer("mock_steps", MOCK["steps"], "Steps per epoch of the mock runs.")
    flags.DEFINE_string("out_dir", RESULTS_DIR, "Output folder.")


def main(argv):
    import sys  # noqa: PLC0415

    del argv
    if FLAGS.print_commands:
        print(commands_text())
        return
    modes = [m for m in ("mock", "time") if getattr(FLAGS, m)] or ["mock", "time"]
    mock_settings = dict(MOCK, steps=FLAGS.mock_steps)
    time_settings = dict(TIME, steps=FLAGS.steps, batch_size=FLAGS.batch_size, before=FLAGS.before)
    if FLAGS.runs:
        unknown = set(FLAGS.runs) - {r["name"] for r in RUNS}
        if unknown:
            raise app.UsageError(f"--runs: unknown {sorted(unknown)}; known: {[r['name'] for r in RUNS]}")
        time_settings["runs"] = tuple(FLAGS.runs)
    out_dir = FLAGS.out_dir
    if FLAGS.quick:
        mock_settings, time_settings = dict(QUICK["mock"]), dict(QUICK["time"])
        if out_dir == RESULTS_DIR:  # smoke numbers never replace the measured ones
            out_dir = tempfile.mkdtemp(prefix="cifar10_recipes_quick_")
    command_line = "python -m benchmarks.cifar10_recipes " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = run(modes, mock_settings, time_settings, out_dir, command_line.strip(), echo=True)
    print_report(report)


if __name__ == "__main__":
    define_flags()
    app.run(main)
