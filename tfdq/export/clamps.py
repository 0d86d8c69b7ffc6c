"""Clamps at a grid point as int8 requantizations that LiteRT's XNNPACK delegate runs.

The exporter clamps int8 tensors at a point of their own grid: a signed
activation quantizer (zero point ``n - 128``, so saturation clamps at
``-n d``) at ``+n d``, the model input's quantizer (zero point -128) at
``n d``, PReLU's negative part at 0. The TFLite converter writes each such
clamp as an int8 ``MINIMUM`` (or ``MAXIMUM``) of the tensor and a scalar
constant on the same scale. LiteRT's XNNPACK delegate (ai-edge-litert 2.3)
takes neither in int8: each one runs in LiteRT's builtin kernels and splits
the delegated graph in two (measured on MobileNetV3Small: 73 of its 183
operators).

A clamp at a grid point is int8 saturation at a shifted zero point. On the
same scale ``s``, a QUANTIZE from zero point ``z`` to ``z'`` computes
``q' = clamp(q - z + z', -128, 127)``: a requantization with multiplier
exactly 1, so nothing rounds, and saturation cuts the values above ``127 -
z'`` (below ``-128 - z'``). ``min(x, C s)`` is therefore a QUANTIZE to
``z' = 127 - C`` and ``max(x, C s)`` one to ``z' = -128 - C``, which XNNPACK
runs (an int8 -> int8 convert). :func:`clamps_as_requantize` rewrites the
converted file so: the clamp's output tensor takes the new zero point where
every reader takes its input's zero point as it is (convolutions,
FULLY_CONNECTED, ADD, SUB, MUL, QUANTIZE, DEQUANTIZE, HARD_SWISH, LOGISTIC); where a reader needs
the old one (PAD, pooling, CONCATENATION, RESHAPE keep their input's
quantization) or the tensor is a model output, a second QUANTIZE moves the
values back to it. Each rewrite is checked on all 256 int8 inputs against the
operator it replaces, so the file computes the same integers; a clamp that
fails the check stays as it was (and is listed).
"""

from __future__ import annotations

import numpy as np

# readers that take their input's zero point from the tensor (any zero point is exact for them)
ZERO_POINT_AGNOSTIC = frozenset(
    {
        "CONV_2D",
        "DEPTHWISE_CONV_2D",
        "FULLY_CONNECTED",
        "TRANSPOSE_CONV",
        "ADD",
        "SUB",
        "MUL",
        "QUANTIZE",
        "DEQUANTIZE",
        "HARD_SWISH",
        "LOGISTIC",
    }
)

_LEVELS = np.arange(-128, 128, dtype=np.int64)


def _saturate(v):
    return np.clip(v, -128, 127)


def _scalar_constant(model, tensor):
    """The int8 integer of a constant tensor whose elements are all equal, else None."""
    buf = model.buffers[tensor.buffer]
    data = getattr(buf, "data", None)
    if data is None or len(data) == 0:
        return None
    vals = np.asarray(data, np.uint8).view(np.int8).astype(np.int64)
    if vals.size == 0 or np.any(vals != vals[0]):
        return None
    return int(vals[0])


def per_tensor(tensor):
    """``(scale, zero_point)`` of a flatbuffer tensor quantized per tensor, else None."""
    q = tensor.quantization
    if q is None or q.scale is None or q.zeroPoint is None:
        return None
    if len(q.scale) != 1 or len(q.zeroPoint) != 1:
        return None
    return float(q.scale[0]), int(q.zeroPoint[0])


def add_int8_tensor_like(subgraph, like, name, scale, zero_point):
    """Append an int8 tensor of ``like``'s shape (no buffer) quantized per tensor to ``subgraph``;
    returns its index."""
    from ai_edge_litert import schema_py_generated as schema  # noqa: PLC0415

    t = schema.TensorT()
    t.name = name
    t.type = schema.TensorType.INT8
    t.shape = np.array(like.shape, np.int32) if like.shape is not None else None
    t.shapeSignature = like.shapeSignature
    t.buffer = 0
    t.quantization = schema.QuantizationParametersT()
    t.quantization.scale = [scale]
    t.quantization.zeroPoint = [zero_point]
    subgraph.tensors.append(t)
    return len(subgraph.tensors) - 1


def requantize_opcode(model, codes):
    """Index of the model's QUANTIZE operator code at version 2 (int8 -> int8 requantization),
    added to ``model.operatorCodes`` (and ``codes``, the builtin codes) if it has none."""
    from ai_edge_litert import schema_py_generated as schema  # noqa: PLC0415

    found = [i for i, c in enumerate(codes) if c == schema.BuiltinOperator.QUANTIZE]
    if found:
        code = model.operatorCodes[found[0]]
        code.version = max(int(code.version), 2)
        return found[0]
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.QUANTIZE
    code.version = 2
    model.operatorCodes.append(code)
    codes.append(schema.BuiltinOperator.QUANTIZE)
    return len(codes) - 1


