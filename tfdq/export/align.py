"""Bias alignment: the one export step that changes the model.

TFLite adds an integer bias to each accumulator; a folded BatchNorm's bias
is in general not a whole number of accumulator units. :func:`align_biases`
moves each BatchNorm's beta by less than one unit so that the Keras model
computes exactly what the integer file computes.
"""

from __future__ import annotations

import keras
import numpy as np

from tfdq.export.convert import trace_export
from tfdq.export.plan import resolve_storage


def align_biases(
    model: keras.Model,
    calibration_data=None,
    *,
    storage: str | None = None,
    int4_kernels: bool | None = None,
    calibration_samples: int = 1000,
) -> list[dict]:
    """Move each folded BatchNorm's beta so that the file's int32 bias is exact.

    TFLite adds an integer bias to the accumulator (unit ``u_c = s_in d
    |s_c|``); the Keras layer adds ``B_c = folded_bias_c / u_c`` units, in
    general not an integer, so the file would round it (up to half a unit)
    and outputs near a rounding threshold come out one step off. This sets
    ``beta_c += (round(B_c - w_c) - (B_c - w_c)) u_c`` (``w_c``: the shift of
    LiteRT's two-rounding int4 convolutions, see
    :meth:`KernelPlan.accumulator_bias`; zero for every kernel that XNNPACK
    runs, the int4/int2 FULLY_CONNECTED included), so that the Keras model itself
    computes what the integer file computes. Each beta moves by at most half
    an accumulator unit (the report gives it in output steps too).

    Call it once training is over (BatchNorm statistics and quantizers fixed:
    after :func:`tfdq.constraints.freeze_quantizers` and the last ``fit``),
    with the same ``storage`` as the export (the shift follows the
    storage each layer gets under it); save the aligned model if
    you want to reproduce the file. Layers without BatchNorm already have
    exact biases (their ``Q(bias)`` lies on the step ``d`` grid).

    Args:
        model: a trained tfdq model; changed in place.
        calibration_data: as for :func:`to_tflite` (needed when a layer's
            input has no learned quantizer).
        storage, int4_kernels, calibration_samples: as for :func:`to_tflite`.

    Returns:
        A list of dicts, one per BatchNorm-folded layer: ``layer``,
        ``batchnorm``, ``aligned`` (False, with a ``reason``, for a
        BatchNormalization without beta: its bias stays rounded),
        ``max_beta_change``, ``max_change_output_steps`` (None where no
        learned quantizer takes the layer's output, so there is no output
        step; never NaN) and ``max_change_accumulator_units``.
    """
    storage = resolve_storage(storage, int4_kernels)
    plan, tables, _, _ = trace_export(model, calibration_data, storage, calibration_samples)
    changes = []
    layers_by_path = {op.path: op.layer for op in plan.ops}
    for index, b in tables.biases.items():
        kplan = plan.kernels[index]
        if kplan.bn_name is None:
            continue
        bn = layers_by_path[kplan.bn_name]
        delta = -b["residual"] * b["unit"]
        step = b["s_out"]  # None: no learned quantizer takes the output (then in accumulator units only)
        if not bn.center:
            # no beta to move: this layer's bias stays rounded (the report says so)
            changes.append(
                {
                    "layer": kplan.layer_name,
                    "batchnorm": kplan.bn_name,
                    "aligned": False,
                    "reason": "BatchNormalization(center=False) has no beta",
                    "max_beta_change": 0.0,
                    "max_change_output_steps": 0.0,
                }
            )
            continue
        bn.beta.assign((np.asarray(bn.beta.numpy(), np.float64) + delta).astype(np.float32))
        changes.append(
            {
                "layer": kplan.layer_name,
                "batchnorm": kplan.bn_name,
                "aligned": True,
                "max_beta_change": float(np.max(np.abs(delta))),
                "max_change_output_steps": None if step is None else float(np.max(np.abs(delta)) / step),
                "max_change_accumulator_units": float(np.max(np.abs(b["residual"]))),
            }
        )
    changes += _align_standalone_batchnorms(plan, tables, layers_by_path)
    return changes


def _align_standalone_batchnorms(plan, tables, layers_by_path):
    """align_biases for BatchNorms exported on their own (:class:`BatchNormPlan`): beta moves so that
    ``b_c`` is a whole number of accumulator units."""
    changes = []
    for index, b in tables.bn_biases.items():
        bplan = plan.standalone_bn.get(index)
        if bplan is None:
            continue  # the gamma/beta step of a decomposed LayerNormalization
        bn = layers_by_path[bplan.layer_name]
        if not isinstance(bn, keras.layers.BatchNormalization):
            continue  # a per-channel Rescaling / Normalization: fixed constants, its bias stays rounded
        entry = {"layer": bplan.layer_name, "batchnorm": bplan.layer_name, "standalone": True}
        if not bn.center:
            changes.append(
                dict(
                    entry,
                    aligned=False,
                    reason="BatchNormalization(center=False) has no beta",
                    max_beta_change=0.0,
                    max_change_output_steps=None,
                )
            )
            continue
        delta = -b["residual"] * b["unit"]
        bn.beta.assign((np.asarray(bn.beta.numpy(), np.float64) + delta).astype(np.float32))
        step = plan.downstream_step(plan.ops_by_index[index].outputs[0])
        changes.append(
            dict(
                entry,
                aligned=True,
                max_beta_change=float(np.max(np.abs(delta))),
                max_change_output_steps=None if step is None else float(np.max(np.abs(delta)) / step),
                max_change_accumulator_units=float(np.max(np.abs(b["residual"]))),
            )
        )
    return changes
