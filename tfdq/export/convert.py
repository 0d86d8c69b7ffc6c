"""Building the TF graph that the TFLite converter turns into the integer model.

:class:`Builder` evaluates the planned Keras graph with TensorFlow ops and
FakeQuant where TFLite needs a scale: kernels (the learned integers times
their scale), activation quantizers (the learned step), and, calibrated on
data, the tensors no learned quantizer covers. :func:`to_tflite` converts it
and reads the file back.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import keras
import numpy as np
import tensorflow as tf

from tfdq import registry
from tfdq.export.flatbuffer import find_bias, find_kernel, float_ops, inspect_tflite, unpack_integers
from tfdq.export.plan import (
    INT8_MAX,
    KERNEL_TAG,
    OUTPUT_HEADROOM,
    SOFTMAX_SCALE,
    ExportError,
    Plan,
    activation_name,
    activation_rule,
    resolve_storage,
)
from tfdq.export.storage import kernel_storage, settle_storage
from tfdq.models import ZeroPadShortcut

CALIBRATED_ACTIVATIONS = ("sigmoid", "hard_sigmoid", "hard_swish", "swish", "leaky_relu", "gelu")


def _scalar_operands_nonneg(node):
    """Every number among a node's first two arguments is >= 0."""
    for a in node.arguments.args[:2]:
        if not isinstance(a, keras.KerasTensor) and float(np.min(a)) < 0:
            return False
    return True


class ExportReport(dict):
    """What :func:`to_tflite` did (a dict, JSON-serializable).

    Keys: ``kernels`` (per quantized layer: bits, integer range, storage,
    scale kind, folded BatchNorm), ``activations`` (per activation
    quantizer: step, levels, zero point, clamp), ``calibrated`` (tensors whose
    scale was calibrated on the user's data, with the reason), ``fixed``
    (tensors whose scale TFLite's spec fixes, e.g. softmax), ``batchnorms``
    (BatchNormalizations that could not fold and per-channel Rescaling /
    Normalization layers, each a 1x1 DEPTHWISE_CONV_2D: input scale and
    whether its int32 bias is exact), ``options``.
    """


