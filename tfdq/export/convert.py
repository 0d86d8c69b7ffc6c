"""Conversion: from a trained tfdq model to the full-integer ``.tflite`` bytes.

:func:`to_tflite` plans the export (:mod:`tfdq.export.plan`), calibrates the
tensors no learned quantizer covers (:mod:`tfdq.export.calibrate`), traces
the graph (:mod:`tfdq.export.build`), converts it with the TFLite converter,
settles each kernel's storage (:mod:`tfdq.export.storage`) and reads the
file back (:mod:`tfdq.export.check`).
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import tensorflow as tf

from tfdq.export.build import Builder, trace
from tfdq.export.calibrate import collect_stats, input_specs
from tfdq.export.check import check_file
from tfdq.export.clamps import clamps_as_requantize
from tfdq.export.flatbuffer import inspect_tflite
from tfdq.export.plan import ExportError, Plan, resolve_storage
from tfdq.export.relus import relus_round_once
from tfdq.export.storage import kernel_storage, settle_storage


class ExportReport(dict):
    """What :func:`to_tflite` did (a dict, JSON-serializable).

    Keys: ``kernels`` (per quantized layer: bits, integer range, storage,
    scale kind, folded BatchNorm), ``activations`` (per activation
    quantizer: step, levels, zero point, clamp), ``calibrated`` (tensors whose
    scale was calibrated on the user's data, with the reason), ``fixed``
    (tensors whose scale TFLite's spec fixes, e.g. softmax), ``batchnorms``
    (BatchNormalizations that could not fold and per-channel Rescaling /
    Normalization layers, each a 1x1 DEPTHWISE_CONV_2D: input scale and
    whether its int32 bias is exact), ``clamps`` (each int8 MINIMUM/MAXIMUM at
    a grid point and the QUANTIZE that replaced it, :mod:`tfdq.export.clamps`),
    ``relus`` (each int8 RELU whose output scale differs from its input's and
    whether it became a RELU + QUANTIZE that rounds once, :mod:`tfdq.export.relus`),
    ``options``.
    """


def _convert(fn, specs, input_type, output_type):
    concrete = fn.get_concrete_function(*specs)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], fn)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.inference_input_type = input_type
    converter.inference_output_type = output_type
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
        return converter.convert()


_TYPES = {"int8": tf.int8, "float32": tf.float32, "float": tf.float32}


def trace_export(model, calibration_data, storage, calibration_samples):
    """Plan, calibrate and trace the export graph; ``(plan, BuildTables, tf.function, specs)``."""
    from tfdq import nonfinite, validate  # noqa: PLC0415

    validate.refuse_mixed_precision(model, "export a model")
    bad = nonfinite.nonfinite_variables(model)
    if bad:
        raise ExportError(
            "the model holds NaN or Inf values in "
            + ", ".join(bad[:8])
            + (" ..." if len(bad) > 8 else "")
            + ": a non-finite training step poisoned them. Export an earlier checkpoint, or retrain "
            "(tfdq's fit skips non-finite steps)."
        )
    try:
        calibration_data = validate.calibration_inputs(model, calibration_data)
    except ValueError as e:
        raise ExportError(str(e)) from None
    plan = Plan(model, storage=storage)
    stats = collect_stats(plan, calibration_data, calibration_samples)
    specs = input_specs(model)
    exported, tables = trace(Builder(plan, "export", stats), specs)
    if tables.missing:
        raise ExportError(f"Internal error: no statistics for {tables.missing}.")
    return plan, tables, exported, specs


def _clamp_text(a, zero_point):
    # the clamp at n*d is an int8 QUANTIZE to zero point 127 - n (saturation), see tfdq.export.clamps
    if a.signed:
        return "int8 saturation at -n*d, QUANTIZE to zero point 127 - n (saturation at n*d)"
    if zero_point == -128:
        return "int8 saturation at 0" + (
            ", QUANTIZE to zero point 127 - n (saturation at n*d)" if a.n < 255 else ""
        )
    return "int8 saturation at q_max, ReLU at 0"


def _bias_entry(b):
    return {
        "layer": b["layer"],
        "input_scale": float(b["s_in"]),
        "output_scale": None if b["s_out"] is None else float(b["s_out"]),
        "max_abs_residual": float(np.max(np.abs(b["residual"]))),
        "requantization_shift": [float(np.min(b["shift"])), float(np.max(b["shift"]))],
        "exact": bool(np.all(np.abs(b["residual"]) < 1e-3)) and b.get("file_difference", 0) == 0,
        # int32 biases beyond 2^22 accumulator units carry the converter's float32 rounding
        "max_abs_integer": int(np.max(np.abs(b["integer"]), initial=0)),
        "file_difference": int(b.get("file_difference", 0)),
    }


def to_tflite(
    model: keras.Model,
    calibration_data=None,
    *,
    input_type: str = "int8",
    output_type: str = "int8",
    storage: str | None = None,
    int4_kernels: bool | None = None,
    calibration_samples: int = 1000,
    return_report: bool = False,
) -> bytes | tuple[bytes, ExportReport]:
    """Convert a trained tfdq model to a full-integer TFLite flatbuffer.

    Kernels hold the learned integers ``k`` (``|k| <= 2^(b-1) - 1``) with
    scale ``d`` per tensor, or ``d |s_c|`` per output channel where a
    BatchNormalization is folded (``s_c = gamma_c / sqrt(var_c + eps)``);
    how each is stored is the ``storage`` policy's choice. Activation
    tensors use the learned step ``d`` as scale and are clamped at the learned
    ``q_max``. See the module docstring for the exact rules.

    Args:
        model: a tfdq model (``tfdq.quantize_model`` output, trained).
        calibration_data: inputs (array, list of arrays, ``(x, y)`` tuple or a
            ``tf.data.Dataset``) used to choose the scales of tensors that no
            learned quantizer covers (at least the logits). Every such tensor
            is listed in the report.
        input_type, output_type: ``"int8"`` (default) or ``"float32"``.
        storage: how kernels are stored; the integers are the same in each.
            ``"fast"`` (default): every operator where LiteRT's XNNPACK
            delegate runs it, then the fewest bytes: a Dense or 1x1 stride-1
            convolution with ``b <= 4`` becomes a FULLY_CONNECTED with
            per-channel int4 weights (``b <= 2``: int2), which XNNPACK runs
            when the input channels are even (int2: a multiple of 4; else
            one step wider, with a ``storage_note``); other convolutions
            int8 (XNNPACK runs no sub-byte CONV_2D/DEPTHWISE_CONV_2D).
            ``"smallest"``: int4/int2 wherever LiteRT runs it (int4
            CONV_2D/DEPTHWISE_CONV_2D in its slower builtin kernels).
            ``"int8"``: every kernel int8. The report gives, per layer, the
            operator, storage, bytes and whether LiteRT's XNNPACK runs it
            (asked of the runtime).
        int4_kernels: deprecated: ``True`` is ``storage="smallest"``,
            ``False`` is ``storage="int8"``.
        calibration_samples: at most this many calibration inputs are used.
        return_report: also return an :class:`ExportReport`.

    Returns:
        The ``.tflite`` bytes, or ``(bytes, report)``.

    Raises:
        ExportError: no tfdq quantizers, bitwidths above 8, power-of-two grids
            that do not fit int8, unsupported layers (named), missing
            calibration data, or a converted file that does not hold the
            learned integers or still computes in float.
    """
    if input_type not in _TYPES or output_type not in _TYPES:
        raise ValueError(
            f"input_type/output_type must be 'int8' or 'float32', got {input_type!r}/{output_type!r}."
        )
    storage = resolve_storage(storage, int4_kernels)
    plan, tables, exported, specs = trace_export(model, calibration_data, storage, calibration_samples)
    converted = _convert(exported, specs, _TYPES[input_type], _TYPES[output_type])
    converted, clamps = clamps_as_requantize(converted)  # MINIMUM/MAXIMUM at a grid point: QUANTIZE
    converted, relus = relus_round_once(converted)  # requantizing RELU: one rounding, as Keras
    tflite, delegated = settle_storage(converted, plan)
    info = inspect_tflite(tflite)
    check_file(plan, info, tables, tflite)
    in_file = kernel_storage(plan, info, delegated)
    report = ExportReport(
        kernels=[dict(_kernel_entry(p), **in_file.get(p.op_index, {})) for p in plan.kernels.values()],
        activations=[
            {
                "layer": a.layer_name,
                "quantizer": a.quantizer,
                "signed": a.signed,
                "bits": a.bits,
                "d": a.step,
                "levels_max": a.n,
                "scale": a.step,
                "zero_point": tables.zero_points.get(a.op_index, a.zero_point),
                "clamp": _clamp_text(a, tables.zero_points.get(a.op_index, a.zero_point)),
            }
            for a in plan.acts.values()
        ],
        calibrated=list(tables.calibrated),
        biases=[_bias_entry(b) for b in tables.biases.values()],
        batchnorms=[
            {
                "layer": b["layer"],
                "op": "DEPTHWISE_CONV_2D 1x1 (per-channel multiply-add)",
                "input_scale": float(b["s_in"]),
                "max_abs_residual": float(np.max(np.abs(b["residual"]))),
                "exact": bool(np.all(np.abs(b["residual"]) < 1e-3)),
            }
            for b in tables.bn_biases.values()
        ],
        fixed=list(tables.fixed),
        derived=list(tables.derived),
        clamps=clamps,
        relus=relus,
        options={"input_type": input_type, "output_type": output_type, "storage": storage},
        file_bytes=len(tflite),
    )
    return (tflite, report) if return_report else tflite


def save_tflite(model, path, calibration_data=None, **kwargs):
    """Write ``to_tflite(model, calibration_data, **kwargs)`` to ``path``; return the report."""
    tflite, report = to_tflite(model, calibration_data, return_report=True, **kwargs)
    with open(path, "wb") as f:
        f.write(tflite)
    report["path"] = str(path)
    return report


def float_tflite(model):
    """A float32 ``.tflite`` of the model's float version (quantizers removed).

    Float kernels (not quantized), no FakeQuant, no optimization: the size
    reference for the integer file.
    """
    plan = Plan(model, storage="int8")
    fn, _ = trace(Builder(plan, "float"), input_specs(model))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
    return converter.convert()


def _kernel_entry(p):
    k = p.exported_integers()
    return {
        "layer": p.layer_name,
        "kind": p.kind,
        "quantizer": p.quantizer,
        "family": p.family,
        "bits": p.bits,
        "step": p.step,
        "allowed": [-p.n_allowed, p.n_allowed],
        "range": [int(k.min()), int(k.max())],
        "storage": p.storage,
        "storage_note": p.storage_note,
        "input_channels": p.in_channels,
        "scale": "per-channel d*|s_c|" if p.per_channel else "per-tensor d",
        "folded_batchnorm": p.bn_name,
        "negative_bn_channels": int(np.sum(p.channel_factor < 0)) if p.per_channel else 0,
        "count": p.count,
        # the file holds k 2^j at scale / 2^j where the multiplier needed it (KernelPlan.fit_multiplier)
        "stored_multiple": 1 if p.spread is None else int(np.max(p.spread)),
    }
