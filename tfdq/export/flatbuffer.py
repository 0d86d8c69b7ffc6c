"""Reading ``.tflite`` flatbuffers: tensors, storage types, scales, operators.

Uses the flatbuffer schema that ships with LiteRT; no interpreter is needed.
"""

import numpy as np

from tfdq.export.plan import KERNEL_TAG

# ---------------------------------------------------------------------------
# Reading .tflite files
# ---------------------------------------------------------------------------


def inspect_tflite(tflite_bytes):
    """Tensors and operators of a ``.tflite`` flatbuffer (no interpreter).

    Returns ``{"tensors": [...], "ops": [...], "inputs": [...], "outputs": [...]}``;
    each tensor has ``name``, ``type`` (``"int4"``, ``"int8"``, ``"int32"``,
    ``"float32"``...), ``shape``, ``scales``, ``zero_points``,
    ``quantized_dimension``, ``bytes`` (size of its constant data, 0 for
    activations).
    """
    from ai_edge_litert import schema_py_generated as schema  # noqa: PLC0415

    type_names = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = schema.Model.GetRootAsModel(tflite_bytes, 0)
    sg = model.Subgraphs(0)
    tensors = []
    for i in range(sg.TensorsLength()):
        t = sg.Tensors(i)
        q = t.Quantization()
        scales = q.ScaleAsNumpy() if q is not None and q.ScaleLength() else np.zeros(0)
        zps = q.ZeroPointAsNumpy() if q is not None and q.ZeroPointLength() else np.zeros(0)
        buf = model.Buffers(t.Buffer())
        nbytes = 0
        if buf is not None:
            nbytes = int(buf.DataLength()) or int(buf.Size())
        tensors.append(
            {
                "index": i,
                "name": t.Name().decode(),
                "type": type_names.get(t.Type(), str(t.Type())),
                "shape": [int(s) for s in t.ShapeAsNumpy()] if t.ShapeLength() else [],
                "scales": np.asarray(scales, np.float64),
                "zero_points": np.asarray(zps, np.int64),
                "quantized_dimension": int(q.QuantizedDimension()) if q is not None else 0,
                "bytes": nbytes,
            }
        )
    ops = []
    for i in range(sg.OperatorsLength()):
        o = sg.Operators(i)
        code = model.OperatorCodes(o.OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        ops.append(
            {
                "op": op_names.get(builtin, str(builtin)),
                "inputs": [int(v) for v in o.InputsAsNumpy()] if o.InputsLength() else [],
                "outputs": [int(v) for v in o.OutputsAsNumpy()] if o.OutputsLength() else [],
            }
        )
    return {
        "tensors": tensors,
        "ops": ops,
        "inputs": [int(v) for v in sg.InputsAsNumpy()],
        "outputs": [int(v) for v in sg.OutputsAsNumpy()],
    }


def find_kernel(info, op_index):
    tag = f"{KERNEL_TAG}{op_index}"
    for t in info["tensors"]:
        parts = t["name"].split(";")
        tagged = any(p == tag or p.startswith(tag + "/") or p.startswith(tag + "_") for p in parts)
        if tagged and t["bytes"] and t["type"] != "int32":  # int32: a bias named after the same op
            return t
    return None


def find_bias(info, kernel_tensor):
    """The constant int32 bias of the operator that takes ``kernel_tensor``, or None."""
    for o in info["ops"]:
        at = 3 if o["op"] == "TRANSPOSE_CONV" else 2  # TRANSPOSE_CONV: (output shape, kernel, input, bias)
        if kernel_tensor["index"] in o["inputs"] and len(o["inputs"]) > at and o["inputs"][at] >= 0:
            t = info["tensors"][o["inputs"][at]]
            return t if t["type"] == "int32" and t["bytes"] else None
    return None


def float_ops(info):
    """Operators that compute in float (QUANTIZE at inputs / DEQUANTIZE at outputs allowed)."""
    bad = []
    tensors = info["tensors"]
    for o in info["ops"]:
        types = [tensors[i]["type"] for i in o["inputs"] + o["outputs"] if i >= 0]
        if "float32" not in types and "float16" not in types:
            continue
        if o["op"] == "QUANTIZE" and all(i in info["inputs"] for i in o["inputs"]):
            continue
        if o["op"] == "DEQUANTIZE" and all(i in info["outputs"] for i in o["outputs"]):
            continue
        bad.append(o["op"])
    return bad


def unpack_integers(tensor, tflite_bytes):
    """Integer values of a constant int2/int4/int8/int32 tensor, read from the flatbuffer."""
    from ai_edge_litert import schema_py_generated as schema  # noqa: PLC0415

    model = schema.Model.GetRootAsModel(tflite_bytes, 0)
    t = model.Subgraphs(0).Tensors(tensor["index"])
    buf = model.Buffers(t.Buffer())
    if buf.DataLength():
        raw = buf.DataAsNumpy().astype(np.uint8)
    else:  # data stored after the flatbuffer (large models)
        raw = np.frombuffer(tflite_bytes, np.uint8, count=buf.Size(), offset=buf.Offset())
    n = int(np.prod(tensor["shape"]))
    if tensor["type"] == "int32":
        return raw.view(np.int32)[:n].reshape(tensor["shape"]).astype(np.int64)
    if tensor["type"] in ("int4", "int2"):  # packed, lowest bits first
        bits = 4 if tensor["type"] == "int4" else 2
        fields = [((raw >> (i * bits)) & (2**bits - 1)).astype(np.int16) for i in range(8 // bits)]
        vals = np.stack(fields, axis=1).reshape(-1)[:n]
        vals = np.where(vals >= 2 ** (bits - 1), vals - 2**bits, vals)
    else:
        vals = raw.view(np.int8)[:n].astype(np.int16)
    return vals.reshape(tensor["shape"]).astype(np.int64)
