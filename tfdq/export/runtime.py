"""Running ``.tflite`` files in LiteRT: the one runner that verification, the
training script and the benchmarks share.

Inputs are quantized the way TFLite's QUANTIZE op does it (round half away
from zero, then saturate), so a float batch gives the same integers here as
it would inside the file.
"""

import numpy as np
import tensorflow as tf

from tfdq.export.plan import KERNEL_TAG, ExportError, round_half_away

# XNNPACK takes an int8 operator with weights only when its requantization multiplier
# (input scale x weight scale / output scale, per channel) is below this
XNNPACK_MAX_MULTIPLIER = 256.0
_WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def iter_batches(dataset, batch_size):
    """Yield ``(x, y or None)`` NumPy batches.

    ``dataset`` is an array of inputs, a pair ``(x, y)`` of arrays, or a
    ``tf.data.Dataset`` of ``x`` or ``(x, y)`` elements (its own batching is
    kept).
    """
    if isinstance(dataset, tf.data.Dataset):
        for item in dataset.as_numpy_iterator():
            if isinstance(item, tuple):
                yield np.asarray(item[0]), (np.asarray(item[1]) if len(item) > 1 else None)
            else:
                yield np.asarray(item), None
        return
    if isinstance(dataset, (tuple, list)) and len(dataset) == 2 and np.ndim(dataset[0]) > 1:
        x, y = dataset
    else:
        x, y = dataset, None
    x = np.asarray(x)
    y = None if y is None else np.asarray(y)
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size], (None if y is None else y[start : start + batch_size])


class LiteRTRunner:
    """A single-input ``.tflite`` model in LiteRT, called on float batches.

    ``runner(x)`` quantizes ``x`` when the file's input is int8/uint8,
    resizes the batch dimension when it changes, and returns the first
    output dequantized to float64 (float outputs as they are).

    Args:
        tflite_bytes: the file's contents.
        num_threads: LiteRT's thread count (None: its default).
    """

    def __init__(self, tflite_bytes, num_threads=None):
        from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415 (optional at import time)

        self.interpreter = Interpreter(model_content=tflite_bytes, num_threads=num_threads)
        inputs = self.interpreter.get_input_details()
        if len(inputs) != 1:
            raise ValueError(
                f"LiteRTRunner runs single-input models; this file has {len(inputs)} inputs "
                "(call ai_edge_litert's Interpreter directly for several)."
            )
        self.shape = None
        self._details()

    def _details(self):
        self.inp = self.interpreter.get_input_details()[0]
        self.out = self.interpreter.get_output_details()[0]
        self.in_scale, self.in_zp = self.inp["quantization"]
        self.out_scale, self.out_zp = self.out["quantization"]

    @property
    def output_scale(self):
        """The output's quantization step (None for a float output)."""
        return float(self.out_scale) if self.out["dtype"] in (np.int8, np.uint8) else None

    def quantize_input(self, x):
        """``x`` as the file's input type (TFLite's QUANTIZE: round half away, saturate)."""
        x = np.asarray(x, np.float32)
        dtype = self.inp["dtype"]
        if dtype not in (np.int8, np.uint8):
            return x.astype(dtype)
        info = np.iinfo(dtype)
        q = round_half_away(x.astype(np.float64) / self.in_scale) + self.in_zp
        return np.clip(q, info.min, info.max).astype(dtype)

    def __call__(self, x):
        x = np.asarray(x, np.float32)
        if self.shape != x.shape:
            self.interpreter.resize_tensor_input(self.inp["index"], list(x.shape))
            self.interpreter.allocate_tensors()
            self._details()
            self.shape = x.shape
        self.interpreter.set_tensor(self.inp["index"], self.quantize_input(x))
        self.interpreter.invoke()
        y = np.array(self.interpreter.get_tensor(self.out["index"]))
        if self.out["dtype"] in (np.int8, np.uint8):
            y = (y.astype(np.float64) - self.out_zp) * self.out_scale
        return y


