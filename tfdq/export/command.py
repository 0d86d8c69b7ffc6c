"""Export a trained tfdq ``.keras`` model to integer TFLite and verify it.

    tfdq-export --model=runs/mnist/model.keras
    tfdq-export --model=m.keras --dataset=cifar10 --output=m.tflite
    tfdq-export --model=m.keras --dataset=npz:data.npz --storage=int8

By default the BatchNorm betas are first aligned to the int32 bias grid
(``tfdq.export.align_biases``; ``--noalign_biases`` skips it): the aligned
model is written as ``<output>.aligned.keras`` and is the one verified, so
the report compares the file with the model it computes exactly.

The model is loaded with Keras' safe mode on (no code from the file runs).
The command writes the ``.tflite`` (kernels hold the learned integers, stored
as ``--storage`` says: ``fast``, the default, puts every operator where LiteRT's
XNNPACK runs it and then stores the fewest bytes; ``smallest`` packs int4/int2
wherever the format allows; ``int8`` stores every kernel in a byte), runs it in LiteRT
next to the Keras model on the data set's held-out images, prints the
verification report and the sizes (file, kernel bytes, int8 bytes, the
packed size ``sum b * count / 8`` of the learned bitwidths) and writes the
report as JSON.

Data sets: ``mnist_subset`` (the 1,000 held-out images of
:func:`tfdq.data.mnist_subset`, calibration on training images; the
default, said so in the output, for a model with MNIST's 28x28x1 input
only: any other model needs ``--dataset``),
``cifar10`` / ``imagenet2012`` (tensorflow-datasets, with the evaluation
preprocessing of ``tfdq/train/data.py``), or ``npz:PATH`` (arrays ``x`` and ``y``,
optional ``x_calibration``; without it the first inputs of ``x`` calibrate).
"""

import json
import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Path of the trained tfdq model (.keras).")
flags.DEFINE_string("output", None, "Output .tflite path (default: the model path with .tflite).")
flags.DEFINE_string(
    "dataset",
    None,
    "mnist_subset, cifar10, imagenet2012 or npz:PATH (arrays x, y, optional x_calibration). Default: "
    "mnist_subset, for a model with MNIST's 28x28x1 input only.",
)
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data_dir (cifar10, imagenet2012).")
flags.DEFINE_integer(
    "calibration_samples", 1000, "Training inputs used to calibrate the scales no learned quantizer covers."
)
flags.DEFINE_integer("max_eval_samples", None, "Verify on at most this many held-out inputs (default: all).")
flags.DEFINE_enum("input_type", "int8", ["int8", "float32"], "Type of the .tflite input tensor.")
flags.DEFINE_enum("output_type", "int8", ["int8", "float32"], "Type of the .tflite output tensor.")
flags.DEFINE_enum(
    "storage",
    "fast",
    ["fast", "smallest", "int8"],
    "Kernel storage: fast (XNNPACK runs every op; then fewest bytes), smallest (int4/int2 wherever "
    "the format allows), int8 (every kernel int8). The integers are the learned ones in every policy.",
)
flags.DEFINE_bool("int8_kernels", False, "Deprecated: the same as --storage=int8.")
flags.DEFINE_bool(
    "align_biases",
    True,
    "Move each folded BatchNorm's beta (by at most half an accumulator unit) so that the file's "
    "int32 biases are exact and LiteRT computes what the Keras model computes; the aligned model "
    "is written beside the .tflite (the input model file is never changed).",
)
flags.DEFINE_string("report_json", None, "Where to write the report (default: the output path with .json).")


class CommandError(Exception):
    """A problem with the command's inputs; main prints it without a traceback."""


def load_model(path):
    """Load a tfdq ``.keras`` model with safe mode on; clear errors for bad paths."""
    if not path:
        raise CommandError("--model is required: the path of a trained tfdq .keras model.")
    if not os.path.exists(path):
        raise CommandError(f"model file not found: {path!r}")
    if os.path.isdir(path):
        raise CommandError(f"{path!r} is a directory; pass the .keras file.")
    import keras  # noqa: PLC0415

    import tfdq  # noqa: F401, PLC0415  # registers the tfdq layers for loading

    try:
        return keras.models.load_model(path, safe_mode=True)
    except Exception as err:  # noqa: BLE001 (any failure means: not a loadable model)
        raise CommandError(
            f"cannot load {path!r} as a Keras model (corrupt, not a .keras file, or saved "
            f"with layers tfdq does not register): {type(err).__name__}: {err}"
        ) from None


