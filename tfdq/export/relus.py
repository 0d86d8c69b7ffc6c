"""Requantizing int8 RELUs that round once, as the Keras quantizer does.

An int8 ``RELU`` (``RELU6``, ``RELU_N1_TO_1``, ``RELU_0_TO_1``) whose output
scale differs from its input's requantizes: LiteRT multiplies ``q - z_in``
by the ratio ``s_in / s_out`` stored as a 31-bit mantissa ``m`` in
``[1/2, 1)`` and a power of two, rounding the mantissa product to an integer
and then the power-of-two division. A power-of-two ratio ``2^-n`` has
``m = 1/2``: the product ``(q - z_in) / 2`` rounds (half up), then the
division by ``2^(n-1)`` rounds again (half away), so a value ``k + 3/8``
steps (``n = 3``) becomes ``k + 1/2`` and then ``k + 1``, where the Keras
quantizer rounds ``k + 3/8`` once to ``k``. LiteRT's XNNPACK delegate runs
no int8 RELU (ai-edge-litert 2.3), so the builtin kernel decides. The TFLite
converter folds a RELU at the input's scale followed by a requantization
back into one requantizing RELU, so the traced graph cannot avoid it.

:func:`relus_round_once` rewrites the converted file: the RELU writes a new
tensor on the output's zero point and a scale ``s_out (1 + 2^-20)``, so
its multiplier ``2^-n (1 - 2^-20)`` has a mantissa just below 1 whose product
rounds to ``q - z_in`` itself (the error is under ``2^-12`` for the 256
levels) and the only rounding is the power-of-two division, half away from
zero; a QUANTIZE with multiplier ``1 / (1 + 2^-20)`` (it moves no integer:
the same bound) puts that tensor back on the output scale, so every reader
and the tensor's name are unchanged. XNNPACK runs the QUANTIZE. Each rewrite
is checked on all 256 int8 inputs in LiteRT itself, with and without the
XNNPACK delegate, against the single rounding in float64 NumPy; it is kept
only where the RELU alone disagrees and the rewritten pair agrees (else the
RELU stays and is listed).
"""

from __future__ import annotations

import numpy as np

from tfdq.export.clamps import add_int8_tensor_like, per_tensor, requantize_opcode

# relative widening of the intermediate tensor's scale (see the module docstring)
WIDEN = 2.0**-20

_LEVELS = np.arange(-128, 128, dtype=np.int64)

# real-valued bounds of each activation
_BOUNDS = {
    "RELU": (0.0, np.inf),
    "RELU6": (0.0, 6.0),
    "RELU_N1_TO_1": (-1.0, 1.0),
    "RELU_0_TO_1": (0.0, 1.0),
}


def _round_half_away(v):
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def reference(kind, s_in, z_in, s_out, z_out):
    """What the Keras model computes for every int8 input ``-128..127``: the activation on the real
    values, then one rounding (half away from zero) onto the output grid, saturated to int8."""
    lo, hi = _BOUNDS[kind]
    x = np.clip((_LEVELS - z_in) * float(s_in), lo, hi)
    return np.clip(_round_half_away(x / float(s_out)) + z_out, -128, 127).astype(np.int64)


def _tensor(schema, name, scale, zero_point):
    t = schema.TensorT()
    t.name = name.encode()
    t.type = schema.TensorType.INT8
    t.shape = np.array([1, 256], np.int32)
    t.buffer = 0
    t.quantization = schema.QuantizationParametersT()
    t.quantization.scale = [float(scale)]
    t.quantization.zeroPoint = [int(zero_point)]
    return t


