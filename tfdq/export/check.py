"""Reading the converted file back: the learned integers, scales and types must be there.

:func:`check_file` raises :class:`~tfdq.export.plan.ExportError` unless every
kernel holds the planned integers with the planned scale and storage type,
every int8 activation tensor carries a scale that a learned quantizer or the
calibration chose, every planned int32 bias arrived (within the converter's
float32 arithmetic, :func:`bias_float32_tolerance`) and no operator computes
in float.
"""

from __future__ import annotations

import numpy as np

from tfdq.export.flatbuffer import find_bias, find_kernel, float_ops, unpack_integers
from tfdq.export.plan import ExportError

BIAS_EXACT_BELOW = 2**22  # int32 biases below this survive the converter's float32 arithmetic exactly


def bias_float32_tolerance(integer):
    """How far the converter may move each planned int32 bias.

    The TFLite converter receives the bias as a float32 constant and divides
    it by its scale in float32, so an int32 bias of magnitude ``|B|`` can
    come out ``|B| 2^-22`` units off (float32 has 24 significant bits). Below
    2^22 it is exact; above, the difference is at most a few parts in 10^7
    of the channel's constant, e.g. a channel whose BatchNorm gamma is near
    zero (its output is the constant beta), where it moves no output step.
    """
    return np.floor(np.abs(np.asarray(integer, np.float64)) / BIAS_EXACT_BELOW).astype(np.int64)


def kernel_scale_error(tensor, kplan):
    """Largest relative difference between a kernel tensor's scales in the file and the planned
    ``d`` / ``d |s_c|`` (one file scale stands for every channel; ``inf`` if the counts differ)."""
    scales = np.asarray(tensor["scales"], np.float64)
    want = kplan.scales()
    if scales.size == 1:
        scales = np.full(want.size, scales[0])
    if scales.size != want.size:
        return float("inf")
    return float(np.max(np.abs(scales / want - 1)))


def check_file(plan, info, tables, tflite_bytes):
    """Raise unless the file holds the planned integers, scales and types.

    ``tables``: the :class:`~tfdq.export.build.BuildTables` of the export
    trace (the calibrated and fixed scales, the planned int32 biases; each
    bias entry gets its ``file_difference``).
    """
    problems = []
    bad = float_ops(info)
    if bad:
        problems.append(f"operators compute in float: {sorted(set(bad))}")
    # Every int8 activation tensor must carry a scale that we chose.
    chosen = [a.step for a in plan.acts.values()]
    chosen += [c["scale"] for c in tables.calibrated] + [f["scale"] for f in tables.fixed]
    chosen += [d["scale"] for d in tables.derived]
    chosen = np.asarray(chosen, np.float64)
    for t in info["tensors"]:
        if t["type"] != "int8" or t["bytes"] or t["scales"].size != 1:
            continue
        if chosen.size == 0 or np.min(np.abs(chosen / t["scales"][0] - 1)) > 1e-6:
            problems.append(
                f"tensor {t['name']!r} has scale {t['scales'][0]:g}, which no learned quantizer "
                "or calibration chose"
            )
    for p in plan.kernels.values():
        t = find_kernel(info, p.op_index)
        if t is None:
            problems.append(f"{p.layer_name}: kernel tensor not found in the file")
            continue
        if t["type"] != p.storage:
            problems.append(f"{p.layer_name}: stored as {t['type']}, planned {p.storage}")
        expected = p.tflite_layout(p.stored_integers())
        if list(expected.shape) != t["shape"]:
            problems.append(f"{p.layer_name}: kernel shape {t['shape']}, expected {list(expected.shape)}")
            continue
        stored = unpack_integers(t, tflite_bytes)
        if not np.array_equal(stored, expected):
            problems.append(
                f"{p.layer_name}: {int(np.sum(stored != expected))} stored integers differ from the "
                f"learned ones (file range [{stored.min()}, {stored.max()}])"
            )
        planned_bias = tables.biases.get(p.op_index)
        if planned_bias is not None:
            bt = find_bias(info, t)
            stored_bias = None if bt is None else unpack_integers(bt, tflite_bytes).reshape(-1)
            if stored_bias is None:  # the converter drops an all-zero bias
                stored_bias = np.zeros(planned_bias["integer"].shape, np.int64)
            planned = planned_bias["integer"].astype(np.int64)
            difference = np.abs(stored_bias - planned)
            planned_bias["file_difference"] = int(np.max(difference, initial=0))
            if np.any(difference > bias_float32_tolerance(planned)):
                worst = int(np.argmax(difference - bias_float32_tolerance(planned)))
                problems.append(
                    f"{p.layer_name}: the int32 bias in the file is not the planned one (channel "
                    f"{worst}: {int(stored_bias[worst])} in the file, {int(planned[worst])} planned)"
                )
        if kernel_scale_error(t, p) >= 1e-5:
            problems.append(
                f"{p.layer_name}: scales {t['scales'][:4]}... differ from the learned {p.scales()[:4]}..."
            )
    if problems:
        raise ExportError(
            "The converter did not keep the learned integers exactly:\n- " + "\n- ".join(problems)
        )
