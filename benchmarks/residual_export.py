"""Export fidelity of residual models: LiteRT against Keras, int4 and int8 kernels.

Short training on real data (sklearn's digits upscaled, 1,400 training /
397 held-out images, batch 64), then U3 fine-tuning (weights and
activations, 4-bit start) and for each kernel storage
``tfdq.export.align_biases`` + ``to_tflite`` + ``verify`` on all 1,797
digits (held-out accuracies on the 397): top-1 agreement, the largest logit difference in output steps,
disagreements at ties, whether every kernel holds the learned integers,
which signed int4 layers were stored int8 and which tensors were
calibrated (only the logits should be). Storages (``--storages``): the
default ``fast`` (int4/int2 where XNNPACK runs them) and ``int8``
(``smallest`` on request). Models (``--models``):

* ``residual_cnn``: conv-BN-ReLU, one residual block, a strided conv,
  global average pooling (16x16x1, 16/32 channels; 30 float + 2 quantized
  epochs);
* ``resnet20``: the paper's ResNet-20 (32x32x3, the digit repeated over
  the channels; 4 + 1 epochs);
* ``mobilenetv2``: ``keras.applications.MobileNetV2(alpha=0.35)`` at
  32x32x3 (logits, no softmax; BatchNorm momentum 0.999 as shipped;
  10 + 2 epochs).

::

    python -m benchmarks.residual_export                          # all three, about 25 min on 2 cores
    python -m benchmarks.residual_export --models=mobilenetv2 --seeds=0,1
"""

import time

from absl import app, flags

from benchmarks.common import RESULTS_DIR, THREADS_HELP, set_threads, write_result

FLAGS = flags.FLAGS
MODELS = {  # name: (input size, channels, float epochs, quantized epochs)
    "residual_cnn": (16, 1, 30, 2),
    "resnet20": (32, 3, 4, 1),
    "mobilenetv2": (32, 3, 10, 2),
}


def _define_flags():
    flags.DEFINE_list("models", list(MODELS), "Models to measure.")
    flags.DEFINE_list("seeds", ["0"], "Random seeds.")
    flags.DEFINE_list("storages", ["fast", "int8"], "Kernel storage policies (fast, smallest, int8).")
    flags.DEFINE_string("out_dir", RESULTS_DIR, "Output folder.")
    flags.DEFINE_integer("threads", 0, THREADS_HELP)


def build(name, size, channels):
    """The float model ``name`` for ``size x size x channels`` digits (logits out)."""
    import keras  # noqa: PLC0415

    import tfdq  # noqa: PLC0415
    from benchmarks.batchnorm_residual import residual_cnn  # noqa: PLC0415

    if name == "residual_cnn":
        return residual_cnn(width=16, input_shape=(size, size, channels))
    if name == "resnet20":
        return tfdq.models.resnet20(input_shape=(size, size, channels))
    if name == "mobilenetv2":
        return keras.applications.MobileNetV2(
            input_shape=(size, size, channels),
            alpha=0.35,
            weights=None,
            classes=10,
            classifier_activation=None,
        )
    raise ValueError(f"unknown model {name!r}: use one of {', '.join(MODELS)}")


def data(size, channels):
    """Digits at ``size`` with ``channels`` copies of the gray channel."""
    import numpy as np  # noqa: PLC0415

    from benchmarks.batchnorm_residual import digits  # noqa: PLC0415

    train, test = digits(size=size)
    return tuple((np.repeat(x, channels, -1) if channels > 1 else x, y) for x, y in (train, test))


def train(name, seed, epochs=None):
    """Float training then quantized fine-tuning; returns the quantized model, the data and accuracies."""
    import keras  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    import tfdq  # noqa: PLC0415

    size, channels, float_epochs, quant_epochs = MODELS[name]
    if epochs is not None:
        float_epochs, quant_epochs = epochs
    (x, y), test = data(size, channels)
    keras.utils.set_random_seed(seed)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = build(name, size, channels)
    model.compile(keras.optimizers.Adam(1e-3), loss, metrics=["accuracy"])
    model.fit(x, y, batch_size=64, epochs=float_epochs, verbose=0)
    tfdq.recalibrate_batchnorm(model, x)
    float_acc = float(np.mean(np.argmax(model.predict(test[0], verbose=0), -1) == test[1]))
    qmodel = tfdq.quantize_model(model, calibration_data=x[:512], quantize_output=True)
    qmodel.compile(keras.optimizers.Adam(1e-3), loss, metrics=["accuracy"])
    history = qmodel.fit(x, y, batch_size=64, epochs=quant_epochs, verbose=0)
    return qmodel, (x, y), test, float_acc, history.history