def chain_model(first, steps):
    """A ``.tflite`` of one ``[1, 256]`` int8 input ``first = (scale, zero_point)`` through the unary
    operators ``steps = [(op_name, out_scale, out_zero_point), ...]`` in turn."""
    from ai_edge_litert import schema_py_generated as schema  # noqa: PLC0415
    from ai_edge_litert.tools import flatbuffer_utils  # noqa: PLC0415

    model = schema.ModelT()
    model.version = 3
    model.buffers = [schema.BufferT()]
    model.operatorCodes = []
    sg = schema.SubGraphT()
    sg.tensors = [_tensor(schema, "t0", *first)]
    sg.operators = []
    code_index = {}
    for i, (name, scale, zero_point) in enumerate(steps):
        code = getattr(schema.BuiltinOperator, name)
        if code not in code_index:
            oc = schema.OperatorCodeT()
            oc.builtinCode = oc.deprecatedBuiltinCode = code
            oc.version = 2
            model.operatorCodes.append(oc)
            code_index[code] = len(model.operatorCodes) - 1
        sg.tensors.append(_tensor(schema, f"t{i + 1}", scale, zero_point))
        op = schema.OperatorT()
        op.opcodeIndex = code_index[code]
        op.inputs = np.array([i], np.int32)
        op.outputs = np.array([i + 1], np.int32)
        sg.operators.append(op)
    sg.inputs = np.array([0], np.int32)
    sg.outputs = np.array([len(steps)], np.int32)
    model.subgraphs = [sg]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def run_levels(tflite_bytes, xnnpack):
    """The output integers of a :func:`chain_model` file on the 256 int8 levels, in LiteRT with its
    default delegates (XNNPACK) or with the builtin kernels only."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType  # noqa: PLC0415

    kwargs = (
        {} if xnnpack else {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    )
    it = Interpreter(model_content=tflite_bytes, **kwargs)
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], _LEVELS.astype(np.int8).reshape(1, 256))
    it.invoke()
    return np.array(it.get_tensor(it.get_output_details()[0]["index"]))[0].astype(np.int64)


def _agrees(first, steps, want):
    b = chain_model(first, steps)
    return all(np.array_equal(run_levels(b, x), want) for x in (False, True))


def relus_round_once(tflite_bytes):
    """Rewrite each requantizing int8 RELU-family operator as the RELU onto a widened scale and a QUANTIZE.

    Returns ``(tflite_bytes, entries)``: the rewritten file (the input bytes
    when nothing changes) and one dict per requantizing RELU found
    (``tensor``, ``op``, ``ratio`` = input scale / output scale, ``form``:
    ``"RELU + QUANTIZE"``, ``"kept"`` (it already rounds once) or
    ``"kept: failed"`` with a ``reason``). See the module docstring.
    """
    from ai_edge_litert import schema_py_generated as schema  # noqa: PLC0415
    from ai_edge_litert.tools import flatbuffer_utils  # noqa: PLC0415

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(tflite_bytes))
    codes = [flatbuffer_utils.get_builtin_code_from_operator_code(c) for c in model.operatorCodes]
    kinds = {getattr(schema.BuiltinOperator, k): k for k in _BOUNDS if hasattr(schema.BuiltinOperator, k)}
    if not any(c in kinds for c in codes):
        return tflite_bytes, []
    sg = model.subgraphs[0]
    int8 = schema.TensorType.INT8

    checked = {}
    entries = []
    new_ops = []
    changed = False
    for op in sg.operators:
        new_ops.append(op)
        kind = kinds.get(codes[op.opcodeIndex])
        if kind is None or len(op.inputs) != 1 or len(op.outputs) != 1:
            continue
        x, y = int(op.inputs[0]), int(op.outputs[0])
        tx, ty = sg.tensors[x], sg.tensors[y]
        qx, qy = per_tensor(tx), per_tensor(ty)
        if tx.type != int8 or ty.type != int8 or qx is None or qy is None or qx[0] == qy[0]:
            continue  # float, per-channel, or on one scale: nothing rounds
        (s_in, z_in), (s_out, z_out) = qx, qy
        entry = {
            "tensor": ty.name.decode() if ty.name else str(y),
            "op": kind,
            "ratio": s_in / s_out,
        }
        entries.append(entry)
        wide = float(np.float32(s_out * (1.0 + WIDEN)))
        key = (kind, s_in, z_in, s_out, z_out)
        if key not in checked:
            want = reference(*key)
            if _agrees(qx, [(kind, s_out, z_out)], want):
                checked[key] = "kept"
            elif _agrees(qx, [(kind, wide, z_out), ("QUANTIZE", s_out, z_out)], want):
                checked[key] = "RELU + QUANTIZE"
            else:
                checked[key] = "kept: failed"
        entry["form"] = checked[key]
        if checked[key] == "kept: failed":
            entry["reason"] = "neither the RELU nor the RELU + QUANTIZE rounds as the Keras quantizer"
        if checked[key] != "RELU + QUANTIZE":
            continue
        mid_index = add_int8_tensor_like(sg, ty, (ty.name or str(y).encode()) + b"/round_once", wide, z_out)
        op.outputs = np.asarray([mid_index], np.int32)
        back = schema.OperatorT()
        back.opcodeIndex = requantize_opcode(model, codes)
        back.inputs = np.asarray([mid_index], np.int32)
        back.outputs = np.asarray([y], np.int32)
        new_ops.append(back)
        changed = True
    if not changed:
        return tflite_bytes, entries
    sg.operators = new_ops
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), entries