def xnnpack_delegated(tflite_bytes, layer_names=None):
    """For each operator of the file (flatbuffer order), whether LiteRT's XNNPACK delegate runs it.

    Asked of the runtime, not assumed: the file is loaded with LiteRT's
    default delegates and node fusion disabled, so that XNNPACK replaces
    every operator it accepts by a DELEGATE node of its own; an operator is
    delegated when a DELEGATE node produces all its outputs.

    Raises :class:`~tfdq.export.plan.ExportError` naming the operators
    (``layer_names``: the planned kernels' layer names by op index, as
    :attr:`KernelPlan.op_index`) when XNNPACK refuses the file because a
    requantization multiplier reaches 256 (:func:`large_multipliers`).
    """
    from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415

    interpreter = Interpreter(model_content=tflite_bytes, experimental_disable_delegate_node_fusion=True)
    try:
        interpreter.allocate_tensors()  # the default delegates apply here
    except RuntimeError as err:
        large = large_multipliers(tflite_bytes)
        if not large:
            raise
        layer_names = layer_names or {}
        names = "; ".join(
            f"{layer_names.get(m['kernel_op'], m['output'])!r} ({m['op']}, channel {m['channel']}: "
            f"{m['multiplier']:.4g})"
            for m in large[:8]
        )
        raise ExportError(
            f"LiteRT's XNNPACK delegate refused the file ({err}). XNNPACK takes an operator's "
            f"requantization multiplier (input scale x kernel scale / output scale) below "
            f"{XNNPACK_MAX_MULTIPLIER:g}; {len(large)} operator(s) need more: {names}. A BatchNormalization "
            "folded into a kernel with a near-zero moving variance on a channel whose learned integers "
            "are not all zero gives such a scale (d gamma / sqrt(var + eps)): re-estimate the BatchNorm "
            "statistics on representative data (tfdq.recalibrate_batchnorm) or train longer, then export."
        ) from err
    nodes = interpreter._get_ops_details()  # noqa: SLF001 (the only view of the execution graph)
    produced = set()
    for node in nodes:
        if node["op_name"] == "DELEGATE":
            produced.update(int(i) for i in node["outputs"])
    return [
        bool(len(node["outputs"])) and all(int(i) in produced for i in node["outputs"])
        for node in nodes
        if node["op_name"] != "DELEGATE"
    ]


def large_multipliers(tflite_bytes, limit=XNNPACK_MAX_MULTIPLIER):
    """Operators with weights whose requantization multiplier reaches ``limit``.

    The multiplier of output channel ``c`` is ``s_x s_k[c] / s_y`` (input,
    kernel and output scales as the file holds them). Returns one dict per
    such operator (flatbuffer order): ``index``, ``op``, ``output`` (its
    output tensor's name), ``kernel_op`` (the Keras op index in its kernel's
    ``tfdq_k`` tag, or None), ``channel`` and ``multiplier`` (the largest).
    """
    import re  # noqa: PLC0415

    from tfdq.export.flatbuffer import inspect_tflite  # noqa: PLC0415

    info = inspect_tflite(tflite_bytes)
    tensors = info["tensors"]
    found = []
    for index, op in enumerate(info["ops"]):
        if op["op"] not in _WEIGHTED_OPS or len(op["inputs"]) < 2 or not op["outputs"]:
            continue
        x, k, y = (tensors[i] for i in (op["inputs"][0], op["inputs"][1], op["outputs"][0]))
        if not (x["scales"].size and k["scales"].size and y["scales"].size):
            continue
        mult = x["scales"][0] * k["scales"] / y["scales"][0]
        channel = int(np.argmax(mult))
        if mult[channel] >= limit:
            name = y["name"].split(";")[0]
            tag = re.search(KERNEL_TAG + r"(\d+)", k["name"])
            found.append(
                {
                    "index": index,
                    "op": op["op"],
                    "output": name,
                    "kernel_op": int(tag.group(1)) if tag else None,
                    "channel": channel,
                    "multiplier": float(mult[channel]),
                }
            )
    return found


def predict(tflite_bytes, x, batch_size=250, num_threads=None):
    """The file's (dequantized) outputs on the inputs ``x``, in batches."""
    runner = LiteRTRunner(tflite_bytes, num_threads)
    return np.concatenate([runner(xb) for xb, _ in iter_batches(np.asarray(x), batch_size)])


def accuracy(tflite_bytes, dataset, batch_size=250, num_threads=None):
    """Top-1 accuracy of the file on ``(x, y)`` arrays or a dataset of ``(x, y)`` batches."""
    runner = LiteRTRunner(tflite_bytes, num_threads)
    correct = total = 0
    for xb, yb in iter_batches(dataset, batch_size):
        if yb is None:
            raise ValueError("accuracy needs labels: pass (x, y) or a dataset of (x, y) batches.")
        pred = np.argmax(runner(xb).reshape(len(xb), -1), axis=-1)
        correct += int(np.sum(pred == np.asarray(yb).reshape(-1)))
        total += len(xb)
    return correct / max(total, 1)
