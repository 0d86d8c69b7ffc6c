"""The whole export of a trained model, as one function: align, convert, write, verify.

``tfdq-export`` and the training script's export stage both call
:func:`export_and_verify`; they differ only in where the data and the paths
come from and in how they print the result.
"""

from __future__ import annotations

from tfdq.export.align import align_biases
from tfdq.export.convert import float_tflite, to_tflite
from tfdq.export.verify import verify


def export_and_verify(
    model,
    calibration_data,
    evaluation_data,
    output_path: str,
    *,
    aligned_path: str | None = None,
    align: bool = True,
    storage: str | None = None,
    int4_kernels: bool | None = None,
    input_type: str = "int8",
    output_type: str = "int8",
    calibration_samples: int = 1000,
) -> dict:
    """Export ``model`` to an integer ``.tflite`` at ``output_path`` and check it in LiteRT.

    Steps, in order: :func:`~tfdq.export.align_biases` (when ``align``; it
    changes ``model`` in memory so that the file's int32 biases are exact),
    the aligned model saved to ``aligned_path`` (when given),
    :func:`~tfdq.export.to_tflite`, the file written, and
    :func:`~tfdq.export.verify` on ``evaluation_data`` (arrays ``(x, y)`` or a
    ``tf.data.Dataset`` of batches). Every file is written atomically
    (a temporary file and a rename), and a model holding NaN or Inf is
    refused before anything is written.

    Args:
        model: a trained tfdq model.
        calibration_data: training inputs for the scales no learned quantizer covers.
        evaluation_data: held-out ``(x, y)`` for the verification.
        output_path: where the ``.tflite`` goes.
        aligned_path: where the aligned ``.keras`` model goes (None: not saved).
        align: run :func:`~tfdq.export.align_biases` first (default True).
        storage: the kernel storage policy, ``"fast"`` (default),
            ``"smallest"`` or ``"int8"`` (see :func:`~tfdq.export.to_tflite`);
            the bias alignment follows the storage each layer gets.
        int4_kernels: deprecated (``True``: ``"smallest"``, ``False``: ``"int8"``).
        input_type, output_type: ``"int8"`` or ``"float32"``.
        calibration_samples: how many calibration inputs to use.

    Returns:
        A dict: ``tflite`` (the path), ``tflite_bytes`` (the file),
        ``aligned_model``, ``bias_alignment`` (one entry per folded layer, or
        None), ``export`` (the :class:`~tfdq.export.ExportReport`),
        ``verification`` (the :class:`~tfdq.export.VerificationReport`, with
        ``sizes["float32_tflite_bytes"]`` added).
    """
    from tfdq.callbacks import atomic_save, atomic_write_bytes  # noqa: PLC0415
    from tfdq.export.plan import resolve_storage  # noqa: PLC0415

    storage = resolve_storage(storage, int4_kernels)

    alignment = None
    if align:
        alignment = align_biases(
            model, calibration_data, storage=storage, calibration_samples=calibration_samples
        )
    if aligned_path is not None:
        atomic_save(model, aligned_path)
    tflite, export_report = to_tflite(
        model,
        calibration_data,
        input_type=input_type,
        output_type=output_type,
        storage=storage,
        calibration_samples=calibration_samples,
        return_report=True,
    )
    atomic_write_bytes(output_path, tflite)
    verification = verify(model, tflite, evaluation_data, export_report=export_report, storage=storage)
    verification["sizes"]["float32_tflite_bytes"] = len(float_tflite(model))
    return {
        "tflite": output_path,
        "tflite_bytes": tflite,
        "aligned_model": aligned_path,
        "bias_alignment": alignment,
        "export": export_report,
        "verification": verification,
    }