def load_data(name, calibration_samples, max_eval_samples=None, data_dir=None):
    """``(calibration inputs, evaluation (x, y) or dataset)`` for data set ``name``."""
    import numpy as np  # noqa: PLC0415

    if name == "mnist_subset":
        from tfdq.data import mnist_subset  # noqa: PLC0415

        (x, _), (xt, yt) = mnist_subset()
        if max_eval_samples:
            xt, yt = xt[:max_eval_samples], yt[:max_eval_samples]
        return x[:calibration_samples], (xt, yt)
    if name.startswith("npz:"):
        path = name[4:]
        if not os.path.exists(path):
            raise CommandError(f"data file not found: {path!r}")
        try:
            arrays = np.load(path)
            x, y = arrays["x"], arrays["y"] if "y" in arrays else None
            cal = arrays["x_calibration"] if "x_calibration" in arrays else x
        except Exception as err:  # noqa: BLE001
            raise CommandError(f"cannot read {path!r} as an .npz with arrays 'x' (and 'y'): {err}") from None
        if max_eval_samples:
            x = x[:max_eval_samples]
            y = None if y is None else y[:max_eval_samples]
        return cal[:calibration_samples], (x, y)
    if name in ("cifar10", "imagenet2012"):
        from tfdq.train import data as train_data  # noqa: PLC0415

        try:
            d = train_data.load(
                name,
                100,
                data_dir=data_dir,
                download=False,
                val_examples=max_eval_samples,
                calibration_examples=calibration_samples,
            )
        except Exception as err:  # noqa: BLE001
            raise CommandError(f"data set {name!r} is not available: {err}") from None
        return d.calibration, d.val
    raise CommandError(f"unknown --dataset={name!r}: use mnist_subset, cifar10, imagenet2012 or npz:PATH.")


def _jsonable(obj):
    import numpy as np  # noqa: PLC0415

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


MNIST_SHAPE = (28, 28, 1)


def choose_dataset(model, dataset, print_fn=print):
    """``dataset``, or ``mnist_subset`` (said so) for a model with MNIST's input."""
    if dataset:
        return dataset
    shapes = [tuple(t.shape[1:]) for t in model.inputs]
    if shapes == [MNIST_SHAPE]:
        print_fn(
            "note: --dataset not given: calibrating and verifying on mnist_subset (the model takes 28x28x1 inputs)"
        )
        return "mnist_subset"
    raise CommandError(
        f"--dataset is required for this model (its input shape is {shapes[0] if len(shapes) == 1 else shapes}, "
        "not MNIST's 28x28x1): pass --dataset=cifar10, imagenet2012 or npz:PATH (arrays x and y, "
        "optional x_calibration)."
    )


def output_paths(model_path, output, report_json, align_biases):
    """``(output, aligned model path or None, report path)``; refused before
    any work when one would overwrite the input model or another output, or
    lies in a folder that does not exist."""
    output = output or os.path.splitext(model_path)[0] + ".tflite"
    stem = os.path.splitext(output)[0]
    report_json = report_json or stem + ".json"
    aligned = stem + ".aligned.keras" if align_biases else None
    model_abs = os.path.abspath(model_path)
    named = {"--output": output, "--report_json": report_json}
    if aligned:
        named["the aligned model"] = aligned
    for what, path in named.items():
        if os.path.abspath(path) == model_abs:
            raise CommandError(
                f"{what} would be written to {path!r}, which is the input model; it is never "
                "overwritten. Choose another --output (e.g. one not named like the model)"
                + (", or pass --noalign_biases." if what == "the aligned model" else ".")
            )
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise CommandError(f"{what} {path!r}: the folder {folder} does not exist; create it first.")
        if not os.access(folder, os.W_OK):
            raise CommandError(f"{what} {path!r}: the folder {folder} is not writable.")
    if len({os.path.abspath(p) for p in named.values()}) < len(named):
        raise CommandError(
            f"the outputs {named} would overwrite each other; choose another --output or --report_json."
        )
    return output, aligned, report_json


