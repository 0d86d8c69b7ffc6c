"""Kernel storage in the ``.tflite`` file: the operator form and the packed integer type.

The TFLite converter writes every kernel as int8 or packed int4, and a 1x1
convolution as CONV_2D. LiteRT's XNNPACK delegate runs CONV_2D and
DEPTHWISE_CONV_2D only with int8 kernels, but FULLY_CONNECTED with
per-channel int4 kernels (input channels even) and int2 kernels (input
channels a multiple of 4). Which kernels the plan sends there
(``tfdq.export.plan``, at planning time):

* ``"fast"`` (default): a Dense or 1x1 stride-1 convolution with ``b <= 4``
  becomes an int4 FULLY_CONNECTED only where it has at most
  ``FAST_INT4_MAX_ROWS`` = 36 *rows*, the output positions per example
  (``H*W`` of a convolution's output, 1 for a Dense at batch 1); int2
  (``b <= 2``) only at one row. The rule weighs what int4 saves against
  what it costs: it halves the weight bytes read once per inference, and
  LiteRT 2.3's XNNPACK spends 5-13% more time per multiply-add on int4
  weights than on int8 ones (int2: 1.4-2.2x), and a layer does ``rows``
  multiply-adds per weight. Few rows (a classifier head, the late 3x3 or
  6x6 stages of a MobileNet, where most of the weights are): the bytes
  dominate and int4 is as fast or faster; many rows (the early
  high-resolution 1x1 convolutions, few weights): the multiply-adds
  dominate and int8 is faster, at a small cost in bytes. More rows than
  the limit, or an unknown ``H*W``: int8 with a ``storage_note``. Every
  other convolution stays int8 (XNNPACK runs no sub-byte CONV_2D or
  DEPTHWISE_CONV_2D).
* ``"smallest"``: int4/int2 wherever LiteRT runs it (Dense and 1x1
  convolutions as FULLY_CONNECTED at any row count; int4 CONV_2D and
  DEPTHWISE_CONV_2D in LiteRT's slower builtin kernels).
* ``"int8"``: every kernel int8.

:func:`apply_storage` rewrites the converted file where the plan asks for it:

* a 1x1, stride-1 CONV_2D becomes a FULLY_CONNECTED over the channel axis
  (``keep_num_dims``: ``[N, H, W, C_in] -> [N, H, W, C_out]``, the same
  computation; the kernel ``[C_out, 1, 1, C_in]`` is the FULLY_CONNECTED
  weight ``[C_out, C_in]`` byte for byte);
* a per-tensor scale of a FULLY_CONNECTED int4/int2 kernel is written once per
  output channel (the same value: XNNPACK takes sub-byte weights per channel);
* int2 kernels are packed four to a byte, lowest bits first (LiteRT's
  layout; int4 packs two to a byte, low nibble first).

The integers, scales and int32 biases are not touched, so the file check of
:func:`tfdq.export.to_tflite` reads back exactly the planned ones.
:func:`tfdq.export.runtime.xnnpack_delegated` then asks LiteRT which
operators XNNPACK took.
"""

from __future__ import annotations

import numpy as np

from tfdq.export.flatbuffer import find_kernel, inspect_tflite, unpack_integers
from tfdq.export.plan import ExportError

# FULLY_CONNECTED opcode version written for rewritten operators: the one whose
# kernels take int4/int2 weights (ai-edge-litert 2.3 registers it; an older
# runtime refuses the file when loading it instead of computing wrong values).
FC_OPCODE_VERSION = 13

PACKED_BITS = {"int4": 4, "int2": 2}


def pack_integers(values, storage):
    """Integers as the bytes of an ``int8``/``int4``/``int2`` tensor (LiteRT's packing)."""
    v = np.asarray(values, np.int64).reshape(-1)
    if storage == "int8":
        return v.astype(np.int8).view(np.uint8)
    bits = PACKED_BITS[storage]
    per_byte = 8 // bits
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if v.size and (v.min() < lo or v.max() > hi):
        raise ExportError(f"integers in [{v.min()}, {v.max()}] do not fit {storage} ([{lo}, {hi}]).")
    u = (v & (2**bits - 1)).astype(np.uint8)
    u = np.concatenate([u, np.zeros((-u.size) % per_byte, np.uint8)]).reshape(-1, per_byte)
    packed = np.zeros(len(u), np.uint8)
    for i in range(per_byte):
        packed |= u[:, i] << np.uint8(i * bits)
    return packed