def clamps_as_requantize(tflite_bytes):
    """Rewrite every int8 ``MINIMUM``/``MAXIMUM`` of a tensor and a scalar on its own scale as a QUANTIZE.

    Returns ``(tflite_bytes, entries)``: the rewritten file (the input bytes
    when there is nothing to rewrite) and one dict per clamp found
    (``tensor``, ``op``, ``clamp`` in grid steps, ``form``: ``"QUANTIZE"``,
    ``"QUANTIZE x2"`` (a second one restores the zero point its readers need)
    or ``"kept"`` with a ``reason``). See the module docstring.
    """
    from ai_edge_litert import schema_py_generated as schema  # noqa: PLC0415
    from ai_edge_litert.tools import flatbuffer_utils  # noqa: PLC0415

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(tflite_bytes))
    codes = [flatbuffer_utils.get_builtin_code_from_operator_code(c) for c in model.operatorCodes]
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    clamp_codes = {schema.BuiltinOperator.MINIMUM: "MINIMUM", schema.BuiltinOperator.MAXIMUM: "MAXIMUM"}
    if not any(c in clamp_codes for c in codes):
        return tflite_bytes, []
    sg = model.subgraphs[0]
    int8 = schema.TensorType.INT8

    def as_quantize(op, x, y):
        op.opcodeIndex = requantize_opcode(model, codes)
        op.inputs = np.asarray([x], np.int32)
        op.outputs = np.asarray([y], np.int32)
        op.builtinOptionsType = schema.BuiltinOptions.NONE
        op.builtinOptions = None

    entries = []
    new_ops = []
    for op in sg.operators:
        new_ops.append(op)
        kind = clamp_codes.get(codes[op.opcodeIndex])
        if kind is None:
            continue
        outputs = [int(i) for i in op.outputs]
        inputs = [int(i) for i in op.inputs]
        y = outputs[0]
        entry = {"tensor": sg.tensors[y].name.decode() if sg.tensors[y].name else str(y), "op": kind}
        entries.append(entry)
        consts = [_scalar_constant(model, sg.tensors[i]) for i in inputs]
        if len(inputs) != 2 or sum(c is not None for c in consts) != 1:
            entry.update(form="kept", reason="not a tensor and one scalar constant")
            continue
        c_pos = 0 if consts[0] is not None else 1
        x = inputs[1 - c_pos]
        tx, tc, ty = sg.tensors[x], sg.tensors[inputs[c_pos]], sg.tensors[y]
        qx, qc, qy = per_tensor(tx), per_tensor(tc), per_tensor(ty)
        if any(t.type != int8 for t in (tx, tc, ty)) or None in (qx, qc, qy):
            entry.update(form="kept", reason="not int8 with one scale per tensor")
            continue
        if not qx[0] == qc[0] == qy[0]:
            entry.update(form="kept", reason="operands and result on different scales")
            continue
        (s, zx), (_, zc), (_, zy) = qx, qc, qy
        level = consts[c_pos] - zc  # the clamp, in grid steps from zero
        entry["clamp"] = level
        # what the operator computes, in grid steps, for every int8 input
        v = _LEVELS - zx
        want = _saturate((np.minimum if kind == "MINIMUM" else np.maximum)(v, level) + zy) - zy
        z_new = 127 - level if kind == "MINIMUM" else -128 - level
        if not -128 <= z_new <= 127:
            entry.update(form="kept", reason=f"zero point {z_new} outside int8")
            continue
        got = _saturate(v + z_new) - z_new
        readers = [o for o in sg.operators if y in [int(i) for i in o.inputs]]
        agnostic = all(names.get(codes[o.opcodeIndex]) in ZERO_POINT_AGNOSTIC for o in readers)
        is_output = y in [int(i) for i in sg.outputs]
        restore = not agnostic or is_output
        if restore:
            got = _saturate(got + zy) - zy
        if not np.array_equal(got, want):
            entry.update(form="kept", reason="the requantized values differ from the operator's")
            continue
        if restore:
            # x -> QUANTIZE -> mid (zero point z_new: the clamp) -> QUANTIZE -> y (its own zero point)
            mid_index = add_int8_tensor_like(sg, ty, ty.name + b"/clamp" if ty.name else b"clamp", s, z_new)
            as_quantize(op, x, mid_index)
            back = schema.OperatorT()
            as_quantize(back, mid_index, y)
            new_ops.append(back)
            entry.update(form="QUANTIZE x2", zero_point=z_new)
        else:
            as_quantize(op, x, y)
            ty.quantization.zeroPoint = [z_new]
            entry.update(form="QUANTIZE", zero_point=z_new)
    sg.operators = new_ops
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), entries