def measure(qmodel, train_data, test, storage):
    """align_biases + to_tflite + verify for one kernel storage policy: a JSON-ready record."""
    import numpy as np  # noqa: PLC0415

    import tfdq.export as E  # noqa: PLC0415

    changes = E.align_biases(qmodel, train_data[0], storage=storage)
    tflite, report = E.to_tflite(qmodel, train_data[0], storage=storage, return_report=True)
    held_out = E.verify(qmodel, tflite, test, export_report=report)
    everything = tuple(np.concatenate([a, b]) for a, b in zip(train_data, test))  # all 1,797 digits
    r = E.verify(qmodel, tflite, everything, export_report=report)
    steps = [c["max_change_output_steps"] for c in changes if c.get("max_change_output_steps") is not None]
    return {
        "kernels": storage,
        "samples": r["samples"],
        "agreement": r["top1_agreement"],
        "disagreements": r["disagreements"],
        "tied_top_outputs": r["tied_top_outputs"],
        "max_logit_diff_output_steps": r["max_abs_output_diff_in_output_steps"],
        "held_out_agreement": held_out["top1_agreement"],
        "keras_accuracy": held_out["keras_accuracy"],
        "tflite_accuracy": held_out["tflite_accuracy"],
        "all_kernels_exact": r["all_kernels_exact"],
        "all_biases_exact": all(b["exact"] for b in report["biases"]),
        "calibrated": [c["tensor"] for c in report["calibrated"]],
        "stored_int8_signed": [k["layer"] for k in report["kernels"] if k.get("storage_note")],
        "int4_layers": sum(k["storage"] == "int4" for k in report["kernels"]),
        "sub_byte_layers": sum(k["storage"] in ("int4", "int2") for k in report["kernels"]),
        "max_alignment_output_steps": max(steps) if steps else None,
        "alignment_finite": all(np.isfinite(s) for s in steps),
        "file_bytes": len(tflite),
    }


def main(argv):
    del argv
    set_threads(FLAGS.threads)
    records = []
    for name in FLAGS.models:
        for seed in (int(s) for s in FLAGS.seeds):
            start = time.time()
            qmodel, train_data, test, float_acc, history = train(name, seed)
            for storage in FLAGS.storages:
                rec = measure(qmodel, train_data, test, storage)
                rec.update(
                    model=name,
                    seed=seed,
                    epochs=list(MODELS[name][2:]),
                    float_accuracy=float_acc,
                    final_train_loss=float(history["loss"][-1]),
                    nonfinite_steps=float(history.get("nonfinite_steps", [0])[-1]),
                    seconds=time.time() - start,
                )
                records.append(rec)
                print(
                    f"{name} seed {seed} {rec['kernels']}: agreement {100 * rec['agreement']:.1f}% "
                    f"({rec['disagreements']} differ, {rec['tied_top_outputs']} ties), max logit diff "
                    f"{rec['max_logit_diff_output_steps']:.2f} steps, Keras {100 * rec['keras_accuracy']:.1f}% "
                    f"(float {100 * float_acc:.1f}%), int8 for {rec['stored_int8_signed']}, "
                    f"calibrated {rec['calibrated']}",
                    flush=True,
                )
    write_result(
        FLAGS.out_dir,
        "residual_export",
        "Export fidelity of residual models (digits, short training): LiteRT vs Keras per kernel storage policy",
        "python -m benchmarks.residual_export --models="
        + ",".join(FLAGS.models)
        + " --seeds="
        + ",".join(FLAGS.seeds)
        + " --storages="
        + ",".join(FLAGS.storages),
        {"records": records},
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
