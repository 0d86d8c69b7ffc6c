"""Verification: run the ``.tflite`` in LiteRT next to the Keras model."""

from __future__ import annotations

import numpy as np

from tfdq.export.check import kernel_scale_error
from tfdq.export.flatbuffer import find_kernel, float_ops, inspect_tflite, unpack_integers
from tfdq.export.plan import INT4_MAX, Plan, resolve_storage, round_half_away
from tfdq.export.runtime import LiteRTRunner, iter_batches, xnnpack_delegated
from tfdq.export.storage import kernel_storage

# ---------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------


class VerificationReport(dict):
    """Result of :func:`verify` (a dict, JSON-serializable); ``format()`` prints it."""

    def format(self):
        return _format_verification(self)


def size_report(model, tflite_bytes):
    """Sizes in bytes: the file, its kernels (by storage type), and references.

    ``int8_kernel_bytes``: every kernel weight at 8 bits;
    ``mixed_int4_int8_bytes``: ``sum n_l (4 if b_l <= 4 else 8) / 8``;
    ``learned_packed_bytes``: ``sum n_l b_l / 8``.
    """
    plan = Plan(model, storage="smallest")
    info = inspect_tflite(tflite_bytes)
    file_kernel = {"int2": 0, "int4": 0, "int8": 0, "other": 0}
    for p in plan.kernels.values():
        t = find_kernel(info, p.op_index)
        if t is not None:
            file_kernel[t["type"] if t["type"] in file_kernel else "other"] += t["bytes"]
    count = sum(p.count for p in plan.kernels.values())
    return {
        "file_bytes": len(tflite_bytes),
        "kernel_count": count,
        "kernel_bytes_in_file": sum(file_kernel.values()),
        "kernel_bytes_by_storage": file_kernel,
        "int8_kernel_bytes": count,
        "mixed_int4_int8_bytes": sum(
            p.count * (4 if p.n_allowed <= INT4_MAX else 8) / 8 for p in plan.kernels.values()
        ),
        "learned_packed_bytes": sum(p.count * p.bits / 8 for p in plan.kernels.values()),
        "float32_kernel_bytes": 4 * count,
    }


def _check_kernels(plan, info, tflite_bytes, interpreter, expected_storage_by_layer):
    layers = []
    in_file = kernel_storage(
        plan, info, xnnpack_delegated(tflite_bytes, {p.op_index: p.layer_name for p in plan.kernels.values()})
    )
    for p in plan.kernels.values():
        t = find_kernel(info, p.op_index)
        entry = {
            "layer": p.layer_name,
            "quantizer": p.quantizer,
            "bits": p.bits,
            "allowed": [-p.n_allowed, p.n_allowed],
            "count": p.count,
            "folded_batchnorm": p.bn_name,
        }
        if t is None:
            entry.update(found=False, ok=False)
            layers.append(entry)
            continue
        # The flatbuffer says how they are stored; the interpreter's view of an int4/int2 tensor
        # may be unpacked to int8 (compared where it has one value per weight).
        from_buffer = unpack_integers(t, tflite_bytes)
        values = np.asarray(interpreter.get_tensor(t["index"])).astype(np.int64)
        interpreter_view = values.size == from_buffer.size
        if not interpreter_view:
            values = from_buffer
        p.spread_from_file(t["scales"])  # channels stored as k 2^j at scale / 2^j (KernelPlan.fit_multiplier)
        scale_err = kernel_scale_error(t, p)
        want = p.scales()
        # round(w / scale) of the Keras model's quantized (BatchNorm-folded) weights
        w = p.folded_kernel().astype(np.float64)
        if p.kind == "depthwise":
            expected = round_half_away(w / want).reshape(p.k.shape)
        else:
            expected = round_half_away(w / (want if p.per_channel else want[0]))
        expected = p.tflite_layout(expected.astype(np.int64))
        if (
            expected.size == values.size
        ):  # a 1x1 convolution is [C_out, 1, 1, C_in] or, as FULLY_CONNECTED, [C_out, C_in]
            expected = expected.reshape(values.shape)
        mism = int(np.sum(values != expected)) if values.shape == expected.shape else -1
        expected_storage = expected_storage_by_layer.get(p.layer_name)
        if expected_storage is None:  # no policy given: any type that holds the learned range
            storage_ok = p.n_allowed <= {"int2": 1, "int4": INT4_MAX}.get(t["type"], 127)
        else:
            storage_ok = t["type"] == expected_storage
        entry.update(
            found=True,
            tensor=t["name"],
            storage=t["type"],
            expected_storage=expected_storage,
            bytes=t["bytes"],
            op=in_file.get(p.op_index, {}).get("op"),
            xnnpack=in_file.get(p.op_index, {}).get("xnnpack"),
            storage_note=p.storage_note,
            file_range=[int(values.min()), int(values.max())],
            within_range=bool(np.max(np.abs(values)) <= p.stored_max),
            stored_multiple=1 if p.spread is None else int(np.max(p.spread)),
            integers_equal_learned=mism == 0,
            mismatches=mism,
            interpreter_matches_buffer=bool(np.array_equal(values.reshape(-1), from_buffer.reshape(-1))),
            scale_max_rel_error=scale_err,
        )
        entry["ok"] = bool(
            entry["within_range"]
            and entry["integers_equal_learned"]
            and storage_ok
            and scale_err < 1e-5
            and entry["interpreter_matches_buffer"]
        )
        layers.append(entry)
    return layers


