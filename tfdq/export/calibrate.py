"""Calibration: the ranges of the tensors that no learned quantizer covers.

A :class:`~tfdq.export.build.Builder` in ``"calibrate"`` mode marks every
such tensor; :func:`collect_stats` runs the user's calibration data through
that graph and records each tensor's largest magnitude and minimum, from
which the export chooses its scale.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfdq.export.build import Builder
from tfdq.export.plan import ExportError


def input_specs(model):
    """One float32 ``tf.TensorSpec`` per model input, batch dimension open."""
    specs = []
    for t in model.inputs:
        shape = list(t.shape)
        shape[0] = None
        specs.append(tf.TensorSpec(shape, tf.float32))
    return specs


def _inputs_only(data):
    """The inputs of ``(x, y)`` / ``(x, y, w)`` tuples; arrays pass unchanged."""
    if isinstance(data, tuple) and len(data) in (2, 3) and np.ndim(data[0]) > 1:
        return data[0]
    return data


def as_batches(data, batch_size=256, limit=None):
    """Yield float32 input batches (a list, one array per model input)."""
    seen = 0
    if isinstance(data, tf.data.Dataset):
        for item in data.as_numpy_iterator():
            if limit is not None and seen >= limit:
                return
            x = _inputs_only(item)
            x = [np.asarray(v, np.float32) for v in (x if isinstance(x, (list, tuple)) else [x])]
            seen += len(x[0])
            yield x
        return
    data = _inputs_only(data)
    arrays = [np.asarray(a, np.float32) for a in (data if isinstance(data, list) else [data])]
    n = len(arrays[0]) if limit is None else min(limit, len(arrays[0]))
    for start in range(0, n, batch_size):
        yield [a[start : min(start + batch_size, n)] for a in arrays]


def collect_stats(plan, calibration_data, max_samples):
    """Per calibration point: ``{"max_abs", "min", "samples"}`` over ``calibration_data``."""
    builder = Builder(plan, "calibrate")
    specs = input_specs(plan.model)
    traced = {}

    @tf.function(input_signature=specs, autograph=False)
    def probe(*xs):
        _, tables = builder.run(list(xs))
        traced["names"] = list(tables.points)
        # reduced in the graph: a batch's max |value| and min per point, not every calibrated map
        # of the batch brought out at once (exact, so the statistics are those of the maps)
        return {
            n: (tf.reduce_max(tf.abs(v)), tf.reduce_min(v), tf.shape(v)[0]) for n, v in tables.points.items()
        }

    concrete = probe.get_concrete_function()
    names = traced["names"]
    if not names:
        return {}
    if calibration_data is None:
        raise ExportError(
            "These tensors have no learned quantizer and need a scale calibrated on "
            "data: " + ", ".join(names) + ". Pass calibration_data= (a few hundred "
            "training inputs) to to_tflite, or let tfdq.quantize_model place learned "
            "quantizers there."
        )
    stats = {n: {"max_abs": 0.0, "min": float("inf"), "samples": 0} for n in names}
    for batch in as_batches(calibration_data, limit=max_samples):
        if len(batch) != len(specs) or any(b.shape[1:] != tuple(s.shape[1:]) for b, s in zip(batch, specs)):
            raise ExportError(
                f"calibration_data has inputs of shape {[b.shape[1:] for b in batch]}; the "
                f"model takes {[tuple(s.shape[1:]) for s in specs]}."
            )
        out = concrete(*[tf.constant(b) for b in batch])
        for n in names:
            max_abs, lo, count = (t.numpy() for t in out[n])
            s = stats[n]
            s["max_abs"] = max(s["max_abs"], float(max_abs))
            s["min"] = min(s["min"], float(lo))
            s["samples"] += int(count)
    if not any(s["samples"] for s in stats.values()):
        raise ExportError("calibration_data is empty.")
    return stats