# ---------------------------------------------------------------------------
# TF graph building
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
        self.points = {}
        self.float_weights = {}
        if mode == "float":  # read here: the graph is traced without eager values
            for i in plan.kernels:
                layer = plan.ops[i].layer
                bias = np.asarray(layer.bias.numpy(), np.float32) if layer.use_bias else None
                kernel = np.asarray(layer.kernel.numpy(), np.float32)
                if plan.kernels[i].kind == "depthwise" and kernel.shape != plan.kernels[i].k.shape:
                    kernel = np.transpose(kernel, (0, 1, 3, 2))  # a grouped Conv2D as depthwise
                self.float_weights[i] = (kernel, bias)
        self.calibrated_info = []
        self.fixed = []
        self.missing = []
        self.biases = {}
        self.bn_biases = {}  # standalone BatchNorm op index -> its planned int32 bias
        self.zero_points = {}

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
            self.points[name] = val.t
            return dataclasses.replace(val, q=_CALIBRATING, fusable=False)
        st = self.stats.get(name)
        if st is None:
            self.missing.append((name, reason))
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
        self.calibrated_info.append(
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
        plan = self.plan
        self.points, self.calibrated_info, self.fixed, self.missing = {}, [], [], []
        self.biases = {}
        self.bn_biases = {}
        self.zero_points = {}
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
        return results

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
            x = self.quantized(values, op.inputs[0], f"{label}:input", f"input of {label}")
            y = self.same_scale(layer, x.t)
            return [_Val(self.fq(y, x.q), x.q, False, x.nonneg, label)]
        if rule == "average":
            x = self.quantized(values, op.inputs[0], f"{label}:input", f"input of {label}")
            learned_next = self.plan.downstream_step(op.outputs[0]) is not None
            if isinstance(layer, keras.layers.GlobalAveragePooling2D):
                if learned_next and self.mode == "export" and x.q is not None:
                    s_out = self.plan.downstream_step(op.outputs[0])
                    y = self.global_mean_as_conv(x, s_out, bool(layer.keepdims))
                else:
                    y = tf.reduce_mean(x.t, axis=[1, 2], keepdims=bool(layer.keepdims))
            elif learned_next and self.mode == "export" and x.q is not None and layer.padding == "valid":
                s_out = self.plan.downstream_step(op.outputs[0])
                y = self.mean_as_conv(x, s_out, tuple(layer.pool_size), tuple(layer.strides))
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
        if rule == "add" or (
            rule == "elementwise" and registry.is_tensor_sum(op.layer, op.node)
        ):  # x + y of two feature maps on learned grids: exact, like the Add layer
            return [self.add(op, values)]
        if rule == "elementwise":
            return [self.elementwise(op, values)]
        if rule == "affine":
            return [self.affine(op, values)]
        if rule == "scaled_add":
            return [self.scaled_add(op, values)]
        if rule == "layernorm":
            return [self.layernorm(op, values)]
        if rule == "mean":
            return [self.reduce_mean(op, values)]
        if rule == "same_scale_op":
            return [self.same_scale_op(op, values)]
        if rule == "concat":
            xs = [
                self.quantized(values, k, f"{label}:input{i}", f"input {i} of {label}")
                for i, k in enumerate(op.inputs)
            ]
            y = tf.concat([x.t for x in xs], axis=layer.axis)
            return [_Val(y, None, False, all(x.nonneg for x in xs), label)]
        raise ExportError(f"No integer export for {op.path} ({type(layer).__name__}).")

    def global_mean_as_conv(self, x, s_out, keepdims):
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
        element for element.
        """
        h, w, c = (int(v) for v in x.t.shape[1:])
        y = self.mean_as_conv(x, s_out, (h, w), (1, 1))
        return y if keepdims else tf.reshape(y, [-1, c])

    def mean_as_conv(self, x, s_out, window, strides):
        """Averages over ``window`` (VALID padding) as a DEPTHWISE_CONV_2D with a constant int8 kernel
        (see :meth:`global_mean_as_conv`; an AVERAGE_POOL_2D would need the same scale on both sides)."""
        t = x.t
        h, w = window
        c = int(t.shape[-1])
        n = h * w
        ratio = x.q.scale / (n * s_out)
        nudge = x.nonneg and n & (n - 1) == 0 and ratio <= 0.5
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
        t = self.fq(x.t, q)
        if self.mode == "float":
            return _Val(x.t, q, False, not a.signed, op.path)
        if a.signed:
            # zero point n - 128: int8 saturation is the clamp at -n d; the
            # clamp at +n d is one MINIMUM.
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
            # n d (none with 255 levels). A lone RELU would also leave
            # XNNPACK's graph.
            q = _Q(a.step, -128)
            t = self.fq(x.t, q)
            if a.n < 255:
                t = self.fq(tf.minimum(t, a.n * a.step), q)
        self.zero_points[op.index] = q.zero_point
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
        x = self.quantized(values, op.inputs[0], f"{op.path}:input", f"input of {op.path}")
        return _Val(self.fq(fn(x.t), x.q), x.q, False, True, op.path)

    def softmax(self, x, label):
        return self.fixed_range(tf.nn.softmax(x.t), label, "TFLite int8 softmax output")

    def fixed_range(self, t, label, why):
        """Output of SOFTMAX / LOGISTIC: TFLite fixes its int8 scale at 1/256, zero point -128."""
        q = _Q(SOFTMAX_SCALE, -128)
        self.fixed.append({"tensor": label, "scale": SOFTMAX_SCALE, "zero_point": -128, "why": why})
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
        constants, the output calibrated."""
        label = op.path
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
        else:
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
            self.bn_biases[bplan.op_index] = dict(acc, layer=label, s_in=s_in, s_out=None)
            y = tf.nn.bias_add(y, (acc["integer"] * acc["unit"]).astype(np.float32))
        if bplan.rank == 2:
            y = tf.reshape(y, [-1, c])
        return _Val(y, None, True, False, label)

    def bias(self, op, plan, x):
        """The float bias constant whose int32 quantization is the planned integer.

        In export mode the converter quantizes it at ``s_in * scale_c`` to
        exactly :meth:`KernelPlan.accumulator_bias`'s integers (recorded in
        ``self.biases`` with the residual that :func:`align_biases` removes).
        """
        bn = self.plan.bn.get(op.index)
        if self.mode != "export" or x.q is None or x.q is _CALIBRATING:
            return plan.folded_bias(bn)
        s_out, nonneg = self.plan.kernel_output(op.index)
        acc = plan.accumulator_bias(bn, x.q.scale, s_out, nonneg)
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
        self.biases[op.index] = dict(acc, layer=plan.layer_name, s_in=x.q.scale, s_out=s_out)
        return (acc["integer"] * acc["unit"]).astype(np.float32)

    def prelu(self, op, plan, x):
        """PReLU ``relu(x) + Q(alpha) min(x, 0)`` in int8 ops: RELU and MINIMUM keep the input's
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


# ---------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------


def _input_specs(model):
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


def _as_batches(data, batch_size=256, limit=None):
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


def _collect_stats(plan, calibration_data, max_samples):
    builder = Builder(plan, "calibrate")
    specs = _input_specs(plan.model)

    @tf.function(input_signature=specs, autograph=False)
    def probe(*xs):
        builder.run(list(xs))
        return dict(builder.points)

    concrete = probe.get_concrete_function()
    names = list(builder.points)
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
    for batch in _as_batches(calibration_data, limit=max_samples):
        if len(batch) != len(specs) or any(b.shape[1:] != tuple(s.shape[1:]) for b, s in zip(batch, specs)):
            raise ExportError(
                f"calibration_data has inputs of shape {[b.shape[1:] for b in batch]}; the "
                f"model takes {[tuple(s.shape[1:]) for s in specs]}."
            )
        out = concrete(*[tf.constant(b) for b in batch])
        for n in names:
            v = out[n].numpy()
            s = stats[n]
            s["max_abs"] = max(s["max_abs"], float(np.max(np.abs(v))))
            s["min"] = min(s["min"], float(np.min(v)))
            s["samples"] += int(v.shape[0])
    if not any(s["samples"] for s in stats.values()):
        raise ExportError("calibration_data is empty.")
    return stats


def _convert(fn, specs, input_type, output_type):
    concrete = fn.get_concrete_function(*specs)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], fn)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.inference_input_type = input_type
    converter.inference_output_type = output_type
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
        return converter.convert()


_TYPES = {"int8": tf.int8, "float32": tf.float32, "float": tf.float32}


def _trace_export(model, calibration_data, storage, calibration_samples):
    """Plan, calibrate and trace the export graph; ``(plan, builder, tf.function, specs)``."""
    from tfdq import nonfinite, validate  # noqa: PLC0415

    validate.refuse_mixed_precision(model, "export a model")
    bad = nonfinite.nonfinite_variables(model)
    if bad:
        raise ExportError(
            "the model holds NaN or Inf values in "
            + ", ".join(bad[:8])
            + (" ..." if len(bad) > 8 else "")
            + ": a non-finite training step poisoned them. Export an earlier checkpoint, or retrain "
            "(tfdq's fit skips non-finite steps)."
        )
    try:
        calibration_data = validate.calibration_inputs(model, calibration_data)
    except ValueError as e:
        raise ExportError(str(e)) from None
    plan = Plan(model, storage=storage)
    stats = _collect_stats(plan, calibration_data, calibration_samples)
    builder = Builder(plan, "export", stats)
    specs = _input_specs(model)

    @tf.function(input_signature=specs, autograph=False)
    def exported(*xs):
        outs = builder.run(list(xs))
        return outs[0] if len(outs) == 1 else outs

    exported.get_concrete_function()
    if builder.missing:
        raise ExportError(f"Internal error: no statistics for {builder.missing}.")
    return plan, builder, exported, specs


def _clamp_text(a, zero_point):
    if a.signed:
        return "MINIMUM at n*d, int8 saturation at -n*d"
    if zero_point == -128:
        return "int8 saturation at 0" + (", MINIMUM at n*d" if a.n < 255 else "")
    return "int8 saturation at q_max, ReLU at 0"


def _bias_entry(b):
    return {
        "layer": b["layer"],
        "input_scale": float(b["s_in"]),
        "output_scale": None if b["s_out"] is None else float(b["s_out"]),
        "max_abs_residual": float(np.max(np.abs(b["residual"]))),
        "requantization_shift": [float(np.min(b["shift"])), float(np.max(b["shift"]))],
        "exact": bool(np.all(np.abs(b["residual"]) < 1e-3)) and b.get("file_difference", 0) == 0,
        # int32 biases beyond 2^22 accumulator units carry the converter's float32 rounding
        "max_abs_integer": int(np.max(np.abs(b["integer"]), initial=0)),
        "file_difference": int(b.get("file_difference", 0)),
    }


def align_biases(
    model: keras.Model,
    calibration_data=None,
    *,
    storage: str | None = None,
    int4_kernels: bool | None = None,
    calibration_samples: int = 1000,
) -> list[dict]:
    """Move each folded BatchNorm's beta so that the file's int32 bias is exact.

    TFLite adds an integer bias to the accumulator (unit ``u_c = s_in d
    |s_c|``); the Keras layer adds ``B_c = folded_bias_c / u_c`` units, in
    general not an integer, so the file would round it (up to half a unit)
    and outputs near a rounding threshold come out one step off. This sets
    ``beta_c += (round(B_c - w_c) - (B_c - w_c)) u_c`` (``w_c``: the shift of
    LiteRT's two-rounding int4 convolutions, see
    :meth:`KernelPlan.accumulator_bias`; zero for every kernel that XNNPACK
    runs, the int4/int2 FULLY_CONNECTED included), so that the Keras model itself
    computes what the integer file computes. Each beta moves by at most half
    an accumulator unit (the report gives it in output steps too).

    Call it once training is over (BatchNorm statistics and quantizers fixed:
    after :func:`tfdq.constraints.freeze_quantizers` and the last ``fit``),
    with the same ``storage`` as the export (the shift follows the
    storage each layer gets under it); save the aligned model if
    you want to reproduce the file. Layers without BatchNorm already have
    exact biases (their ``Q(bias)`` lies on the step ``d`` grid).

    Args:
        model: a trained tfdq model; changed in place.
        calibration_data: as for :func:`to_tflite` (needed when a layer's
            input has no learned quantizer).
        storage, int4_kernels, calibration_samples: as for :func:`to_tflite`.

    Returns:
        A list of dicts, one per BatchNorm-folded layer: ``layer``,
        ``batchnorm``, ``aligned`` (False, with a ``reason``, for a
        BatchNormalization without beta: its bias stays rounded),
        ``max_beta_change``, ``max_change_output_steps`` (None where no
        learned quantizer takes the layer's output, so there is no output
        step; never NaN) and ``max_change_accumulator_units``.
    """
    storage = resolve_storage(storage, int4_kernels)
    plan, builder, _, _ = _trace_export(model, calibration_data, storage, calibration_samples)
    changes = []
    layers_by_path = {op.path: op.layer for op in plan.ops}
    for index, b in builder.biases.items():
        kplan = plan.kernels[index]
        if kplan.bn_name is None:
            continue
        bn = layers_by_path[kplan.bn_name]
        delta = -b["residual"] * b["unit"]
        step = b["s_out"]  # None: no learned quantizer takes the output (then in accumulator units only)
        if not bn.center:
            # no beta to move: this layer's bias stays rounded (the report says so)
            changes.append(
                {
                    "layer": kplan.layer_name,
                    "batchnorm": kplan.bn_name,
                    "aligned": False,
                    "reason": "BatchNormalization(center=False) has no beta",
                    "max_beta_change": 0.0,
                    "max_change_output_steps": 0.0,
                }
            )
            continue
        bn.beta.assign((np.asarray(bn.beta.numpy(), np.float64) + delta).astype(np.float32))
        changes.append(
            {
                "layer": kplan.layer_name,
                "batchnorm": kplan.bn_name,
                "aligned": True,
                "max_beta_change": float(np.max(np.abs(delta))),
                "max_change_output_steps": None if step is None else float(np.max(np.abs(delta)) / step),
                "max_change_accumulator_units": float(np.max(np.abs(b["residual"]))),
            }
        )
    changes += _align_standalone_batchnorms(plan, builder, layers_by_path)
    return changes


def _align_standalone_batchnorms(plan, builder, layers_by_path):
    """align_biases for BatchNorms exported on their own (:class:`BatchNormPlan`): beta moves so that
    ``b_c`` is a whole number of accumulator units."""
    changes = []
    for index, b in builder.bn_biases.items():
        bplan = plan.standalone_bn.get(index)
        if bplan is None:
            continue  # the gamma/beta step of a decomposed LayerNormalization
        bn = layers_by_path[bplan.layer_name]
        if not isinstance(bn, keras.layers.BatchNormalization):
            continue  # a per-channel Rescaling / Normalization: fixed constants, its bias stays rounded
        entry = {"layer": bplan.layer_name, "batchnorm": bplan.layer_name, "standalone": True}
        if not bn.center:
            changes.append(
                dict(
                    entry,
                    aligned=False,
                    reason="BatchNormalization(center=False) has no beta",
                    max_beta_change=0.0,
                    max_change_output_steps=None,
                )
            )
            continue
        delta = -b["residual"] * b["unit"]
        bn.beta.assign((np.asarray(bn.beta.numpy(), np.float64) + delta).astype(np.float32))
        step = plan.downstream_step(plan.ops_by_index[index].outputs[0])
        changes.append(
            dict(
                entry,
                aligned=True,
                max_beta_change=float(np.max(np.abs(delta))),
                max_change_output_steps=None if step is None else float(np.max(np.abs(delta)) / step),
                max_change_accumulator_units=float(np.max(np.abs(b["residual"]))),
            )
        )
    return changes


def to_tflite(
    model: keras.Model,
    calibration_data=None,
    *,
    input_type: str = "int8",
    output_type: str = "int8",
    storage: str | None = None,
    int4_kernels: bool | None = None,
    calibration_samples: int = 1000,
    return_report: bool = False,
) -> bytes | tuple[bytes, ExportReport]:
    """Convert a trained tfdq model to a full-integer TFLite flatbuffer.

    Kernels hold the learned integers ``k`` (``|k| <= 2^(b-1) - 1``) with
    scale ``d`` per tensor, or ``d |s_c|`` per output channel where a
    BatchNormalization is folded (``s_c = gamma_c / sqrt(var_c + eps)``);
    how each is stored is the ``storage`` policy's choice. Activation
    tensors use the learned step ``d`` as scale and are clamped at the learned
    ``q_max``. See the module docstring for the exact rules.

    Args:
        model: a tfdq model (``tfdq.quantize_model`` output, trained).
        calibration_data: inputs (array, list of arrays, ``(x, y)`` tuple or a
            ``tf.data.Dataset``) used to choose the scales of tensors that no
            learned quantizer covers (at least the logits). Every such tensor
            is listed in the report.
        input_type, output_type: ``"int8"`` (default) or ``"float32"``.
        storage: how kernels are stored; the integers are the same in each.
            ``"fast"`` (default): every operator where LiteRT's XNNPACK
            delegate runs it, then the fewest bytes: a Dense or 1x1 stride-1
            convolution with ``b <= 4`` becomes a FULLY_CONNECTED with
            per-channel int4 weights (``b <= 2``: int2), which XNNPACK runs
            when the input channels are even (int2: a multiple of 4; else
            one step wider, with a ``storage_note``); other convolutions
            int8 (XNNPACK runs no sub-byte CONV_2D/DEPTHWISE_CONV_2D).
            ``"smallest"``: int4/int2 wherever LiteRT runs it (int4
            CONV_2D/DEPTHWISE_CONV_2D in its slower builtin kernels).
            ``"int8"``: every kernel int8. The report gives, per layer, the
            operator, storage, bytes and whether LiteRT's XNNPACK runs it
            (asked of the runtime).
        int4_kernels: deprecated: ``True`` is ``storage="smallest"``,
            ``False`` is ``storage="int8"``.
        calibration_samples: at most this many calibration inputs are used.
        return_report: also return an :class:`ExportReport`.

    Returns:
        The ``.tflite`` bytes, or ``(bytes, report)``.

    Raises:
        ExportError: no tfdq quantizers, bitwidths above 8, power-of-two grids
            that do not fit int8, unsupported layers (named), missing
            calibration data, or a converted file that does not hold the
            learned integers or still computes in float.
    """
    if input_type not in _TYPES or output_type not in _TYPES:
        raise ValueError(
            f"input_type/output_type must be 'int8' or 'float32', got {input_type!r}/{output_type!r}."
        )
    storage = resolve_storage(storage, int4_kernels)
    plan, builder, exported, specs = _trace_export(model, calibration_data, storage, calibration_samples)
    converted = _convert(exported, specs, _TYPES[input_type], _TYPES[output_type])
    tflite, delegated = settle_storage(converted, plan)
    info = inspect_tflite(tflite)
    _check_file(plan, info, builder, tflite)
    in_file = kernel_storage(plan, info, delegated)
    report = ExportReport(
        kernels=[dict(_kernel_entry(p), **in_file.get(p.op_index, {})) for p in plan.kernels.values()],
        activations=[
            {
                "layer": a.layer_name,
                "quantizer": a.quantizer,
                "signed": a.signed,
                "bits": a.bits,
                "d": a.step,
                "levels_max": a.n,
                "scale": a.step,
                "zero_point": builder.zero_points.get(a.op_index, a.zero_point),
                "clamp": _clamp_text(a, builder.zero_points.get(a.op_index, a.zero_point)),
            }
            for a in plan.acts.values()
        ],
        calibrated=list(builder.calibrated_info),
        biases=[_bias_entry(b) for b in builder.biases.values()],
        batchnorms=[
            {
                "layer": b["layer"],
                "op": "DEPTHWISE_CONV_2D 1x1 (per-channel multiply-add)",
                "input_scale": float(b["s_in"]),
                "max_abs_residual": float(np.max(np.abs(b["residual"]))),
                "exact": bool(np.all(np.abs(b["residual"]) < 1e-3)),
            }
            for b in builder.bn_biases.values()
        ],
        fixed=list(builder.fixed),
        options={"input_type": input_type, "output_type": output_type, "storage": storage},
        file_bytes=len(tflite),
    )
    return (tflite, report) if return_report else tflite


def save_tflite(model, path, calibration_data=None, **kwargs):
    """Write ``to_tflite(model, calibration_data, **kwargs)`` to ``path``; return the report."""
    tflite, report = to_tflite(model, calibration_data, return_report=True, **kwargs)
    with open(path, "wb") as f:
        f.write(tflite)
    report["path"] = str(path)
    return report


def float_tflite(model):
    """A float32 ``.tflite`` of the model's float version (quantizers removed).

    Float kernels (not quantized), no FakeQuant, no optimization: the size
    reference for the integer file.
    """
    plan = Plan(model, storage="int8")
    builder = Builder(plan, "float")
    specs = _input_specs(model)

    @tf.function(input_signature=specs, autograph=False)
    def fn(*xs):
        outs = builder.run(list(xs))
        return outs[0] if len(outs) == 1 else outs

    concrete = fn.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], fn)
    return converter.convert()


def _kernel_entry(p):
    k = p.exported_integers()
    return {
        "layer": p.layer_name,
        "kind": p.kind,
        "quantizer": p.quantizer,
        "family": p.family,
        "bits": p.bits,
        "step": p.step,
        "allowed": [-p.n_allowed, p.n_allowed],
        "range": [int(k.min()), int(k.max())],
        "storage": p.storage,
        "storage_note": p.storage_note,
        "input_channels": p.in_channels,
        "scale": "per-channel d*|s_c|" if p.per_channel else "per-tensor d",
        "folded_batchnorm": p.bn_name,
        "negative_bn_channels": int(np.sum(p.channel_factor < 0)) if p.per_channel else 0,
        "count": p.count,
    }


BIAS_EXACT_BELOW = 2**22  # int32 biases below this survive the converter's float32 arithmetic exactly
INT32_MAX = 2**31 - 1


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


def _check_file(plan, info, builder, tflite_bytes):
    """Raise unless the file holds the planned integers, scales and types."""
    problems = []
    bad = float_ops(info)
    if bad:
        problems.append(f"operators compute in float: {sorted(set(bad))}")
    # Every int8 activation tensor must carry a scale that we chose.
    chosen = [a.step for a in plan.acts.values()]
    chosen += [c["scale"] for c in builder.calibrated_info] + [f["scale"] for f in builder.fixed]
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
        expected = p.tflite_layout(p.exported_integers())
        if list(expected.shape) != t["shape"]:
            problems.append(f"{p.layer_name}: kernel shape {t['shape']}, expected {list(expected.shape)}")
            continue
        stored = unpack_integers(t, tflite_bytes)
        if not np.array_equal(stored, expected):
            problems.append(
                f"{p.layer_name}: {int(np.sum(stored != expected))} stored integers differ from the "
                f"learned ones (file range [{stored.min()}, {stored.max()}])"
            )
        planned_bias = builder.biases.get(p.op_index)
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
        scales = t["scales"]
        want = p.scales()
        if scales.size not in (1, want.size) or not np.allclose(
            scales if scales.size == want.size else np.full(want.size, scales[0]), want, rtol=1e-5, atol=0
        ):
            problems.append(f"{p.layer_name}: scales {scales[:4]}... differ from the learned {want[:4]}...")
            continue
    if problems:
        raise ExportError(
            "The converter did not keep the learned integers exactly:\n- " + "\n- ".join(problems)
        )