# Examples per eager Keras call in verify. An eager call of a Functional model keeps every
# intermediate map of its batch until it returns (about 18 MB per example for a quantized
# Xception at 71x71: 4.6 GB for 256 examples); in inference mode each example's output does not
# depend on the others, so chunks give the batch's outputs at a fraction of the memory.
KERAS_CHUNK = 32


def keras_outputs(model, x, chunk=KERAS_CHUNK):
    """``model(x, training=False)`` as float64 NumPy, run eagerly ``chunk`` examples at a time."""
    return np.concatenate(
        [
            np.asarray(model(x[i : i + chunk], training=False), np.float64)
            for i in range(0, max(len(x), 1), chunk)
        ]
    )


def verify(
    model,
    tflite_bytes: bytes,
    dataset,
    *,
    batch_size: int = 250,
    export_report: dict | None = None,
    storage: str | None = None,
    int4_kernels: bool | None = None,
    num_threads: int | None = None,
) -> VerificationReport:
    """Run the ``.tflite`` in LiteRT next to the Keras model and compare.

    Args:
        model: the tfdq Keras model the file was exported from.
        tflite_bytes: the file's bytes (from :func:`to_tflite`).
        dataset: ``(x, y)`` arrays, inputs only, or a ``tf.data.Dataset`` of
            ``(x, y)`` batches (streamed).
        export_report: optional :class:`ExportReport`; its calibrated tensors
            are copied into the result and its kernels' storage is the
            expected one.
        storage: the export's storage policy, for the expected storage
            when no ``export_report`` is given (``None`` with neither: any
            type that holds the learned range is accepted).
        int4_kernels: deprecated alias (``True``: ``"smallest"``, ``False``: ``"int8"``).

    Returns a :class:`VerificationReport`: top-1 agreement, accuracy of both
    (when labels are given), the max abs output difference in units of the
    output scale, and per quantized layer: learned bits, allowed integer
    range, the range found in the file, its storage (int2/int4/int8), its
    operator and whether LiteRT's XNNPACK delegate runs it (asked of the
    runtime: :func:`~tfdq.export.runtime.xnnpack_delegated`), whether the
    integers equal ``round(w / scale)`` of the Keras model's quantized
    (BatchNorm-folded) weights, and the largest relative scale error.
    LiteRT runs with its default op resolver (XNNPACK where it applies).
    """
    expected = {}
    if export_report is not None and export_report.get("kernels"):
        expected = {k["layer"]: k["storage"] for k in export_report["kernels"]}
        policy = export_report.get("options", {}).get("storage") or resolve_storage(storage, int4_kernels)
    elif storage is not None or int4_kernels is not None:
        policy = resolve_storage(storage, int4_kernels)
        expected = {p.layer_name: p.storage for p in Plan(model, storage=policy).kernels.values()}
    else:
        policy = resolve_storage()
    plan = Plan(model, storage=policy)
    info = inspect_tflite(tflite_bytes)
    runner = LiteRTRunner(tflite_bytes, num_threads)
    runner.interpreter.allocate_tensors()
    layers = _check_kernels(plan, info, tflite_bytes, runner.interpreter, expected)

    n = agree = keras_correct = tfl_correct = ties = 0
    labelled = True
    max_diff = 0.0
    for xb, yb in iter_batches(dataset, batch_size):
        keras_out = keras_outputs(model, xb)
        tfl_out = runner(xb)
        kt, tt = np.argmax(keras_out, axis=-1), np.argmax(tfl_out, axis=-1)
        n += len(xb)
        agree += int(np.sum(kt == tt))
        top = np.max(tfl_out, axis=-1, keepdims=True)
        ties += int(np.sum(np.sum(tfl_out == top, axis=-1) > 1))
        max_diff = max(max_diff, float(np.max(np.abs(tfl_out - keras_out))))
        if yb is None:
            labelled = False
        else:
            yb = np.asarray(yb).reshape(-1)
            keras_correct += int(np.sum(kt == yb))
            tfl_correct += int(np.sum(tt == yb))
    if n == 0:
        raise ValueError("verify: the dataset is empty.")
    out_scale = runner.output_scale
    if out_scale is None:  # float output: the scale of the int8 tensor its DEQUANTIZE reads
        out_index = info["outputs"][0]
        for o in info["ops"]:
            if o["op"] == "DEQUANTIZE" and out_index in o["outputs"]:
                scales = info["tensors"][o["inputs"][0]]["scales"]
                out_scale = float(scales[0]) if scales.size else None
    report = VerificationReport(
        samples=n,
        top1_agreement=agree / n,
        disagreements=n - agree,
        tied_top_outputs=ties,
        keras_accuracy=keras_correct / n if labelled else None,
        tflite_accuracy=tfl_correct / n if labelled else None,
        output_scale=out_scale,
        max_abs_output_diff=max_diff,
        max_abs_output_diff_in_output_steps=None if out_scale is None else max_diff / out_scale,
        layers=layers,
        float_ops=float_ops(info),
        sizes=size_report(model, tflite_bytes),
        calibrated=list(export_report.get("calibrated", [])) if export_report is not None else None,
    )
    report["all_kernels_exact"] = bool(all(entry.get("ok") for entry in layers))
    report["notes"] = _runtime_notes(plan, info, export_report)
    return report


