"""The TF graph that the TFLite converter turns into the integer model.

:class:`Builder` evaluates the planned Keras graph (:class:`~tfdq.export.plan.Plan`)
with TensorFlow ops and FakeQuant where TFLite needs a scale: kernels (the
learned integers times their scale), activation quantizers (the learned
step), and, calibrated on data, the tensors no learned quantizer covers.
Each :meth:`Builder.run` returns the graph's outputs together with the
:class:`BuildTables` of what it decided (calibrated scales, planned int32
biases, zero points), which conversion, checking and bias alignment read.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np
import tensorflow as tf

from tfdq import registry
from tfdq.export.plan import (
    INT8_MAX,
    KERNEL_TAG,
    OUTPUT_HEADROOM,
    SOFTMAX_SCALE,
    TIE_BREAK,
    ExportError,
    activation_name,
    activation_rule,
)
from tfdq.models import ZeroPadShortcut

INT32_MAX = 2**31 - 1
CALIBRATED_ACTIVATIONS = ("sigmoid", "hard_sigmoid", "hard_swish", "swish", "leaky_relu", "gelu")


def _scalar_operands_nonneg(node):
    """Every number among a node's first two arguments is >= 0."""
    for a in node.arguments.args[:2]:
        if not isinstance(a, keras.KerasTensor) and float(np.min(a)) < 0:
            return False
    return True


def _scalar_operand(op):
    """``(position of the tensor, c)`` for an operation on one tensor and one scalar constant c
    (``x + 3.0``, ``3.0 + x``, ``x * (1 / 6)``), else None."""
    node = op.node
    args = node.arguments.args
    if not registry.is_operation(op.layer) or len(node.input_tensors) != 1 or len(args) != 2:
        return None
    if node.arguments.kwargs:
        return None
    pos = 0 if isinstance(args[0], keras.KerasTensor) else 1
    c = args[1 - pos]
    if isinstance(c, keras.KerasTensor) or np.ndim(c) != 0:
        return None
    return pos, float(c)


def _bias_constants(plan):
    """``{kernel op index: (op index, c)}`` for the kernels (linear activation) whose output, through
    a folded BatchNorm, goes only to an ``x + c`` or ``x - c`` (a scalar c): their int32 bias
    absorbs c, so the shifted value is rounded once, where the kernel requantizes, not at the
    kernel's output and again after an ADD (MobileNetV3's hard-sigmoid gate ``relu6(conv(x) + 3) / 6``
    becomes one CONV_2D with a fused RELU6; see :meth:`Builder.elementwise`)."""
    found = {}
    for index, kplan in plan.kernels.items():
        op = plan.ops_by_index[index]
        if (
            kplan.kind not in ("conv", "depthwise", "dense")
            or activation_name(op.layer.activation) != "linear"
        ):
            continue
        nxt = plan.sole_consumer(op.outputs[0], through_folded_bn=True)
        operand = (
            _scalar_operand(nxt)
            if nxt is not None and isinstance(nxt.layer, registry.SCALAR_SHIFT_OPS)
            else None
        )
        if operand is not None and not (registry.is_difference(nxt.layer) and operand[0] == 1):
            found[index] = (nxt.index, -operand[1] if registry.is_difference(nxt.layer) else operand[1])
    return found


# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Q:
    """int8 quantization of a tensor: ``real = (q - zero_point) * scale``."""

    scale: float
    zero_point: int

    @property
    def lo(self):
        return (-128 - self.zero_point) * self.scale

    @property
    def hi(self):
        return (127 - self.zero_point) * self.scale


_CALIBRATING = _Q(float("nan"), 0)  # placeholder while collecting statistics


@dataclasses.dataclass
class _Val:
    t: object  # tf.Tensor
    q: _Q = None  # None: not quantized yet (its producer's output scale is open)
    fusable: bool = False  # produced by conv/dense/add with no activation yet
    nonneg: bool = False
    label: str = ""
    tight: bool = False  # a calibrated scale may be tight (not a power of two): nothing adds it to a grid


def _pow2_ceil(v):
    return 2.0 ** math.ceil(math.log2(v))


# registry export rule -> the Builder method that evaluates it as ``method(op, values)``
_RULE_METHODS = {
    "add": "add",
    "elementwise": "elementwise",
    "affine": "affine",
    "scaled_add": "scaled_add",
    "layernorm": "layernorm",
    "mean": "reduce_mean",
    "same_scale_op": "same_scale_op",
}


@dataclasses.dataclass
class BuildTables:
    """What one :meth:`Builder.run` decided besides the graph itself.

    ``points``: in ``"calibrate"`` mode, tensor name -> the traced tensor
    whose range calibration observes; ``calibrated``: one dict per tensor
    that got a calibrated scale (name, reason, scale, observed range);
    ``fixed``: tensors whose scale TFLite's spec fixes (softmax, logistic);
    ``derived``: tensors whose scale follows from a learned step (``d / c`` on ``x`` in
    ``x * c``, see :meth:`Builder.elementwise`);
    ``missing``: calibration points without statistics (an internal error);
    ``biases``: kernel op index -> its planned int32 bias (integers, unit,
    the residual :func:`~tfdq.export.align.align_biases` removes);
    ``bn_biases``: the same for standalone BatchNorm 1x1 depthwise ops;
    ``zero_points``: activation quantizer op index -> the zero point used.
    """

    points: dict = dataclasses.field(default_factory=dict)
    calibrated: list = dataclasses.field(default_factory=list)
    fixed: list = dataclasses.field(default_factory=list)
    derived: list = dataclasses.field(default_factory=list)
    missing: list = dataclasses.field(default_factory=list)
    biases: dict = dataclasses.field(default_factory=dict)
    bn_biases: dict = dataclasses.field(default_factory=dict)
    zero_points: dict = dataclasses.field(default_factory=dict)


