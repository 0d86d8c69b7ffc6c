"""The documented MobileNetV2 commands, end to end on ``tfds.testing.mock_data``.

ImageNet cannot be fetched on these machines, so this only checks that the
commands run (every stage, the export, LiteRT running the file); nothing it
measures is an ImageNet result. Two commands, each as ``tfdq-train`` would
run them, in-process under ``tfds.testing.mock_data`` (random images with
ImageNet's feature specs) and with tiny settings (``--image_size``, batch 4,
``--steps`` steps, one epoch per stage):

* ``finetune``: the README's command, ``--stages=quant,export`` from a saved
  keras.applications MobileNetV2 (``--init_checkpoint``; built here with
  ``weights=None``, as its ImageNet weights cannot be downloaded here: the
  same architecture, the same final softmax that loading removes), with the
  paper's 1587 kB / 588 kB budgets;
* ``scratch``: ``--stages=float,quant,export`` from the script's own
  MobileNetV2 (BENCHMARKS section 7's mock command).

Results go to ``results/mobilenetv2_mock.json``::

    python -m benchmarks.mobilenetv2_mock                  # both, image size 32
    python -m benchmarks.mobilenetv2_mock --runs=finetune --image_size=96
"""

import os
import shutil
import tempfile
import time

from absl import app, flags

from benchmarks import common
from benchmarks.cifar10_recipes import SUMMARY_KEYS, _read_json, _train, command

FLAGS = flags.FLAGS
NAME = "mobilenetv2_mock"

README_FINETUNE = {  # the README's command, less its data paths (one replica on a CPU)
    "dataset": "imagenet2012",
    "model": "mobilenetv2",
    "stages": "quant,export",
    "target_weight_kb": 1587.0,
    "target_activation_kb": 588.0,
    "strategy": "mirrored",
}
SCRATCH = {"dataset": "imagenet2012", "model": "mobilenetv2", "stages": "float,quant,export"}
RUNS = {"finetune": README_FINETUNE, "scratch": SCRATCH}


def keras_applications_start(path, image_size):
    """A keras.applications MobileNetV2 (ImageNet's 1000 classes, final softmax,
    random weights) saved to ``path``, as the README's first line saves the
    pretrained one."""
    import keras  # noqa: PLC0415

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(
        input_shape=(image_size, image_size, 3), weights=None, classes=1000
    )
    model.save(path)
    return path


def mock_runs(runs=("finetune", "scratch"), image_size=32, steps=2, num_examples=16, echo=False):
    """Each of ``runs`` (names of :data:`RUNS`) on mocked ImageNet; one record per run."""
    import tensorflow_datasets as tfds  # noqa: PLC0415

    work_dir = tempfile.mkdtemp(prefix="mobilenetv2_mock_")
    small = {
        "image_size": image_size,
        "batch_size": 4,
        "steps_per_epoch": steps,
        "float_epochs": 1,
        "quant_epochs": 1,
        "val_examples": num_examples,
        "calibration_examples": num_examples,
        "export_examples": num_examples,
        "verbose": 2 if echo else 0,
    }
    records = []
    try:
        with tfds.testing.mock_data(num_examples=num_examples):
            for name in runs:
                model_dir = os.path.join(work_dir, name)
                values = dict(RUNS[name], model_dir=model_dir, **small)
                if name == "finetune":
                    start = time.perf_counter()
                    values["init_checkpoint"] = keras_applications_start(
                        os.path.join(work_dir, "mnv2_float.keras"), image_size
                    )
                    save_seconds = time.perf_counter() - start
                record = {"name": name, "command": command({"flags": values})}
                if name == "finetune":
                    record["keras_applications_save_seconds"] = save_seconds
                try:
                    summary, wall, cpu = _train(dict(values, data_dir=os.path.join(work_dir, "tfds")), echo)
                except Exception as e:  # noqa: BLE001 (record the failure, go on with the next run)
                    record["failed"] = f"{type(e).__name__}: {e}"
                    records.append(record)
                    continue
                stages = [s for s in values["stages"].split(",") if s]
                export = _read_json(os.path.join(model_dir, "export", "result.json")) or {}
                tflite = os.path.join(model_dir, "export", "model.tflite")
                record.update(
                    wall_seconds=wall,
                    cpu_seconds=cpu,
                    stages=stages,
                    finished_stages=[
                        s for s in stages if os.path.exists(os.path.join(model_dir, s, "result.json"))
                    ],
                    stage_seconds={
                        s: (_read_json(os.path.join(model_dir, s, "result.json")) or {}).get("seconds")
                        for s in stages
                    },
                    tflite_bytes=os.path.getsize(tflite) if os.path.exists(tflite) else 0,
                    export_note=summary.get("export_note"),
                    export_check={
                        k: export.get(k)
                        for k in ("top1_agreement", "all_kernels_exact", "keras_accuracy", "tflite_accuracy")
                    },
                    mock_data_numbers={k: summary.get(k) for k in SUMMARY_KEYS if k in summary},
                )
                records.append(record)
                if echo:
                    print(
                        f"[mobilenetv2 {name}] stages {record['finished_stages']} of {stages}, "
                        f"{wall:.0f} s wall, {cpu:.0f} s CPU, tflite {record['tflite_bytes']} bytes, "
                        f"kernels exact {record['export_check']['all_kernels_exact']}",
                        flush=True,
                    )
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return {
        "data": "tfds.testing.mock_data: random images with ImageNet's feature specs. Every accuracy and "
        "size here is of generated data after a few steps: a check that the commands run, never an "
        "ImageNet result.",
        "settings": dict(small, num_examples=num_examples),
        "runs": records,
    }


def define_flags():
    flags.DEFINE_list("runs", ["finetune", "scratch"], "Which commands: finetune (the README's), scratch.")
    flags.DEFINE_integer("image_size", 32, "Image size of the mock runs.")
    flags.DEFINE_integer("steps", 2, "Steps per epoch.")
    flags.DEFINE_string("out_dir", common.RESULTS_DIR, "Output folder.")


def main(argv):
    import shlex  # noqa: PLC0415
    import sys  # noqa: PLC0415

    del argv
    unknown = set(FLAGS.runs) - set(RUNS)
    if unknown:
        raise app.UsageError(f"--runs: unknown {sorted(unknown)}; known: {sorted(RUNS)}")
    result = mock_runs(tuple(FLAGS.runs), FLAGS.image_size, FLAGS.steps, echo=True)
    cmd = "python -m benchmarks.mobilenetv2_mock " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for record in result["runs"]:
        record.update(date=date, command_line=cmd.strip(), settings=result["settings"])
    # the runs not run now stay as an earlier invocation left them (each with its own date)
    old = _read_json(os.path.join(FLAGS.out_dir, f"{NAME}.json")) or {}
    done = {r["name"] for r in result["runs"]}
    kept = [r for r in old.get("runs", []) if r["name"] not in done]
    result["runs"] = sorted(kept + result["runs"], key=lambda r: list(RUNS).index(r["name"]))
    common.write_result(
        FLAGS.out_dir, NAME, "The documented MobileNetV2 commands on mock ImageNet", cmd.strip(), result
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