def _runtime_notes(plan, info, export_report=None):
    """Known differences between LiteRT's integer kernels and the Keras model."""
    notes = []
    biases = (export_report or {}).get("biases")
    if biases is None:
        return _tie_notes(plan)
    inexact = [b["layer"] for b in biases if not b["exact"]]
    if inexact:
        notes.append(
            "The int32 biases of " + ", ".join(inexact) + " are rounded (up to half an "
            "accumulator unit; an output near a rounding threshold can come out one step off). "
            "tfdq.export.align_biases(model, calibration_data, storage=...) before the export "
            "makes the Keras model compute what the file computes."
        )
    kernels = (export_report or {}).get("kernels") or [
        {"layer": p.layer_name, "storage_note": p.storage_note} for p in plan.kernels.values()
    ]
    for k in kernels:
        if k.get("storage_note"):
            notes.append(f"{k['layer']} stored {k['storage_note']}.")
    notes.extend(_tie_notes(plan))
    return notes


def _tie_notes(plan):
    """Signed quantizers whose tie rule differs from the file's operator before them.

    The file's ADD / SUB (XNNPACK) rounds a requantized sum half up, as do the
    QUANTIZE ops before a concatenation and a pooling's nudged
    DEPTHWISE_CONV_2D; every other requantization rounds ties away from zero,
    as the quantizer does. ``quantize_model`` sets ``ties="up"`` there; a model quantized
    before that rule (or edited by hand) differs at exact negative halves.
    """
    from tfdq import registry  # noqa: PLC0415
    from tfdq.quantize import AVERAGING  # noqa: PLC0415

    producers = {k: op for op in plan.ops for k in op.outputs}
    away, up = [], []
    for op in plan.ops:
        act = plan.acts.get(op.index)
        if act is None or not act.signed:
            continue
        src = producers.get(op.inputs[0])
        after_sum = src is not None and (
            registry.is_integer_sum(src.layer, src.node)
            or registry.is_concatenation(src.layer)
            or isinstance(src.layer, AVERAGING)
        )
        ties = getattr(op.layer, "ties", "away")
        if after_sum and ties != "up":
            away.append(op.path)
        elif not after_sum and ties == "up":
            up.append(op.path)
    notes = []
    if away:
        notes.append(
            "The quantizers after sums " + ", ".join(away) + " round ties away from zero, LiteRT's "
            "XNNPACK ADD/SUB rounds them up (negative halves come out one step higher in the file): "
            "set layer.ties = 'up' on them (quantize_model does) and re-export."
        )
    if up:
        notes.append(
            "The quantizers " + ", ".join(up) + " round ties up but follow no sum; the file rounds "
            "their ties away from zero: set layer.ties = 'away'."
        )
    return notes