class Builder:
    """Evaluates the Keras graph with TF ops: FakeQuant where TFLite needs scales.

    ``mode``: ``"calibrate"`` (calibration points are identities whose values
    are recorded), ``"export"`` (calibration points are FakeQuants with the
    scales derived from ``stats``) or ``"float"`` (no FakeQuant at all, float
    kernels: the float version of the model).
    """

    def __init__(self, plan, mode, stats=None):
        self.plan = plan
        self.mode = mode
        self.stats = stats or {}
        self.float_weights = {}
        if mode == "float":  # read here: the graph is traced without eager values
            for i in plan.kernels:
                layer = plan.ops[i].layer
                bias = np.asarray(layer.bias.numpy(), np.float32) if layer.use_bias else None
                kernel = np.asarray(layer.kernel.numpy(), np.float32)
                if plan.kernels[i].kind == "depthwise" and kernel.shape != plan.kernels[i].k.shape:
                    kernel = np.transpose(kernel, (0, 1, 3, 2))  # a grouped Conv2D as depthwise
                self.float_weights[i] = (kernel, bias)
        self._tables = None  # the BuildTables of the run in progress (None between runs)
        self._bias_constants = _bias_constants(plan)  # kernel op index -> (x + c op index, c)
        self._absorbed = {i for i, _ in self._bias_constants.values()}
        self._exact_inputs = set()  # learned quantizers whose input arrives on their grid (x * c)

    # -- quantization helpers -----------------------------------------------

    def fq(self, t, q, name=None):
        if self.mode == "float" or q is _CALIBRATING or q is None:
            return t
        return tf.quantization.fake_quant_with_min_max_vars(
            t, q.lo, q.hi, num_bits=8, narrow_range=False, name=name
        )

    def calibrated(self, val, name, reason, prefer_step=None, tight=False):
        """Quantize an uncovered tensor with a scale calibrated on data.

        The scale is the smallest power of two that covers the observed
        range (``prefer_step`` instead when that covers it too), or, with
        ``tight`` (outputs: nothing downstream rescales them),
        ``OUTPUT_HEADROOM * max|x| / levels``.
        """
        if self.mode == "float":
            return dataclasses.replace(val, q=_CALIBRATING, fusable=False)
        if self.mode == "calibrate":
            self._tables.points[name] = val.t
            return dataclasses.replace(val, q=_CALIBRATING, fusable=False)
        st = self.stats.get(name)
        if st is None:
            self._tables.missing.append((name, reason))
            st = {"max_abs": 1.0, "min": -1.0, "samples": 0}
        max_abs = st["max_abs"]
        if val.label == "input" and st["min"] >= 0:
            val = dataclasses.replace(val, nonneg=True)  # a model input that is never negative
        levels = 255 if val.nonneg else INT8_MAX
        needed = _pow2_ceil(max_abs / levels) if max_abs > 0 else 2.0**-8
        scale = needed
        how = f"power of two covering max |x| = {max_abs:.6g} with {levels} levels"
        if tight and max_abs > 0:
            scale = OUTPUT_HEADROOM * max_abs / levels
            how = f"{OUTPUT_HEADROOM} x max |x| = {max_abs:.6g} over {levels} levels"
        if prefer_step is not None and needed <= prefer_step:
            scale = prefer_step
            how = (
                f"step {prefer_step:g} of the learned quantizer after the sum "
                f"(covers max |x| = {max_abs:.6g}), which keeps the sum on its grid"
            )
        zp = -128 if val.nonneg else 0
        q = _Q(scale, zp)
        self._tables.calibrated.append(
            {
                "tensor": name,
                "reason": reason,
                "scale": scale,
                "zero_point": zp,
                "observed_max_abs": max_abs,
                "observed_min": st["min"],
                "calibration_samples": st["samples"],
                "how": how,
            }
        )
        return dataclasses.replace(val, t=self.fq(val.t, q), q=q, fusable=False)

    def quantized(self, values, key, name, reason, prefer_step=None, tight=False):
        val = values[key]
        if val.q is None:
            val = self.calibrated(val, name, reason, prefer_step, tight=(val.tight or tight))
            values[key] = val
        return val

    # -- graph -----------------------------------------------------------------

    def run(self, inputs):
        """Evaluate the plan on ``inputs`` (traced tensors); ``(outputs, BuildTables)``."""
        plan = self.plan
        self._tables = tables = BuildTables()
        try:
            values = {}
            for k, t in zip(plan.input_keys, inputs):
                values[k] = _Val(t, None, False, False, "input")
            for op in plan.ops:
                outs = self.eval_op(op, values)
                for k, v in zip(op.outputs, outs):
                    values[k] = v
            results = []
            for i, k in enumerate(plan.output_keys):
                name = f"output_{i}"
                val = values[k]
                if val.q is None:
                    val = self.calibrated(val, name, "model output (no learned quantizer)", tight=True)
                results.append(val.t)
        finally:
            self._tables = None
        return results, tables

    def eval_op(self, op, values):
        layer = op.layer
        plan = self.plan
        label = op.path
        if op.index in plan.acts:
            return [self.activation_quantizer(op, values[op.inputs[0]])]
        if op.index in plan.kernels:
            x = self.quantized(values, op.inputs[0], f"{label}:input", f"input of {label}")
            return [self.weighted(op, x)]
        if op.index in plan.folded_bn:
            return [values[op.inputs[0]]]
        if op.index in plan.standalone_bn:
            return [self.batchnorm(op, values)]
        entry = registry.lookup(layer)
        rule = None if entry is None else entry.rule
        if rule == "activation":
            return [self.activation(op, values, activation_rule(layer))]
        if rule == "softmax":
            return [self.activation(op, values, "softmax")]
        if rule == "identity":
            return [values[op.inputs[0]]]
        if rule == "same_scale":
            x = values[op.inputs[0]]
            if x.q is None and isinstance(layer, (keras.layers.Flatten, keras.layers.Reshape)):
                if self.plan.downstream_step(op.outputs[0]) is not None:
                    # the learned quantizer after the reshape sets the producer's output scale
                    # (the producer requantizes to its step: plan.downstream_quantizer)
                    return [_Val(self.same_scale(layer, x.t), None, False, x.nonneg, label)]
            x = self.quantized(values, op.inputs[0], f"{label}:input", f"input of {label}")
            y = self.same_scale(layer, x.t)
            return [_Val(self.fq(y, x.q), x.q, False, x.nonneg, label)]
        if rule == "average":
            x = self.quantized(values, op.inputs[0], f"{label}:input", f"input of {label}")
            learned_next = self.plan.downstream_step(op.outputs[0]) is not None
            if isinstance(layer, keras.layers.GlobalAveragePooling2D):
                if learned_next and self.mode == "export" and x.q is not None:
                    act, _ = self.plan.downstream_quantizer(op.outputs[0])
                    ties_up = getattr(self.plan.ops_by_index[act.op_index].layer, "ties", "away") == "up"
                    y = self.global_mean_as_conv(x, act.step, bool(layer.keepdims), ties_up)
                else:
                    y = tf.reduce_mean(x.t, axis=[1, 2], keepdims=bool(layer.keepdims))
            elif learned_next and self.mode == "export" and x.q is not None and layer.padding == "valid":
                act, _ = self.plan.downstream_quantizer(op.outputs[0])
                ties_up = getattr(self.plan.ops_by_index[act.op_index].layer, "ties", "away") == "up"
                y = self.mean_as_conv(x, act.step, tuple(layer.pool_size), tuple(layer.strides), ties_up)
            else:
                y = tf.nn.avg_pool2d(x.t, layer.pool_size, layer.strides, layer.padding.upper())
            out = _Val(y, None, False, x.nonneg, label)
            if learned_next:
                return [out]  # the learned quantizer that follows sets its scale
            if not isinstance(layer, keras.layers.GlobalAveragePooling2D) and x.q is not None:
                # AVERAGE_POOL_2D keeps its input's scale (TFLite's constraint): DenseNet's transition
                # pooling feeds a BatchNorm and a Concatenate, no single learned quantizer
                return [_Val(self.fq(y, x.q), x.q, False, x.nonneg, label)]
            return [self.calibrated(out, label, "average of quantized values (not on the input grid)")]
        if rule == "elementwise" and registry.is_tensor_sum(op.layer, op.node):
            rule = "add"  # x + y, x - y of two feature maps on learned grids: exact, like the Add layer
        if rule in _RULE_METHODS:
            return [getattr(self, _RULE_METHODS[rule])(op, values)]
        if rule == "concat":
            xs = [
                self.quantized(values, k, f"{label}:input{i}", f"input {i} of {label}")
                for i, k in enumerate(op.inputs)
            ]
            y = tf.concat([x.t for x in xs], axis=layer.axis)
            return [_Val(y, None, False, all(x.nonneg for x in xs), label)]
        raise ExportError(f"No integer export for {op.path} ({type(layer).__name__}).")

    def global_mean_as_conv(self, x, s_out, keepdims, ties_up=False):
        """The global average as a DEPTHWISE_CONV_2D with a constant int8 kernel.

        LiteRT (XNNPACK) rounds the requantization of MEAN and of its
        convolutions half to even; the learned quantizer after the pooling
        rounds half away from zero. With power-of-two scales the mean of
        ``N = H W`` values often lands exactly on a tie, so for a
        non-negative map (a pooled ReLU output) with ``N`` a power of two
        and ``s_in / (N s_out) <= 1/2`` the kernel holds the integer 2 with
        scale ``1 / (2 N)`` and the int32 bias is 1: every value moves by a
        quarter of its own spacing, which decides the ties upwards and
        crosses no other threshold. The pooled map is then the Keras one
        element for element. A signed map (EfficientNet's squeeze of a swish
        output) gets the same nudge where its learned quantizer rounds ties
        up (``ties_up``; before, 1-step differences at its ties).
        """
        h, w, c = (int(v) for v in x.t.shape[1:])
        y = self.mean_as_conv(x, s_out, (h, w), (1, 1), ties_up)
        return y if keepdims else tf.reshape(y, [-1, c])

    def mean_as_conv(self, x, s_out, window, strides, ties_up=False):
        """Averages over ``window`` (VALID padding) as a DEPTHWISE_CONV_2D with a constant int8 kernel
        (see :meth:`global_mean_as_conv`; an AVERAGE_POOL_2D would need the same scale on both sides).
        A signed map gets the same quarter-spacing nudge where the learned quantizer after it rounds
        ties up (``ties_up``: quantize_model sets it on a signed pooled map, DenseNet's transitions)."""
        t = x.t
        h, w = window
        c = int(t.shape[-1])
        n = h * w
        ratio = x.q.scale / (n * s_out)
        nudge = (x.nonneg or ties_up) and n & (n - 1) == 0 and ratio <= 0.5
        level = 2 if nudge else 1
        unit = 1.0 / (level * n)  # kernel scale: the integer `level` times it is 1 / N
        ones = tf.constant(np.full((h, w, c, 1), 1.0 / n, np.float32))
        kernel = tf.quantization.fake_quant_with_min_max_vars(
            ones, -INT8_MAX * unit, INT8_MAX * unit, num_bits=8, narrow_range=True
        )
        y = tf.nn.depthwise_conv2d(t, kernel, strides=[1, *strides, 1], padding="VALID")
        if nudge:  # one accumulator unit (s_in / (2 N)): the int32 bias 1
            y = tf.nn.bias_add(y, np.full(c, x.q.scale * unit, np.float32))
        return y

    def same_scale(self, layer, t):
        shape = t.shape
        if isinstance(layer, keras.layers.Flatten):
            return tf.reshape(t, [-1, int(np.prod(shape[1:]))])
        if isinstance(layer, keras.layers.Reshape):
            return tf.reshape(t, [-1, *layer.target_shape])
        if isinstance(layer, keras.layers.ZeroPadding2D):
            (top, bottom), (left, right) = layer.padding
            return tf.pad(t, [[0, 0], [top, bottom], [left, right], [0, 0]])
        if isinstance(layer, keras.layers.Cropping2D):
            (top, bottom), (left, right) = layer.cropping
            h, w = shape[1], shape[2]
            return t[:, top : h - bottom, left : w - right, :]
        if isinstance(layer, keras.layers.MaxPooling2D):
            return tf.nn.max_pool2d(t, layer.pool_size, layer.strides, layer.padding.upper())
        if isinstance(layer, keras.layers.GlobalMaxPooling2D):
            return tf.reduce_max(t, axis=[1, 2], keepdims=bool(layer.keepdims))
        if not isinstance(layer, ZeroPadShortcut):
            raise ExportError(f"No same-scale export rule for {type(layer).__name__}.")
        y = t[:, :: layer.stride, :: layer.stride, :]
        if layer.extra_channels:
            y = tf.pad(y, [[0, 0], [0, 0], [0, 0], [0, layer.extra_channels]])
        return y

    def activation_quantizer(self, op, x):
        a = self.plan.acts[op.index]
        q = _Q(a.step, a.zero_point)
        consumers = self.plan.consumers.get(op.outputs[0], [])
        if (
            op.index in self._exact_inputs
            and consumers
            and all(isinstance(c.layer, keras.layers.Multiply) for c in consumers)
        ):
            # a factor of an int8 MUL whose values arrive on the grid already (nothing to round here):
            # a scale larger by one part in 2^22 breaks the product's ties away from zero, as the
            # learned quantizer after the MUL does, where XNNPACK would round them to even
            q = _Q(a.step * TIE_BREAK, a.zero_point)
        t = self.fq(x.t, q)
        if self.mode == "float":
            return _Val(x.t, q, False, not a.signed, op.path)
        if a.signed:
            # zero point n - 128: int8 saturation is the clamp at -n d; the
            # clamp at +n d is one MINIMUM here, which tfdq.export.clamps turns into a
            # QUANTIZE to zero point 127 - n in the file (XNNPACK runs no int8 MINIMUM).
            t = self.fq(tf.minimum(t, a.n * a.step), q)
        elif not x.nonneg and x.fusable:
            # zero point 127 - n: saturation clamps at n d; the clamp at 0
            # is a ReLU fused into the producer (conv, dense, add).
            t = self.fq(tf.nn.relu(x.t), q)
        elif not x.nonneg and x.q is not None and x.q is not _CALIBRATING:
            # Already int8 at another scale (a signed quantizer's output, e.g. a sum that also feeds a
            # shortcut convolution): a RELU requantizes to this step (zero point 127 - n: saturation is
            # the clamp at n d). Operand and result of a MINIMUM must share one scale.
            t = self.fq(tf.nn.relu(x.t), q)
        elif not x.nonneg:
            # No producer to fuse a ReLU into (the model input): zero point
            # -128, so saturation is the clamp at 0 and one MINIMUM clamps at
            # n d (none with 255 levels; a QUANTIZE in the file, see tfdq.export.clamps).
            # A lone RELU would also leave XNNPACK's graph.
            q = _Q(a.step, -128)
            t = self.fq(x.t, q)
            if a.n < 255:
                t = self.fq(tf.minimum(t, a.n * a.step), q)
        self._tables.zero_points[op.index] = q.zero_point
        return _Val(t, q, False, not a.signed, op.path)

    def activation(self, op, values, kind):
        x = values[op.inputs[0]]
        if kind == "linear":
            return x
        if kind == "softmax":
            x = values[op.inputs[0]]
            if x.q is None:
                x = self.calibrated(x, f"{op.path}:logits", f"logits entering {op.path}", tight=True)
            return self.softmax(x, op.path)
        if kind in CALIBRATED_ACTIVATIONS:
            # LeakyReLU (linear on each side) takes the step of the learned quantizer after it where
            # the range fits; the curved ones a tight scale
            prefer = self.plan.downstream_step(op.outputs[0]) if kind == "leaky_relu" else None
            x = self.quantized(
                values,
                op.inputs[0],
                f"{op.path}:input",
                f"input of {op.path}",
                prefer_step=prefer,
                tight=True,
            )
            return self.calibrated_activation(kind, x, op.path, getattr(op.layer, "negative_slope", 0.2))
        fn = tf.nn.relu if kind == "relu" else tf.nn.relu6
        if x.q is None and x.fusable:
            # fused into the producer: its output scale comes from the next FakeQuant
            return _Val(fn(x.t), None, False, True, op.path)
        concat = self._concat_onto_next_grid(op, values)
        if concat is not None:
            return _Val(self.fq(fn(concat.t), concat.q), concat.q, False, True, op.path)
        x = self.quantized(values, op.inputs[0], f"{op.path}:input", f"input of {op.path}")
        return _Val(self.fq(fn(x.t), x.q), x.q, False, True, op.path)

    def _concat_onto_next_grid(self, op, values):
        """A ReLU that reads an open concatenation and feeds a learned quantizer (NASNet's cells: one
        concatenation, two ReLUs, two quantizers): the concatenation again, its operands straight on
        that quantizer's grid (one QUANTIZE each, as the file's other concatenations), where a
        calibrated scale for the shared concatenation would round them once more and a RELU
        between two scales would not be a same-scale op. None where this does not apply."""
        x = values[op.inputs[0]]
        src = self.plan._producer_op(op.inputs[0])  # noqa: SLF001 (the plan's graph walk)
        if x.q is not None or src is None or self.mode != "export":
            return None
        entry = registry.lookup(src.layer)
        act, _ = self.plan.downstream_quantizer(op.outputs[0])
        if entry is None or entry.rule != "concat" or act is None:
            return None
        q = _Q(act.step, act.zero_point)
        y = tf.concat([values[k].t for k in src.inputs], axis=src.layer.axis)
        return _Val(self.fq(y, q), q, False, x.nonneg, op.path)

    def softmax(self, x, label):
        return self.fixed_range(tf.nn.softmax(x.t), label, "TFLite int8 softmax output")

    def fixed_range(self, t, label, why):
        """Output of SOFTMAX / LOGISTIC: TFLite fixes its int8 scale at 1/256, zero point -128."""
        q = _Q(SOFTMAX_SCALE, -128)
        self._tables.fixed.append({"tensor": label, "scale": SOFTMAX_SCALE, "zero_point": -128, "why": why})
        return _Val(self.fq(t, q), q, False, True, label)

    def const(self, c):
        """A scalar operand as an int8 constant that holds it exactly (level +127 or -128, zero point 0)."""
        c = float(c)
        if self.mode == "float":
            return tf.constant(c)
        lo, hi = (
            (-128.0 * c / 127.0, c)
            if c > 0
            else ((c, -127.0 * c / 128.0) if c < 0 else (-1.0, 127.0 / 128.0))
        )
        return tf.quantization.fake_quant_with_min_max_vars(tf.constant(c), lo, hi, num_bits=8)

    def calibrated_activation(self, kind, x, label, slope=0.2):
        """sigmoid, hard_sigmoid, hard_swish, swish, leaky_relu on a quantized input, as int8 TFLite ops.

        Every intermediate tensor gets its own scale: LOGISTIC's fixed 1/256,
        the others calibrated (listed in the report). ``hard_sigmoid(x) =
        relu6(x + 3) / 6`` (Keras' definition), ``swish(x) = x sigmoid(x)``;
        ``hard_swish(x) = x hard_sigmoid(x)`` is one HARD_SWISH op.
        """
        reason = f"{kind} in {label} (no learned quantizer)"
        if kind == "sigmoid":
            return self.fixed_range(tf.math.sigmoid(x.t), label, "TFLite int8 LOGISTIC output")
        # The final output stays open (q None): a learned quantizer right after it sets its
        # scale, any other consumer calibrates it (Builder.quantized).
        if kind == "gelu":  # TFLite's int8 GELU (exact erf form, as keras.activations.gelu's default)
            return _Val(tf.nn.gelu(x.t, approximate=False), None, False, False, label, tight=True)
        if kind == "leaky_relu":
            return _Val(tf.nn.leaky_relu(x.t, alpha=float(slope)), None, False, False, label, tight=True)
        if kind == "hard_swish":
            # No scale between x and the output: the converter fuses x relu6(x + 3) / 6 into one int8
            # HARD_SWISH, which rounds once, at its output (a learned quantizer's step where one follows)
            return _Val(x.t * tf.nn.relu6(x.t + 3.0) * (1.0 / 6.0), None, False, False, label, tight=True)
        if kind == "swish":
            gate = self.fixed_range(tf.math.sigmoid(x.t), f"{label}:sigmoid", "TFLite int8 LOGISTIC output")
            return _Val(x.t * gate.t, None, False, False, label, tight=True)
        shifted = self.calibrated(
            _Val(x.t + self.const(3.0), None, False, False, label, tight=True),
            f"{label}:x+3",
            reason,
            tight=True,
        )
        clamped = self.fq(tf.nn.relu6(shifted.t), shifted.q)  # RELU6 keeps its input's scale
        gate = _Val(clamped * self.const(1.0 / 6.0), None, False, True, label, tight=True)
        if kind == "hard_sigmoid":
            return gate
        gate = self.calibrated(gate, f"{label}:hard_sigmoid", reason, tight=True)
        return _Val(x.t * gate.t, None, False, False, label, tight=True)

    def elementwise(self, op, values):
        """Two-operand arithmetic (layers Multiply/Subtract/Maximum/Minimum, ``x + 3.0``,
        ``keras.ops.multiply``, ``x / 6.0``): inputs quantized, scalar operands exact int8
        constants, the output calibrated.

        Two cases round once, where Keras does: an ``x + c`` / ``x - c`` on a kernel's output is
        already in that kernel's int32 bias (:func:`_bias_constants`), and an ``x * c`` / ``x / c``
        (c > 0) that a learned quantizer of step ``d`` takes next quantizes its open input ``x`` at
        ``d / c``, so that the int8 MUL computes the learned integers exactly: the rounding of x at
        ``d / c`` is the learned quantizer's rounding of ``x c``, its clamp at ``n d`` the same
        (MobileNetV3's gate ``relu6(conv(x) + 3) * (1 / 6)``: the CONV_2D requantizes at ``6 d``)."""
        label = op.path
        if op.index in self._absorbed:
            return dataclasses.replace(values[op.inputs[0]], label=label)
        scaled = self._scaled_onto_next_grid(op, values)
        if scaled is not None:
            return scaled
        feed = {}
        for i, (k, kt) in enumerate(zip(op.inputs, op.node.input_tensors)):
            feed[id(kt)] = self.quantized(values, k, f"{label}:input{i}", f"input {i} of {label}")
        nonneg = (
            registry.lookup(op.layer).role == registry.MERGE
            and all(v.nonneg for v in feed.values())
            and (not registry.is_operation(op.layer) or _scalar_operands_nonneg(op.node))
        )
        args, _ = op.node.arguments.fill_in({k: v.t for k, v in feed.items()})
        if not registry.is_operation(op.layer):  # a merge layer: one list of tensors
            operands = list(args[0])
        else:
            operands = [a if isinstance(a, tf.Tensor) else self.const(a) for a in args[:2]]
        if isinstance(op.layer, registry.DIVIDE_OPS):  # by a constant (the registry refuses a tensor)
            operands[1] = self.const(1.0 / float(args[1]))
            y = operands[0] * operands[1]
        elif registry.is_operation(op.layer):
            y = op.layer(*operands)
        else:
            y = op.layer(operands)
        return _Val(
            y, None, False, nonneg, label, tight=True
        )  # quantized by its consumer (learned or calibrated)

    def _scaled_onto_next_grid(self, op, values):
        """``x * c`` / ``x / c`` on an open ``x`` computed exactly on the learned grid after it (see
        :meth:`elementwise`), or None where that does not apply."""
        divide = isinstance(op.layer, registry.DIVIDE_OPS)
        if not (divide or isinstance(op.layer, registry.SCALAR_SCALE_OPS)):
            return None
        operand = _scalar_operand(op)
        if operand is None or (divide and operand[0] != 0) or operand[1] == 0:
            return None
        c = 1.0 / operand[1] if divide else operand[1]
        key = op.inputs[0]
        x = values[key]
        if (
            c < 0
            or x.q is not None
            or len(self.plan.consumers.get(key, [])) != 1
            or key in self.plan.output_keys
        ):
            return None
        if not self._from_kernel(key):
            return None  # x would be rounded by the op that makes it, not by the kernel's requantization
        act, _ = self.plan.downstream_quantizer(op.outputs[0])
        if act is None or act.n > (255 if x.nonneg else INT8_MAX):
            return None  # no learned quantizer next, or its range beyond x's int8 levels at d / c
        q = _Q(act.step / c, -128 if x.nonneg else 0)
        self._exact_inputs.add(act.op_index)
        self._tables.derived.append(
            {
                "tensor": f"{op.path}:input0",
                "scale": q.scale,
                "zero_point": q.zero_point,
                "why": (f"step {act.step:g} of {act.layer_name} over the factor {c:g}: the MUL is exact"),
            }
        )
        values[key] = x = _Val(self.fq(x.t, q), q, False, x.nonneg, x.label)
        return _Val(x.t * self.const(c), None, False, x.nonneg, op.path, tight=True)

    def _from_kernel(self, key):
        """True when ``key`` is a kernel's output, through a folded BatchNorm, an ``x + c`` in its bias
        and a fused ReLU/ReLU6: one requantization of the accumulator makes it, at the scale its
        consumer chooses."""
        relu = False
        for _ in range(4):
            op = self.plan._producer_op(key)  # noqa: SLF001 (the plan's graph walk)
            if op is None:
                return False
            if op.index in self.plan.kernels:
                return activation_name(op.layer.activation) in ("linear", "relu", "relu6")
            entry = registry.lookup(op.layer)
            is_relu = (
                entry is not None
                and entry.rule == "activation"
                and activation_rule(op.layer) in ("relu", "relu6")
            )
            if is_relu and not relu:
                relu = True
            elif op.index not in self._absorbed and op.index not in self.plan.folded_bn:
                return False
            key = op.inputs[0]
        return False

    def affine(self, op, values):
        """Rescaling / Normalization ``x a + b`` (scalars): MUL and ADD by exact int8 constants.

        The raw input gets a calibrated scale (a power of two: integer pixel
        values in [0, 255] stay exact at scale 1); the result is quantized by
        the learned quantizer that follows (or calibrated).
        """
        label = op.path
        a, b, _ = registry.scalar_affine(op.layer)
        if a == 1.0 and b == 0.0:
            return values[op.inputs[0]]
        x = self.quantized(values, op.inputs[0], f"{label}:input", f"input of {label}")
        y = _Val(x.t, x.q, False, x.nonneg, label)
        if a != 1.0:
            y = _Val(x.t * self.const(a), None, False, x.nonneg and a > 0, label, tight=True)
        if b != 0.0:
            if y.q is None:
                y = self.calibrated(y, f"{label}:scaled", f"x * scale in {label}", tight=True)
            y = _Val(y.t + self.const(b), None, False, y.nonneg and b > 0, label, tight=True)
        return y

    def layernorm(self, op, values):
        """LayerNormalization over the last axis in int8 ops, every intermediate calibrated.

        ``mu = MEAN(x)``, ``c = x - mu``, ``v = MEAN(c c)``, ``r = RSQRT(v + eps)``, ``n = c r``, then
        ``gamma_i n + beta_i`` as a 1x1 DEPTHWISE_CONV_2D (exact products, as a BatchNorm that cannot
        fold). Each of mu, c, c c, v + eps, r and n gets a calibrated int8 scale (listed in the report):
        the file approximates the Keras layer there.
        """
        label = op.path
        layer = op.layer
        x = self.quantized(values, op.inputs[0], f"{label}:input", f"input of {label}")

        def cal(t, what, nonneg=False):
            return self.calibrated(
                _Val(t, None, False, nonneg, label, tight=True),
                f"{label}:{what}",
                f"{what} inside {label} (LayerNormalization decomposed)",
                tight=True,
            ).t

        mean = cal(tf.reduce_mean(x.t, axis=-1, keepdims=True), "mean")
        centered = cal(x.t - mean, "centered")
        square = cal(centered * centered, "square", nonneg=True)
        var = cal(
            tf.reduce_mean(square, axis=-1, keepdims=True) + self.const(float(layer.epsilon)),
            "variance",
            nonneg=True,
        )
        normalized = _Val(centered * cal(tf.math.rsqrt(var), "rsqrt", nonneg=True), None, False, False, label)
        normalized = self.calibrated(
            normalized, f"{label}:normalized", f"normalized values in {label}", tight=True
        )
        return self.channel_affine(self.plan.layernorms[op.index], normalized, label)

    def scaled_add(self, op, values):
        """keras.applications' CustomScaleLayer ``x + scale * branch``: the branch times the exact int8
        constant ``scale`` (MUL, product calibrated), then ADD (a ReLU after it fuses)."""
        label = op.path
        x, branch = (
            self.quantized(values, k, f"{label}:input{i}", f"input {i} of {label}")
            for i, k in enumerate(op.inputs)
        )
        scaled = _Val(branch.t * self.const(float(op.layer.scale)), None, False, False, label, tight=True)
        scaled = self.calibrated(scaled, f"{label}:scaled", f"scale * branch in {label}", tight=True)
        return _Val(x.t + scaled.t, None, True, False, label)

    def reduce_mean(self, op, values):
        """``keras.ops.mean`` over axes (the squeeze of squeeze-and-excite): MEAN, output calibrated."""
        label = op.path
        x = self.quantized(values, op.inputs[0], f"{label}:input", f"input of {label}")
        y = tf.reduce_mean(x.t, axis=op.layer.axis, keepdims=bool(op.layer.keepdims))
        out = _Val(y, None, False, x.nonneg, label)
        return self.calibrated(out, label, "average of quantized values (not on the input grid)")

    def same_scale_op(self, op, values):
        """``keras.ops.reshape`` / ``transpose`` / ``squeeze`` / ``expand_dims``: values move, scale kept."""
        label = op.path
        x = self.quantized(values, op.inputs[0], f"{label}:input", f"input of {label}")
        args, kwargs = op.node.arguments.fill_in({id(op.node.input_tensors[0]): x.t})
        y = op.layer(*args, **kwargs)
        return _Val(self.fq(y, x.q), x.q, False, x.nonneg, label)

    def add(self, op, values):
        label = op.path
        keys = list(op.inputs)
        # Quantize learned inputs first so that the calibrated one can align to them.
        d_out = self.plan.downstream_step(op.outputs[0])
        order = sorted(range(len(keys)), key=lambda i: values[keys[i]].q is None)
        for i in order:
            others = [values[keys[j]] for j in range(len(keys)) if j != i]
            prefer = d_out
            if prefer is not None:
                for o in others:
                    if o.q is None or o.q is _CALIBRATING:
                        continue
                    ratio = o.q.scale / prefer
                    if ratio < 1 or ratio != round(ratio):
                        prefer = None
                        break
            self.quantized(values, keys[i], f"{label}:input{i}", f"input {i} of {label}", prefer)
        xs = [values[k] for k in keys]
        if registry.is_difference(op.layer):  # x - y: on the same grids, one sign flipped (SUB)
            return _Val(xs[0].t - xs[1].t, None, True, False, label)
        y = xs[0].t + xs[1].t
        return _Val(y, None, True, all(x.nonneg for x in xs), label)

    def weighted(self, op, x):
        plan = self.plan.kernels[op.index]
        layer = op.layer
        name = f"{KERNEL_TAG}{op.index}"
        if plan.kind == "prelu":
            return self.prelu(op, plan, x)
        if self.mode == "float":
            kernel, bias = self.float_weights[op.index]
            kernel = tf.constant(kernel)
            y = self._apply_kernel(plan, layer, x.t, kernel, per_channel_dense=False)
            if bias is not None:
                y = tf.nn.bias_add(y, bias)
            if plan.per_channel:
                w = self.plan.bn[op.index]
                y = y * w["factor"].astype(np.float32) + (w["beta"] - w["mean"] * w["factor"]).astype(
                    np.float32
                )
            if op.index in self._bias_constants:
                y = y + np.float32(self._bias_constants[op.index][1])
        else:
            self._fit_multiplier(op, plan, x)
            folded = plan.folded_kernel()
            n = plan.fq_max
            if plan.per_channel:
                scales = plan.scales()
                lo = (-n * scales).astype(np.float32)
                hi = (n * scales).astype(np.float32)
                if plan.kind == "dense":
                    folded = folded[None, None]  # [1, 1, in, out]: exported as a 1x1 convolution
                kernel = tf.quantization.fake_quant_with_min_max_vars_per_channel(
                    tf.constant(folded),
                    lo,
                    hi,
                    num_bits=plan.fq_bits,
                    narrow_range=True,
                    name=name if plan.kind != "depthwise" else None,
                )
            else:
                kernel = tf.quantization.fake_quant_with_min_max_vars(
                    tf.constant(folded),
                    -n * plan.scales()[0],
                    n * plan.scales()[0],
                    num_bits=plan.fq_bits,
                    narrow_range=True,
                    name=name if plan.kind != "depthwise" else None,
                )
            if plan.kind == "depthwise":  # plan.k: [h, w, C, m] (a grouped Conv2D's kernel transposed)
                kernel = tf.reshape(kernel, plan.k.shape, name=name)
            y = self._apply_kernel(plan, layer, x.t, kernel, per_channel_dense=plan.per_channel)
            bias = self.bias(op, plan, x)
            if bias is not None:
                y = tf.nn.bias_add(y, bias)
        val = _Val(y, None, True, False, op.path)
        act = activation_name(layer.activation)
        if act in ("relu", "relu6"):
            fn = tf.nn.relu if act == "relu" else tf.nn.relu6
            return _Val(fn(y), None, False, True, op.path)
        if act == "softmax":
            val = self.calibrated(
                val, f"{op.path}:logits", f"logits of {op.path} entering its softmax", tight=True
            )
            return self.softmax(val, op.path)
        rule = activation_rule(layer)
        if rule in CALIBRATED_ACTIVATIONS:
            val = self.calibrated(
                val, f"{op.path}:preactivation", f"output of {op.path} before its {act}", tight=True
            )
            return self.calibrated_activation(rule, val, op.path)
        if act != "linear":
            raise ExportError(
                f"{op.path}: activation {act!r} has no exact integer export (use relu, relu6, "
                "linear, or softmax at the output)."
            )
        return val

    def batchnorm(self, op, values):
        """A BatchNormalization that cannot fold: a 1x1 DEPTHWISE_CONV_2D (see :class:`BatchNormPlan`).

        Its output is open (fusable, like a convolution's): the learned
        quantizer after it (a ReLU fused) sets the scale, or its consumer
        calibrates it.
        """
        bplan = self.plan.standalone_bn[op.index]
        label = op.path
        x = self.quantized(values, op.inputs[0], f"{label}:input", f"input of {label}")
        return self.channel_affine(bplan, x, label)

    def channel_affine(self, bplan, x, label):
        """``x a_c + b_c`` (a :class:`BatchNormPlan`) on the quantized ``x``: a 1x1 DEPTHWISE_CONV_2D."""
        t = x.t
        c = bplan.factor.shape[0]
        if bplan.rank == 2:
            t = tf.reshape(t, [-1, 1, 1, c])
        if self.mode != "export" or x.q is None or x.q is _CALIBRATING:
            y = t * bplan.factor.astype(np.float32) + bplan.offset.astype(np.float32)
        else:
            s_in = x.q.scale
            scales = bplan.scales(s_in)
            kernel = (bplan.integers(s_in) * scales).astype(np.float32).reshape(1, 1, 1, c)
            kernel = tf.quantization.fake_quant_with_min_max_vars_per_channel(
                tf.constant(kernel),
                (-INT8_MAX * scales).astype(np.float32),
                (INT8_MAX * scales).astype(np.float32),
                num_bits=8,
                narrow_range=True,
            )
            kernel = tf.reshape(kernel, [1, 1, c, 1])
            y = tf.nn.depthwise_conv2d(t, kernel, strides=[1, 1, 1, 1], padding="VALID")
            acc = bplan.accumulator_bias(s_in)
            if np.max(np.abs(acc["integer"])) > INT32_MAX:
                raise ExportError(
                    f"{label}: a bias beyond int32 accumulator units (untrained BatchNorm statistics?): "
                    "train or re-estimate the BatchNorm statistics on real data before exporting."
                )
            self._tables.bn_biases[bplan.op_index] = dict(acc, layer=label, s_in=s_in, s_out=None)
            y = tf.nn.bias_add(y, (acc["integer"] * acc["unit"]).astype(np.float32))
        if bplan.rank == 2:
            y = tf.reshape(y, [-1, c])
        return _Val(y, None, True, False, label)

    def bias(self, op, plan, x):
        """The float bias constant whose int32 quantization is the planned integer.

        In export mode the converter quantizes it at ``s_in * scale_c`` to
        exactly :meth:`KernelPlan.accumulator_bias`'s integers (recorded in
        the run's ``biases`` table with the residual that :func:`~tfdq.export.align.align_biases` removes).
        """
        bn = self.plan.bn.get(op.index)
        extra = self._bias_constants.get(op.index, (None, 0.0))[1]  # an x + c after it
        if self.mode != "export" or x.q is None or x.q is _CALIBRATING:
            bias = plan.folded_bias(bn)
            if extra:
                bias = (np.zeros(plan.out_channels) if bias is None else bias) + extra
            return None if bias is None else np.asarray(bias, np.float32)
        s_out, nonneg = self.plan.kernel_output(op.index)
        acc = plan.accumulator_bias(bn, x.q.scale, s_out, nonneg, extra=extra)
        if acc is None:
            return None
        if np.max(np.abs(acc["integer"])) > INT32_MAX:
            worst = int(np.argmax(np.abs(acc["integer"])))
            raise ExportError(
                f"{op.path}: the bias of output channel {worst} is {acc['real'][worst]:.4g} accumulator "
                f"units (input scale {x.q.scale:g} times kernel scale {plan.scales()[worst]:g}), beyond "
                "int32. This comes from a BatchNormalization whose statistics are not trained (a "
                "moving mean far from the data, or a gamma near zero with a large beta): train or "
                "re-estimate the BatchNorm statistics on real data before exporting."
            )
        self._tables.biases[op.index] = dict(acc, layer=plan.layer_name, s_in=x.q.scale, s_out=s_out)
        return (acc["integer"] * acc["unit"]).astype(np.float32)

    def _fit_multiplier(self, op, plan, x):
        """:meth:`KernelPlan.fit_multiplier` for a kernel that XNNPACK runs, once its input scale and
        its output's learned step are known (export mode; the bias that follows uses the same scales)."""
        if self.mode != "export" or x.q is None or x.q is _CALIBRATING or plan.rounds_twice:
            return
        s_out, _ = self.plan.kernel_output(op.index)
        if s_out is not None:
            plan.fit_multiplier(x.q.scale, s_out)

    def prelu(self, op, plan, x):
        """PReLU ``relu(x) + Q(alpha) min(x, 0)`` in int8 ops: RELU and MINIMUM (a QUANTIZE in the file) keep the input's
        scale, the MUL by the learned int8 slopes (exactly the learned integers) gets a calibrated
        scale, and the ADD's output is quantized by its consumer (a learned quantizer's step)."""
        if self.mode == "float":
            alpha = tf.constant(self.float_weights[op.index][0])
        else:
            step = plan.scales()[0]
            alpha = tf.quantization.fake_quant_with_min_max_vars(
                tf.constant(plan.folded_kernel()),
                -plan.fq_max * step,
                plan.fq_max * step,
                num_bits=plan.fq_bits,
                narrow_range=True,
                name=f"{KERNEL_TAG}{op.index}",
            )
        positive = self.fq(tf.nn.relu(x.t), x.q)
        negative = self.fq(tf.minimum(x.t, 0.0), x.q)
        product = self.calibrated(
            _Val(negative * alpha, None, False, False, op.path, tight=True),
            f"{op.path}:alpha*min(x,0)",
            f"negative part of {op.path} times its slopes (no learned quantizer)",
            tight=True,
        )
        return _Val(positive + product.t, None, False, False, op.path, tight=True)

    def _apply_kernel(self, plan, layer, x, kernel, per_channel_dense):
        if plan.kind == "conv":
            return tf.nn.conv2d(
                x,
                kernel,
                strides=list(layer.strides),
                padding=layer.padding.upper(),
                dilations=list(layer.dilation_rate),
            )
        if plan.kind == "depthwise":
            return tf.nn.depthwise_conv2d(
                x,
                kernel,
                strides=[1, *layer.strides, 1],
                padding=layer.padding.upper(),
                dilations=list(layer.dilation_rate),
            )
        if plan.kind == "transpose":
            # TRANSPOSE_CONV: its kernel tensor in the file takes this op's name (the tag)
            out_shape = [int(v) for v in layer.compute_output_shape(x.shape)[1:]]
            return tf.nn.conv2d_transpose(
                x,
                kernel,
                tf.stack([tf.shape(x)[0], *out_shape]),
                strides=[1, *layer.strides, 1],
                padding=layer.padding.upper(),
                name=f"{KERNEL_TAG}{plan.op_index}",
            )
        rank = len(x.shape)
        if per_channel_dense:
            y = tf.nn.conv2d(tf.reshape(x, [-1, 1, 1, x.shape[-1]]), kernel, strides=1, padding="VALID")
            return tf.reshape(y, [-1, kernel.shape[-1]])
        if rank == 2:
            return tf.matmul(x, kernel)
        inner = [int(s) for s in x.shape[1:-1]]
        y = tf.matmul(tf.reshape(x, [-1, x.shape[-1]]), kernel)
        return tf.reshape(y, [-1, *inner, kernel.shape[-1]])


def trace(builder, specs):
    """Trace ``builder`` into a ``tf.function`` over ``specs``; ``(function, BuildTables)``.

    The function returns the model's output (a list for several outputs);
    the tables are those of the trace (every later call computes the same
    graph).
    """
    traced = {}

    @tf.function(input_signature=specs, autograph=False)
    def fn(*xs):
        outs, traced["tables"] = builder.run(list(xs))
        return outs[0] if len(outs) == 1 else outs

    fn.get_concrete_function()
    return fn, traced["tables"]
