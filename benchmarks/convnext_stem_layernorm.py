"""Where ConvNeXtTiny's file first departs from Keras: its stem's decomposed LayerNormalization.

The fine-tune's map-by-map comparison (``applications_sweep --finetune
ConvNeXtTiny``) finds the stem's convolution map equal and the stem's
LayerNorm output (``convnext_tiny_stem_aq``) the first map that differs; the
file computes that LayerNorm through six calibrated int8 tensors (mean,
centered, square, variance, rsqrt, normalized) where Keras computes it in
float. This script measures each of those six tensors of the file against the
exact value in float64 NumPy, computed from the stem convolution's map (equal
in Keras and the file), in steps of the tensor's calibrated scale: the largest
error and the share of elements more than half a step off (more than the
tensor's own rounding). Untrained network (``quantize_model`` on 128 digits,
no fine-tune: minutes instead of ten), 16 held-out digits::

    python -m benchmarks.convnext_stem_layernorm    # results/convnext_stem_layernorm.json
"""

from __future__ import annotations

import numpy as np

from benchmarks import applications_sweep as sweep

KINDS = ("mean", "centered", "square", "variance", "rsqrt", "normalized")


def run(n_calibration=128, n_eval=16, seed=0):
    """A JSON-ready dict: the first learned maps' offsets and each LayerNorm tensor's error."""
    import keras  # noqa: PLC0415
    from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415

    import tfdq  # noqa: PLC0415

    keras.utils.set_random_seed(seed)
    x, _ = sweep.digits(32)
    calib, xv = x[:n_calibration], x[-n_eval:]
    qmodel = tfdq.quantize_model(sweep.build("ConvNeXtTiny"), calibration_data=calib, strict=True)
    tfdq.export.align_biases(qmodel, calib)
    tflite, report = tfdq.export.to_tflite(qmodel, calib, return_report=True)
    maps = sweep.map_offsets(qmodel, tflite, xv)[:3]

    stem = qmodel.get_layer("convnext_tiny_stem")
    conv_map = sweep.quantizer_outputs(qmodel, xv)[id(stem.get_layer("convnext_tiny_stem_conv_aq"))]
    c = np.asarray(conv_map, np.float64)
    eps = stem.get_layer("convnext_tiny_stem_layernorm").epsilon
    mean = c.mean(-1, keepdims=True)
    centered = c - mean
    square = centered**2
    variance = square.mean(-1, keepdims=True)
    rsqrt = 1.0 / np.sqrt(variance + eps)
    exact = dict(
        mean=mean,
        centered=centered,
        square=square,
        variance=variance,
        rsqrt=rsqrt,
        normalized=centered * rsqrt,
    )

    it = Interpreter(model_content=tflite, experimental_preserve_all_tensors=True)
    inp = it.get_input_details()[0]
    it.resize_tensor_input(inp["index"], list(xv.shape))
    it.allocate_tensors()
    s, zp = inp["quantization"]
    q = np.sign(xv / s) * np.floor(np.abs(xv / s) + 0.5) + zp
    it.set_tensor(inp["index"], np.clip(q, -128, 127).astype(np.int8))
    it.invoke()
    int8 = [t for t in it.get_tensor_details() if t["dtype"] == np.int8]
    tensors = []
    for cal in report["calibrated"]:
        name = cal["tensor"]
        if not name.startswith("convnext_tiny_stem/") or name.split(":")[1] not in KINDS:
            continue
        want = exact[name.split(":")[1]]
        scale, zero = cal["scale"], cal["zero_point"]
        row = {"tensor": name, "scale": scale, "max_steps": None, "share_over_half_step": None}
        for t in int8:  # the file's tensor with this scale, zero point and shape
            ts, tz = t["quantization"]
            if tz != zero or abs(ts / scale - 1) > 1e-6 or tuple(t["shape"]) != want.shape:
                continue
            got = (it.get_tensor(t["index"]).astype(np.float64) - tz) * ts
            err = np.abs(got - want) / scale
            row.update(max_steps=float(err.max()), share_over_half_step=float(np.mean(err > 0.5 + 1e-9)))
            break
        tensors.append(row)
    return {"maps": maps, "stem_layernorm": tensors, "n_eval": n_eval, "n_calibration": n_calibration}


def main():
    from benchmarks.common import write_result  # noqa: PLC0415

    result = run()
    for m in result["maps"]:
        print(f"{m['layer']:40s} max {m['max_steps']} steps, mean {m['mean_steps']:.4f}")
    for t in result["stem_layernorm"]:
        print(
            f"{t['tensor']:60s} max {t['max_steps']:.2f} steps, over half a step: {t['share_over_half_step']:.4f}"
        )
    write_result(
        sweep.RESULTS,
        "convnext_stem_layernorm",
        "ConvNeXtTiny (untrained): the stem LayerNorm's calibrated int8 tensors against float64",
        "python -m benchmarks.convnext_stem_layernorm",
        result,
    )


if __name__ == "__main__":
    main()