def _format_verification(r):
    lines = []
    lines.append(f"LiteRT vs Keras on {r['samples']} inputs")
    lines.append(f"  top-1 agreement        {100 * r['top1_agreement']:.2f}% ({r['disagreements']} differ)")
    lines.append(f"  tied top outputs       {r['tied_top_outputs']} (the file's largest output occurs twice)")
    if r.get("keras_accuracy") is not None:
        lines.append(f"  accuracy Keras         {100 * r['keras_accuracy']:.2f}%")
        lines.append(f"  accuracy TFLite        {100 * r['tflite_accuracy']:.2f}%")
    if r.get("max_abs_output_diff_in_output_steps") is not None:
        lines.append(
            f"  max |output diff|      {r['max_abs_output_diff_in_output_steps']:.2f} output steps "
            f"(scale {r['output_scale']:g})"
        )
    else:
        lines.append(f"  max |output diff|      {r['max_abs_output_diff']:.4g}")
    lines.append(f"  float operators        {r['float_ops'] or 'none'}")
    lines.append("")
    lines.append(
        f"  {'layer':<34} {'bits':>4} {'allowed':>11} {'in file':>11} {'storage':>7} {'exact':>5} {'bytes':>7}"
        f" {'operator':>17} {'XNNPACK':>7}"
    )
    for l in r["layers"]:
        if not l.get("found"):
            lines.append(f"  {l['layer']:<34} {l['bits']:>4} kernel NOT FOUND in file")
            continue
        lines.append(
            f"  {l['layer'][-34:]:<34} {l['bits']:>4} {str(l['allowed']):>11} {str(l['file_range']):>11} "
            f"{l['storage']:>7} {'yes' if l['ok'] else 'NO':>5} {l['bytes']:>7}"
            f" {str(l.get('op')):>17} {'yes' if l.get('xnnpack') else 'no':>7}"
        )
    for l in r["layers"]:
        if l.get("stored_multiple", 1) > 1:
            lines.append(
                f"  note: {l['layer']}: learned integers stored times up to {l['stored_multiple']} at the "
                "scale divided by as much (the same kernel; keeps the requantization multiplier below "
                "XNNPACK's 256)"
            )
    for note in r.get("notes") or []:
        lines.append(f"  note: {note}")
    for c in r.get("calibrated") or []:
        lines.append(f"  calibrated scale {c['scale']:g} for {c['tensor']}: {c['reason']}")
    s = r["sizes"]
    lines.append("")
    lines.append(f"  file size              {s['file_bytes']} bytes")
    lines.append(
        f"  kernel bytes in file   {s['kernel_bytes_in_file']} (int2 {s['kernel_bytes_by_storage']['int2']}, "
        f"int4 {s['kernel_bytes_by_storage']['int4']}, int8 {s['kernel_bytes_by_storage']['int8']})"
    )
    lines.append(
        f"  int8 weight bytes      {s['int8_kernel_bytes']} ({s['kernel_count']} kernel weights at 8 bits)"
    )
    lines.append(
        f"  int4/int8 nominal      {s['mixed_int4_int8_bytes']:.0f} (sum n (4 if b <= 4 else 8) / 8)"
    )
    lines.append(f"  learned packed size    {s['learned_packed_bytes']:.0f} bytes (sum b*count/8)")
    return "\n".join(lines)