def run(
    model_path,
    output=None,
    dataset=None,
    calibration_samples=1000,
    max_eval_samples=None,
    input_type="int8",
    output_type="int8",
    storage="fast",
    report_json=None,
    data_dir=None,
    align_biases=True,
    print_fn=print,
):
    """Export and verify; returns the report dict (also written as JSON).

    With ``align_biases`` the model is aligned in memory
    (:func:`tfdq.export.align_biases`), saved as ``<output>.aligned.keras``
    and verified in that form; ``model_path`` itself is never written.
    """
    from tfdq import export  # noqa: PLC0415
    from tfdq.callbacks import atomic_write_bytes  # noqa: PLC0415

    output, aligned_path, report_json = output_paths(model_path, output, report_json, align_biases)
    model = load_model(model_path)
    dataset = choose_dataset(model, dataset, print_fn)
    calibration, evaluation = load_data(dataset, calibration_samples, max_eval_samples, data_dir)
    try:
        out = export.export_and_verify(
            model,
            calibration,
            evaluation,
            output,
            aligned_path=aligned_path,
            align=align_biases,
            storage=storage,
            input_type=input_type,
            output_type=output_type,
            calibration_samples=calibration_samples,
        )
    except (export.ExportError, ValueError) as err:
        raise CommandError(f"cannot export {model_path!r}: {err}") from None
    tflite, export_report, result = out["tflite_bytes"], out["export"], out["verification"]
    alignment = out["bias_alignment"]
    float_bytes = result["sizes"]["float32_tflite_bytes"]
    print_fn(f"wrote {output}")
    if aligned_path is not None:
        moved = max((a["max_change_output_steps"] or 0.0 for a in alignment), default=0.0)
        skipped = [a["layer"] for a in alignment if not a["aligned"]]
        print_fn(
            f"wrote {aligned_path} (BatchNorm betas of {len(alignment) - len(skipped)} layers aligned "
            f"to the int32 bias grid, at most {moved:.3f} output steps"
            + (f"; not aligned, no beta: {', '.join(skipped)})" if skipped else ")")
        )
    print_fn(result.format())
    print_fn(
        f"  float32 .tflite        {float_bytes} bytes (quantizers removed); this file is "
        f"{100 * len(tflite) / float_bytes:.1f}% of it"
    )
    report = {
        "model": model_path,
        "tflite": output,
        "dataset": dataset,
        "aligned_model": aligned_path,
        "bias_alignment": alignment,
        "export": dict(export_report),
        "verification": dict(result),
    }
    atomic_write_bytes(report_json, (json.dumps(_jsonable(report), indent=2) + "\n").encode())
    print_fn(f"wrote {report_json}")
    return report


def _storage_flag():
    if FLAGS.int8_kernels:
        if FLAGS["storage"].present and FLAGS.storage != "int8":
            raise app.UsageError(
                f"--int8_kernels conflicts with --storage={FLAGS.storage}; pass --storage only."
            )
        print("note: --int8_kernels is deprecated; use --storage=int8.", file=sys.stderr)
        return "int8"
    return FLAGS.storage


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        run(
            FLAGS.model,
            FLAGS.output,
            FLAGS.dataset,
            FLAGS.calibration_samples,
            FLAGS.max_eval_samples,
            FLAGS.input_type,
            FLAGS.output_type,
            _storage_flag(),
            FLAGS.report_json,
            FLAGS.data_dir,
            FLAGS.align_biases,
        )
    except CommandError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        print(
            f"error: {err.strerror or err}{where}; the input model is unchanged. Fix the cause "
            "(free disk space, permissions) and run the command again.",
            file=sys.stderr,
        )
        sys.exit(1)


def run_command() -> None:
    """Entry point of the ``tfdq-export`` command (and ``python -m tfdq.export``)."""
    from tfdq._cli import run_absl_main  # noqa: PLC0415

    run_absl_main(main, __name__)


if __name__ == "__main__":
    run_command()