def apply_storage(tflite_bytes, plan):
    """Rewrite the converted file so that each kernel has its planned form and type.

    Only kernels planned as FULLY_CONNECTED (``KernelPlan.form == "fc"``)
    change; a file without any is returned as it is.
    """
    targets = [p for p in plan.kernels.values() if p.form == "fc"]
    if not targets:
        return tflite_bytes
    from ai_edge_litert import schema_py_generated as schema  # noqa: PLC0415
    from ai_edge_litert.tools import flatbuffer_utils  # noqa: PLC0415

    info = inspect_tflite(tflite_bytes)
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(tflite_bytes))
    sg = model.subgraphs[0]
    codes = [flatbuffer_utils.get_builtin_code_from_operator_code(c) for c in model.operatorCodes]
    fc_code = schema.OperatorCodeT()
    fc_code.builtinCode = fc_code.deprecatedBuiltinCode = schema.BuiltinOperator.FULLY_CONNECTED
    fc_code.version = FC_OPCODE_VERSION
    fc_index = None
    buffer_users = {}
    for t in sg.tensors:
        buffer_users[t.buffer] = buffer_users.get(t.buffer, 0) + 1
    for p in targets:
        t = find_kernel(info, p.op_index)
        if t is None:
            raise ExportError(f"{p.layer_name}: kernel tensor not found in the converted file.")
        users = [op for op in sg.operators if len(op.inputs) > 1 and op.inputs[1] == t["index"]]
        if len(users) != 1:
            raise ExportError(f"{p.layer_name}: the kernel feeds {len(users)} operators, expected one.")
        op = users[0]
        code = codes[op.opcodeIndex]
        if code == schema.BuiltinOperator.CONV_2D:
            opts = op.builtinOptions
            if (opts.strideW, opts.strideH) != (1, 1) or t["shape"][1:3] != [1, 1]:
                raise ExportError(f"{p.layer_name}: only a 1x1, stride-1 convolution is a FULLY_CONNECTED.")
            if fc_index is None:
                model.operatorCodes.append(fc_code)
                fc_index = len(model.operatorCodes) - 1
            fc = schema.FullyConnectedOptionsT()
            fc.fusedActivationFunction = opts.fusedActivationFunction
            fc.keepNumDims = True
            op.opcodeIndex = fc_index
            op.builtinOptionsType = schema.BuiltinOptions.FullyConnectedOptions
            op.builtinOptions = fc
        elif code != schema.BuiltinOperator.FULLY_CONNECTED:
            raise ExportError(f"{p.layer_name}: planned as FULLY_CONNECTED, converted to builtin op {code}.")
        tensor = sg.tensors[t["index"]]
        shape = list(t["shape"])
        out_ch, in_ch = shape[0], int(np.prod(shape[1:]))
        tensor.shape = [out_ch, in_ch]
        q = tensor.quantization
        if len(q.scale) == 1:
            q.scale = [float(q.scale[0])] * out_ch
            q.zeroPoint = [0] * out_ch
            q.quantizedDimension = 0
        values = unpack_integers(t, tflite_bytes)
        data = pack_integers(values, p.storage)
        if buffer_users[tensor.buffer] > 1:  # shared with another tensor: give this one its own
            model.buffers.append(schema.BufferT())
            tensor.buffer = len(model.buffers) - 1
        model.buffers[tensor.buffer].data = data
        tensor.type = {
            "int8": schema.TensorType.INT8,
            "int4": schema.TensorType.INT4,
            "int2": schema.TensorType.INT2,
        }[p.storage]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def kernel_storage(plan, info, delegated):
    """Per planned kernel (by op index): the file's operator, storage type, bytes, and
    whether XNNPACK runs that operator (``delegated``: :func:`~tfdq.export.runtime.xnnpack_delegated`)."""
    out = {}
    for p in plan.kernels.values():
        t = find_kernel(info, p.op_index)
        if t is None:
            continue
        op_index = next(
            (i for i, o in enumerate(info["ops"]) if len(o["inputs"]) > 1 and o["inputs"][1] == t["index"]),
            None,
        )
        if op_index is None:  # not an operator's weight input: the first operator that reads it
            op_index = next((i for i, o in enumerate(info["ops"]) if t["index"] in o["inputs"]), None)
        out[p.op_index] = {
            "op": None if op_index is None else info["ops"][op_index]["op"],
            "storage": t["type"],
            "bytes": int(t["bytes"]),
            "xnnpack": None if op_index is None or delegated is None else bool(delegated[op_index]),
        }
    return out


def settle_storage(converted, plan):
    """:func:`apply_storage`, then LiteRT's answer on delegation; ``(tflite, delegated)``.

    Under the ``"fast"`` policy a FULLY_CONNECTED that XNNPACK does not take
    (a runtime older or stricter than the rules in :mod:`tfdq.export.plan`)
    is stored one step wider (int2 -> int4 -> int8) and the file rewritten,
    with a note; the integers stay the same.
    """
    from tfdq.export.runtime import xnnpack_delegated  # noqa: PLC0415

    for _ in range(3):
        tflite = apply_storage(converted, plan)
        info = inspect_tflite(tflite)
        delegated = xnnpack_delegated(tflite, {p.op_index: p.layer_name for p in plan.kernels.values()})
        if plan.storage != "fast":
            return tflite, delegated
        table = kernel_storage(plan, info, delegated)
        refused = [
            p
            for p in plan.kernels.values()
            if p.form == "fc" and p.storage != "int8" and table[p.op_index]["xnnpack"] is False
        ]
        if not refused:
            return tflite, delegated
        for p in refused:
            wider = "int4" if p.storage == "int2" else "int8"
            p.storage_note = f"{wider}, not {p.storage}: this LiteRT's XNNPACK did not take the {p.storage} FULLY_CONNECTED"
            p.storage = wider
    return tflite, delegated
