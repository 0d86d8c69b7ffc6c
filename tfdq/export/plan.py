"""Planning an export: the model's graph, learned integers, scales, folding.

Everything here is numpy and Keras; nothing builds a TensorFlow graph. The
plan says, per quantized layer, which integers and scales the file must hold
(:class:`KernelPlan`), per activation quantizer its int8 scale and zero point
(:class:`ActPlan`), which BatchNormalization layers fold into which kernels,
and it refuses what cannot be exported exactly, naming the layers.
"""

import dataclasses
import math

import keras
import numpy as np

from tfdq import layers as qlayers
from tfdq import quantizers as quantizers_lib
from tfdq import registry
from tfdq.graph import model_nodes
from tfdq.ops import round_half_away

INT2_MAX = 1
INT4_MAX = 7
INT8_MAX = 127
OUTPUT_HEADROOM = 1.25  # calibrated output range / largest observed |output|
SOFTMAX_SCALE = 1.0 / 256.0  # TFLite's fixed int8 softmax output: scale 1/256, zero point -128
TIE_BREAK = 1.0 + 2.0**-22  # per-tensor kernel scale factor (KernelPlan.scales)
XNNPACK_MAX_MULTIPLIER = 256.0  # XNNPACK takes a requantization multiplier s_in s_k / s_out below this
KERNEL_TAG = "tfdq_k"  # kernel FakeQuant ops are named tfdq_k<op index>; the name survives conversion


class ExportError(ValueError):
    """The model cannot be exported exactly; the message says why and where."""


# Storage policies (``to_tflite(storage=...)``); the learned integers are the same in each.
STORAGE_POLICIES = {
    "fast": "every op where LiteRT's XNNPACK runs it, then the fewest bytes where that costs no "
    "time: Dense and 1x1 convolutions with b <= 4 and at most FAST_INT4_MAX_ROWS output positions "
    "per example as FULLY_CONNECTED with int4 kernels (b <= 2 at one row: int2), the rest int8",
    "smallest": "int4/int2 wherever LiteRT runs it (sub-byte CONV_2D/DEPTHWISE_CONV_2D run "
    "outside XNNPACK, slower)",
    "int8": "every kernel int8 (XNNPACK everywhere)",
}
DEFAULT_STORAGE = "fast"
# XNNPACK's FULLY_CONNECTED takes an int4 kernel for an even input channel count, int2 for a multiple of 4
XNNPACK_FC_CHANNEL_MULTIPLE = {"int8": 1, "int4": 2, "int2": 4}
# "fast": a 1x1 convolution (or a Dense over more than one position) is an int4 FULLY_CONNECTED
# only when it has at most this many rows (output positions per example, H*W); see _choose_storage.
# Chosen from whole-model measurements (benchmarks/storage_policy.py --rows_sweep, BENCHMARKS.md):
# 36 keeps a MobileNet's early high-resolution 1x1 convolutions int8 and its 6x6 and smaller
# stages int4 (MobileNetV2 alpha 0.5 at 96x96: 0.58x the int8 file; 9 rows would give 0.61x).
FAST_INT4_MAX_ROWS = 36


def resolve_storage(storage=None, int4_kernels=None):
    """The storage policy from ``storage`` and the deprecated ``int4_kernels`` flag.

    ``int4_kernels=True`` means ``"smallest"``, ``False`` means ``"int8"``
    (a DeprecationWarning says so); ``storage`` wins when both are given and
    agree, and a conflict is an error.
    """
    import warnings  # noqa: PLC0415

    if int4_kernels is not None:
        implied = "smallest" if int4_kernels else "int8"
        warnings.warn(
            f"int4_kernels={bool(int4_kernels)} is deprecated: use storage={implied!r}.",
            DeprecationWarning,
            stacklevel=3,
        )
        if storage is not None and storage != implied:
            raise ValueError(
                f"storage={storage!r} conflicts with int4_kernels={bool(int4_kernels)} (which means "
                f"storage={implied!r}); pass storage only."
            )
        storage = implied
    storage = DEFAULT_STORAGE if storage is None else storage
    if storage not in STORAGE_POLICIES:
        raise ValueError(
            f"storage must be one of {sorted(STORAGE_POLICIES)}, got {storage!r}: "
            + "; ".join(f"{k!r}: {v}" for k, v in STORAGE_POLICIES.items())
        )
    return storage


# ---------------------------------------------------------------------------
# Graph walking
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Op:
    index: int
    layer: object
    node: object
    inputs: list
    outputs: list
    path: str


def _flatten_graph(model):
    """Flat op list of ``model`` with nested models inlined.

    Tensors are identified by keys ``(call path, id(KerasTensor))`` so that a
    nested model called twice gives two sets of tensors.
    """
    ops = []

    def walk(m, prefix, in_keys, path):
        alias = {}
        try:
            m_inputs, m_outputs = list(m.inputs), list(m.outputs)
        except (AttributeError, ValueError) as err:
            raise ExportError(
                f"Model {m.name!r} has no functional graph (a subclassed or "
                f"unbuilt model): the exporter cannot see its layers ({err})."
            ) from None
        if in_keys is not None:
            for t, k in zip(m_inputs, in_keys):
                alias[id(t)] = k

        def key(t):
            return alias.get(id(t), (prefix, id(t)))

        for layer, node in model_nodes(m):
            ins = [key(t) for t in node.input_tensors]
            name = f"{path}{layer.name}"
            if isinstance(layer, keras.Model):
                out_keys = walk(layer, prefix + (id(node),), ins, name + "/")
                for t, k in zip(node.outputs, out_keys):
                    alias[id(t)] = k
                continue
            ops.append(_Op(len(ops), layer, node, ins, [key(t) for t in node.outputs], name))
        return [key(t) for t in m_outputs]

    out_keys = walk(model, (), None, "")
    in_keys = [((), id(t)) for t in model.inputs]
    return ops, in_keys, out_keys


def activation_name(fn):
    if fn is None:
        return "linear"
    return getattr(fn, "__name__", str(fn))


def _transparent(layer):
    """A node that hands its input's values on unchanged (Dropout at inference, Flatten, Reshape, a
    linear activation): a quantizer after it quantizes its input alike, so its producer can
    requantize straight to that quantizer's grid."""
    entry = registry.lookup(layer)
    if entry is None:
        return False
    if entry.rule == "identity" or isinstance(layer, (keras.layers.Flatten, keras.layers.Reshape)):
        return True
    return entry.rule == "activation" and activation_rule(layer) == "linear"


def activation_rule(layer):
    """The export rule of the activation a node applies (``"linear"``, ``"relu"``,
    ``"relu6"``, ``"softmax"``...), or None where the exporter refuses it."""
    act = registry.activation(registry.activation_function_name(layer))
    return None if act is None or act.export == registry.REFUSED else act.rule


def _refusal(op):
    """Why the exporter cannot take this node, with the fix, or None."""
    layer = op.layer
    entry = registry.lookup(layer)
    what = "operation" if registry.is_operation(layer) else "layer"
    if entry is None:
        return (
            f"not in tfdq's table of supported layers (an unknown {what})",
            "replace it by a supported layer or op (README, 'Supported layers')",
        )
    if entry.export == registry.REFUSED:
        return "no integer export", entry.fix
    if entry.check is not None:
        reason = entry.check(layer, op.node)
        if reason:
            return reason, entry.fix or "use a supported configuration (README, 'Supported layers')"
    if entry.role in (registry.ACTIVATION, registry.WEIGHTED) and activation_rule(layer) is None:
        name = registry.activation_function_name(layer)
        act = registry.activation(name)
        fix = act.fix if act is not None and act.fix else "use relu, relu6 or linear"
        return f"activation {name!r} has no integer export", fix
    return None


# ---------------------------------------------------------------------------
# Planning: learned integers, scales, folding (numpy only)
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class KernelPlan:
    op_index: int
    layer_name: str
    kind: str  # "conv", "depthwise", "dense", "transpose" (Conv2DTranspose), "prelu" (PReLU slopes)
    family: str
    quantizer: str
    bits: int
    step: float  # d (uniform) or q_min (power of two)
    n_allowed: int  # largest |k| the learned grid allows
    k: np.ndarray  # learned integers, Keras layout
    bias: np.ndarray  # Q(bias) or None
    bn_name: str = None
    channel_factor: np.ndarray = None  # s_c, one per output channel, or None
    storage: str = "int8"  # "int8", "int4" or "int2" in the file
    storage_note: str = None  # why a kernel is stored wider than its learned bits allow
    fc_eligible: bool = False  # a Dense or a 1x1 stride-1 convolution: a FULLY_CONNECTED over channels
    in_channels: int = 0
    form: str = None  # "fc": written as FULLY_CONNECTED by tfdq.export.storage.apply_storage
    spread: np.ndarray = None  # 2^j per output channel: the file holds k 2^j at scale / 2^j (fit_multiplier)
    rows: int = None  # output positions per example (H*W of a convolution, 1 for a Dense); None: unknown

    @property
    def fq_bits(self):
        """FakeQuant bits in the converted graph (int2 is packed from the int4 the converter writes)."""
        return 8 if self.storage == "int8" else 4

    @property
    def fq_max(self):
        return INT4_MAX if self.fq_bits == 4 else INT8_MAX

    @property
    def xnnpack_fc(self):
        """A FULLY_CONNECTED whose sub-byte kernel fits XNNPACK's rule (int4: even, int2:
        multiple-of-4 input channels), or an int8 one."""
        return self.form == "fc" and self.in_channels % XNNPACK_FC_CHANNEL_MULTIPLE[self.storage] == 0

    @property
    def per_channel(self):
        return self.channel_factor is not None

    @property
    def count(self):
        return int(self.k.size)

    @property
    def out_channels(self):
        shape = self.k.shape
        if self.kind == "depthwise":
            return int(shape[2] * shape[3])
        return int(shape[2]) if self.kind == "transpose" else int(shape[-1])

    def signs(self):
        if self.channel_factor is None:
            return np.ones(self.out_channels)
        s = np.sign(self.channel_factor)
        s[s == 0] = 1.0
        return s

    def scales(self):
        """Per output channel scale: ``step * |s_c|`` (``step * TIE_BREAK`` where s_c = 0 or the
        channel is dead).

        A per-tensor scale is ``step * TIE_BREAK``: with power-of-two steps on
        both sides the requantized accumulator often lands exactly on a
        half-way point, which the learned quantizer rounds away from zero and
        XNNPACK's fp32 requantization (round half to even) would round to
        the even level, one output step off (the "Dense -> Dense" chains:
        4-8 output steps at the logits). A scale larger by one part in 2^22
        moves every tie away from zero in both of LiteRT's kernels and no
        other value across a rounding threshold (the requantized values
        are multiples of at least 2^-14 below 256); the integers are the
        same.

        A channel whose learned integers are all zero (:meth:`dead_channels`)
        gets ``step * TIE_BREAK`` as well: its output is the constant bias
        whatever the scale, and ``step |s_c|`` can be extreme there (a
        BatchNorm whose variance went to zero with the kernel gives ``|s_c|
        = gamma / sqrt(eps)``), which pushes the requantization multiplier
        ``s_in scale_c / s_out`` past the 256 that XNNPACK accepts (LiteRT
        then refuses to prepare the file). The bias is stored in the finer
        unit ``s_in step``; with power-of-two steps its requantized value
        can be an exact half, which the tie-break factor rounds away from
        zero as the learned quantizer does.
        """
        if self.channel_factor is None:
            scales = np.full(self.out_channels, self.step * TIE_BREAK)
        else:
            a = np.abs(self.channel_factor)
            scales = self.step * np.where((a > 0) & ~self.dead_channels(), a, TIE_BREAK)
        return scales if self.spread is None else scales / self.spread

    def fit_multiplier(self, s_in, s_out):
        """Keep the requantization multiplier ``s_in scale_c / s_out`` of every channel within
        what XNNPACK takes (below :data:`XNNPACK_MAX_MULTIPLIER`), where the storage allows.

        A coarse input and kernel feeding a fine output grid (e.g. steps 1 and
        1.15 into 2^-8: 294) give a multiplier XNNPACK refuses. Storing the
        channel's integers times ``2^j`` at its scale divided by ``2^j``
        represents the same real kernel and divides the multiplier by
        ``2^j`` exactly (powers of two), so the file computes the same
        values; the storage's integer range bounds ``j`` (an int8 kernel of
        4-bit integers: ``2^j <= 127 / 7``, j <= 4); an int4/int2 kernel
        without that room is stored int8 (:attr:`storage_note` says why).
        Sets :attr:`spread` (None where nothing needs it) and returns the
        channels still beyond the limit (an empty array when none: LiteRT
        then refuses the file, and the export says which layer).
        """
        self.spread = None
        mult = np.float64(np.float32(s_in)) * self.scales() / np.float64(np.float32(s_out))
        if not np.any(mult >= XNNPACK_MAX_MULTIPLIER):
            return np.zeros(0, np.int64)
        # the smallest j that brings the multiplier to 128 or below (a margin of 2 to the limit)
        need = np.maximum(np.ceil(np.log2(np.maximum(mult, 1.0) / (XNNPACK_MAX_MULTIPLIER / 2))), 0.0)
        j = self._spread_exponents(need)
        if np.any(j < need) and self.storage != "int8":
            self.storage_note = (
                f"int8, not {self.storage}: its requantization multiplier ({np.max(mult):.4g}) needs "
                f"integers up to 2^j times the learned ones, beyond {self.storage}, to stay below "
                f"XNNPACK's {XNNPACK_MAX_MULTIPLIER:g}"
            )
            self.storage = "int8"
            j = self._spread_exponents(need)
        self.spread = 2.0**j
        return np.flatnonzero(mult / self.spread >= XNNPACK_MAX_MULTIPLIER)

    def _spread_exponents(self, need):
        """Per channel: ``need`` capped by what the storage's integer range leaves room for."""
        largest = np.max(np.abs(self._channel_rows()), axis=0)
        limit = {"int8": INT8_MAX, "int4": INT4_MAX, "int2": INT2_MAX}[self.storage]
        room = np.floor(np.log2(limit / np.maximum(largest, 1)))
        if self.channel_factor is None:  # one scale for the tensor: one factor
            return np.full(need.shape, min(np.max(need), np.min(room)))
        return np.minimum(need, room)

    def spread_from_file(self, file_scales):
        """Set :attr:`spread` from the per-channel scales a file holds for this kernel: where
        the planned scale is ``2^j`` times the file's (j >= 1, to 1e-5), as :meth:`fit_multiplier`
        writes it (for reading a file back without the export's trace)."""
        self.spread = None
        file_scales = np.asarray(file_scales, np.float64)
        planned = self.scales()
        if file_scales.size == 1:
            file_scales = np.full(planned.size, file_scales[0])
        if file_scales.size != planned.size:
            return
        ratio = planned / file_scales
        power = 2.0 ** np.round(np.log2(np.maximum(ratio, 1e-30)))
        if np.any((power >= 2) & (np.abs(ratio / power - 1) < 1e-5)):
            self.spread = np.where((power >= 2) & (np.abs(ratio / power - 1) < 1e-5), power, 1.0)

    def _channel_rows(self):
        """The learned integers as (values per channel, channels)."""
        k = self.k
        if self.kind == "depthwise":
            h, w, c, m = k.shape
            return k.reshape(h * w, c * m)
        if self.kind == "transpose":  # (h, w, out, in)
            return np.moveaxis(k, 2, -1).reshape(-1, k.shape[2])
        return k.reshape(-1, k.shape[-1])

    def dead_channels(self):
        """Per output channel: True where every learned integer of the channel is zero."""
        return ~np.any(self._channel_rows() != 0, axis=0)

    def stored_integers(self):
        """The integers the file holds, Keras layout: :meth:`exported_integers` times :attr:`spread`."""
        k = self.exported_integers()
        if self.spread is None:
            return k
        spread = self.spread.astype(np.int64)
        if self.kind == "depthwise":
            h, w, c, m = k.shape
            return (k.reshape(h, w, c * m) * spread).reshape(h, w, c, m)
        if self.kind == "transpose":
            return k * spread[:, None]
        return k * spread

    @property
    def stored_max(self):
        """The largest |integer| the file may hold for this kernel (the learned grid's, times spread)."""
        return int(self.n_allowed * (1 if self.spread is None else np.max(self.spread)))

    def exported_integers(self):
        """The learned integers as exported, Keras layout (sign-flipped where s_c < 0); the file
        holds them times :attr:`spread` (:meth:`stored_integers`)."""
        k = self.k.astype(np.int64)
        if self.channel_factor is None:
            return k
        sign = self.signs().astype(np.int64)
        zero = self.channel_factor == 0
        if self.kind == "depthwise":
            h, w, c, m = k.shape
            k2 = k.reshape(h, w, c * m) * sign
            k2[..., zero] = 0
            return k2.reshape(h, w, c, m)
        k = k * sign
        k[..., zero] = 0
        return k

    def tflite_layout(self, k):
        """Keras layout -> the TFLite tensor layout of this kernel."""
        if self.kind == "conv":
            k = np.transpose(k, (3, 0, 1, 2))
            return k.reshape(k.shape[0], -1) if self.form == "fc" else k
        if self.kind == "transpose":  # Keras (h, w, out, in) -> TRANSPOSE_CONV (out, h, w, in)
            return np.transpose(k, (2, 0, 1, 3))
        if self.kind == "prelu":
            return k
        if self.kind == "depthwise":
            h, w, c, m = k.shape
            return k.reshape(1, h, w, c * m)
        if self.per_channel and self.form != "fc":  # Dense exported as a 1x1 convolution
            return np.transpose(k, (1, 0))[:, None, None, :]
        return np.transpose(k, (1, 0))

    def folded_kernel(self):
        """``k_stored * scale_c`` as float32 in the TF layout used in the graph."""
        k = self.stored_integers().astype(np.float64)
        scales = self.scales()
        if self.kind == "depthwise":
            h, w, c, m = k.shape
            return (k.reshape(h, w, 1, c * m) * scales).astype(np.float32)
        return (k * scales).astype(np.float32)

    @property
    def rounds_twice(self):
        """LiteRT 2.3 runs this layer with two roundings in its requantization.

        Sub-byte kernels outside XNNPACK (CONV_2D and DEPTHWISE_CONV_2D
        with int4 kernels, a FULLY_CONNECTED whose input channels break
        XNNPACK's rule) go through the builtin kernels, whose
        ``MultiplyByQuantizedMultiplier`` rounds the Q31 product and then the
        right shift; XNNPACK (int8 kernels, int4/int2 FULLY_CONNECTED)
        rounds once.
        """
        if self.kind == "transpose":
            # TRANSPOSE_CONV with a computed output shape (any batch size) stays out of XNNPACK
            return True
        return self.storage != "int8" and not self.xnnpack_fc

    def accumulator_bias(self, bn_weights, s_in, s_out=None, nonneg=False, extra=0.0):
        """The int32 bias of this layer in the file, for input scale ``s_in``.

        ``extra``: a constant that the bias absorbs as well (the ``c`` of an
        ``x + c`` right after the layer, see ``Builder``).

        TFLite adds the bias to the integer accumulator, whose unit is
        ``u_c = s_in * scale_c``. The Keras layer (BatchNorm folded) adds
        the real bias ``B_c = folded_bias_c / u_c`` accumulator units. Where
        LiteRT rounds twice (:attr:`rounds_twice`), requantizing to
        ``s_out`` rounds ``acc * mu 2^-s`` first to an integer and then by
        the shift ``s``: for a non-negative output that is single rounding
        with every threshold moved down by ``w_c = 2^30 / m_c`` accumulator
        units (``m_c`` the Q31 multiplier of ``M_c = u_c / s_out``), so the
        file's bias is ``B_c - w_c``. Signed outputs move the thresholds
        towards zero on both sides, which no bias can match (``w_c = 0``).

        Returns a dict with ``unit``, ``real`` (B), ``shift`` (w), ``integer``
        (``round(B - w)``, what the file holds) and ``residual``
        (``B - w - integer``: zero when Keras and the file round alike; see
        :func:`tfdq.export.align_biases`), or None for a layer without bias.
        """
        bias = self.folded_bias(bn_weights)
        if bias is None:
            if not extra:
                return None
            bias = np.zeros(self.out_channels)
        unit = np.float64(np.float32(s_in)) * self.scales().astype(np.float32).astype(np.float64)
        real = (bias.astype(np.float64) + extra) / unit
        shift = np.zeros_like(real)
        if self.rounds_twice and s_out is not None and nonneg:
            shift = requantization_shift(unit, s_out)
        integer = round_half_away(real - shift)
        return {
            "unit": unit,
            "real": real,
            "shift": shift,
            "integer": integer,
            "residual": real - shift - integer,
        }

    def folded_bias(self, bn_weights):
        if self.channel_factor is None:
            return None if self.bias is None else self.bias.astype(np.float32)
        b = np.zeros(self.out_channels) if self.bias is None else self.bias.astype(np.float64)
        mean, beta = bn_weights["mean"], bn_weights["beta"]
        return (self.channel_factor * (b - mean) + beta).astype(np.float32)


BIAS_LIMIT = 2**22  # int32 biases below this pass the converter's float32 arithmetic exactly


@dataclasses.dataclass
class BatchNormPlan:
    """A BatchNormalization that no kernel before it can absorb (pre-activation: DenseNet, ResNetV2).

    Inference computes ``y_c = x_c a_c + b_c`` (``a_c = gamma_c /
    sqrt(var_c + eps)``, ``b_c = beta_c - mean_c a_c``). The file holds it as
    a 1x1 DEPTHWISE_CONV_2D with one int8 kernel integer ``m_c sign(a_c)``
    per channel at scale ``|a_c| / m_c`` (``m_c = 127``, smaller only where
    the bias would pass 2^22 accumulator units) and an int32 bias ``round(b_c
    / u_c)`` in accumulator units ``u_c = s_in |a_c| / m_c``: the products are
    exact, the bias is rounded to a unit 1/127 of ``s_in |a_c|``
    (:func:`tfdq.export.align_biases` moves beta so that Keras adds the same
    integer). Its output goes straight to the learned quantizer after it
    (with a ReLU fused), as a convolution's does.
    """

    op_index: int
    layer_name: str
    factor: np.ndarray  # a_c
    offset: np.ndarray  # b_c
    rank: int  # 2 (after a Dense / pooling) or 4 (a feature map)

    def levels(self, s_in):
        """``m_c``: the kernel integer's magnitude per channel (0 where a_c = 0)."""
        a = np.abs(self.factor)
        m = np.full(a.shape, float(INT8_MAX))
        big = np.abs(self.offset) * INT8_MAX > BIAS_LIMIT * s_in * a
        with np.errstate(divide="ignore"):
            m[big] = np.floor(BIAS_LIMIT * s_in * a[big] / np.abs(self.offset[big]))
        m = np.clip(m, 1.0, INT8_MAX)
        m[a == 0] = 0.0
        return m

    def scales(self, s_in):
        """Per-channel kernel scale ``|a_c| / m_c`` (1 where a_c = 0: the integer is 0 there)."""
        m = self.levels(s_in)
        return np.where(m > 0, np.abs(self.factor) / np.where(m > 0, m, 1.0), 1.0)

    def integers(self, s_in):
        return (np.sign(self.factor) * self.levels(s_in)).astype(np.int64)

    def accumulator_bias(self, s_in):
        """As :meth:`KernelPlan.accumulator_bias` (one rounding: int8 kernels run in XNNPACK)."""
        unit = np.float64(np.float32(s_in)) * self.scales(s_in).astype(np.float32).astype(np.float64)
        real = self.offset / unit
        integer = round_half_away(real)
        return {
            "unit": unit,
            "real": real,
            "shift": np.zeros_like(real),
            "integer": integer,
            "residual": real - integer,
        }


@dataclasses.dataclass
class ActPlan:
    op_index: int
    layer_name: str
    quantizer: str
    signed: bool
    bits: int
    step: float
    n: int  # largest integer level: round(q_max / d)

    @property
    def zero_point(self):
        return self.n - 128 if self.signed else 127 - self.n


def _quantizer_params(q):
    p = q.describe()
    return {k: float(v) for k, v in p.items()}


def requantization_shift(unit, s_out):
    """How far LiteRT's two-rounding requantization moves a threshold, in accumulator units.

    TFLite writes the real multiplier ``M = unit / s_out`` as ``m 2^(e-31)``
    (``QuantizeMultiplier``: ``m`` a Q31 integer, ``frexp`` exponent ``e``).
    With ``e <= -1`` the kernel computes ``r = round(acc m / 2^31)`` and
    then ``round(r / 2^-e)``, half away from zero each time. A positive
    accumulator then reaches level ``k + 1`` from ``acc >= (k + 1/2) / M -
    2^30 / m``: every threshold sits ``2^30 / m`` (between 1/2 and 1) lower
    than single rounding puts it. With ``e >= 0`` there is one rounding
    (shift 0).
    """
    mult = np.asarray(unit, np.float64) / np.float64(np.float32(s_out))
    mant, exp = np.frexp(mult)
    m = np.round(mant * 2.0**31)
    exp = np.where(m == 2.0**31, exp + 1, exp)
    m = np.where(m == 2.0**31, 2.0**30, m)
    return np.where(exp <= -1, 2.0**30 / m, 0.0)


def _choose_storage(plan, policy):
    """``(storage, form, note)`` of one kernel under a storage policy (see STORAGE_POLICIES).

    ``"fast"`` stores a Dense or 1x1 stride-1 convolution with ``b <= 4`` as
    an int4 FULLY_CONNECTED only where it has at most
    :data:`FAST_INT4_MAX_ROWS` rows (output positions per example): the int4
    weights halve the bytes read, which wins where the weights dominate the
    work (few rows) and loses where the multiply-adds do (LiteRT 2.3's
    XNNPACK runs int4 weights 5-13% slower than int8 per multiply-add,
    measured by ``benchmarks/storage_policy.py --layers``). Int2 (``b <= 2``,
    input channels a multiple of 4) only at one row.
    """
    n, cin = plan.n_allowed, plan.in_channels
    if policy == "int8" or n > INT4_MAX or plan.kind in ("transpose", "prelu"):
        return "int8", None, None  # LiteRT's TRANSPOSE_CONV and MUL take int8 constants only
    if not plan.fc_eligible:
        if policy == "fast":
            return "int8", None, None  # XNNPACK runs CONV_2D/DEPTHWISE_CONV_2D with int8 kernels only
        return "int4", None, None
    rows = plan.rows
    if policy == "fast" and (rows is None or rows > FAST_INT4_MAX_ROWS):
        where = "an unknown number of" if rows is None else str(rows)
        return (
            "int8",
            None,
            (
                f"int8, not {'int2' if n <= INT2_MAX else 'int4'} ({plan.bits}-bit integers): {where} rows "
                f"(output positions per example), over {FAST_INT4_MAX_ROWS}: XNNPACK's int4 FULLY_CONNECTED "
                "runs slower than int8 where the multiply-adds dominate (storage='smallest' stores it sub-byte)"
            ),
        )
    int2_note = None
    if n <= INT2_MAX and cin % 4 == 0:
        if policy == "smallest" or rows == 1:
            return "int2", "fc", None
        # measured (benchmarks/storage_policy.py --layers, LiteRT 2.3 on x86): XNNPACK's int2
        # FULLY_CONNECTED takes 1.4-2.2x the time of int8 over several rows, about the same at one row
        int2_note = (
            f"int4, not int2: {rows} rows; XNNPACK's int2 FULLY_CONNECTED runs 1.4-2.2x slower than int8 "
            "over more than one row (storage='smallest' stores int2)"
        )
    elif n <= INT2_MAX:
        int2_note = (
            f"int4, not int2: {cin} input channels (XNNPACK's int2 FULLY_CONNECTED needs a multiple of 4)"
        )
    if cin % 2 == 0 or policy == "smallest":
        return "int4", "fc", int2_note
    return (
        "int8",
        None,
        (
            f"int8, not int4 ({plan.bits}-bit integers): {cin} input channels, odd (XNNPACK's int4 "
            "FULLY_CONNECTED needs an even count; storage='smallest' stores int4 outside XNNPACK)"
        ),
    )


def _plan_kernel(op, quantizer, policy, problems):
    layer = op.layer
    p = _quantizer_params(quantizer)
    bits = int(round(p["bits"]))
    if isinstance(layer, qlayers.QDepthwiseConv2D):
        kind = "depthwise"
    elif isinstance(layer, qlayers.QConv2DTranspose):
        kind = "transpose"
    elif isinstance(layer, qlayers.QPReLU):
        kind = "prelu"
    elif isinstance(layer, qlayers.QConv2D):
        kind = "conv"
    else:
        kind = "dense"
    qk, qb = layer.quantized_weights()
    qk = np.asarray(qk, dtype=np.float64)
    qb = None if qb is None else np.asarray(qb, dtype=np.float64)
    family = quantizer.FAMILY
    if family == "uniform":
        step = p["d"]
        n_allowed = 2 ** (bits - 1) - 1
    else:
        step = p["q_min"]
        n_allowed = int(round(p["q_max"] / p["q_min"]))
    if family == "uniform" and bits > 8:
        problems["bits"].append(f"{op.path} ({bits} bits)")
        return None
    if family == "pow2" and n_allowed > INT8_MAX:
        problems["pow2"].append(
            f"{op.path} (q_max/q_min = {p['q_max']}/{p['q_min']} = 2^{int(round(math.log2(n_allowed)))})"
        )
        return None
    k = qk / step
    kb = None if qb is None else qb / step
    for name, arr in (("kernel", k), ("bias", kb)):
        if arr is not None and not np.array_equal(arr, np.round(arr)):
            raise ExportError(
                f"{op.path}: the quantized {name} is not on the grid of step "
                f"{step} (max distance {np.max(np.abs(arr - np.round(arr)))} steps). "
                "This is a bug in the quantizer, not in the model."
            )
    k = k.astype(np.int64)
    if np.max(np.abs(k), initial=0) > n_allowed:
        raise ExportError(
            f"{op.path}: quantized kernel integers reach {np.max(np.abs(k))}, beyond the "
            f"learned grid's {n_allowed}."
        )
    groups = getattr(layer, "groups", 1)
    if groups != 1 and registry.is_depthwise_grouped(layer, op.node.input_tensors[0].shape[-1]):
        kind = "depthwise"  # groups = channels = filters: kernel [h, w, 1, C] -> depthwise [h, w, C, 1]
        k = np.transpose(k, (0, 1, 3, 2))
    elif groups != 1:
        raise ExportError(f"{op.path}: grouped convolutions (groups={groups}) are not supported.")
    if kind == "conv":
        fc_eligible = tuple(layer.kernel_size) == (1, 1) and tuple(layer.strides) == (1, 1)
        in_channels = int(k.shape[2])
    else:
        fc_eligible = kind == "dense"
        in_channels = int(k.shape[0]) if kind == "dense" else int(k.shape[2])
    rows = 1
    for d in tuple(op.node.outputs[0].shape)[1:-1]:
        rows = None if d is None or rows is None else rows * int(d)
    plan = KernelPlan(
        rows=rows,
        op_index=op.index,
        layer_name=op.path,
        kind=kind,
        family=family,
        quantizer=type(quantizer).__name__,
        bits=bits,
        step=step,
        n_allowed=n_allowed,
        k=k,
        bias=qb,
        fc_eligible=fc_eligible,
        in_channels=in_channels,
    )
    plan.storage, plan.form, plan.storage_note = _choose_storage(plan, policy)
    return plan


def _bn_weights(bn):
    c = int(bn.moving_mean.shape[-1])
    gamma = np.asarray(bn.gamma, np.float64) if bn.scale else np.ones(c)
    beta = np.asarray(bn.beta, np.float64) if bn.center else np.zeros(c)
    mean = np.asarray(bn.moving_mean, np.float64)
    var = np.asarray(bn.moving_variance, np.float64)
    # Keras: x * gamma / sqrt(var + eps) + (beta - mean * gamma / sqrt(var + eps))
    factor = gamma / np.sqrt(var + float(bn.epsilon))
    return {"factor": factor, "beta": beta, "mean": mean}


# What each kind of refusal says: (kind, text before the names, text after them).
_PROBLEM_TEXT = (
    (
        "bits",
        "Learned weight bitwidths above 8 cannot be stored in an int8 TFLite kernel: ",
        ". Retrain with max_bits=8 (tfdq.quantize_model(..., weight_bits=(2, 8))).",
    ),
    (
        "act_bits",
        "Learned activation bitwidths above 8 cannot be int8 tensors: ",
        ". Retrain with activation_bits=(1, 8).",
    ),
    (
        "pow2",
        "These power-of-two weight grids do not fit an int8 grid of step q_min "
        "(q_max/q_min must be at most 64): ",
        ".",
    ),
    (
        "pow2_act",
        "Power-of-two activation quantizers cannot be exported exactly: their rounding in the log "
        "domain has no integer TFLite kernel (a uniform int8 tensor of step q_min holds the levels, "
        "but no op rounds onto them): ",
        ". Use uniform activation quantizers (U1/U2/U3) for export.",
    ),
    (
        "float",
        "These layers have float weights without a tfdq quantizer and would stay float (or be "
        "quantized by the converter's guess): ",
        ". Quantize them (tfdq.quantize_model(..., strict=True)) before export.",
    ),
    (
        "unsupported",
        "Unsupported layers between quantized layers (no exact integer export): ",
        ". The README's table 'Supported layers' lists what the exporter takes.",
    ),
)


def _problems_message(problems):
    """The refusal message for the collected problems (``kind -> names``), or None."""
    messages = [
        before + ", ".join(problems[kind]) + after for kind, before, after in _PROBLEM_TEXT if problems[kind]
    ]
    return "Cannot export to integer TFLite.\n- " + "\n- ".join(messages) if messages else None


class Plan:
    """Everything the graph builder needs, decided up front from the model."""

    def __init__(self, model, storage=DEFAULT_STORAGE, raise_errors=True, int4_kernels=None):
        storage = resolve_storage(None if int4_kernels is not None else storage, int4_kernels)
        if not isinstance(model, keras.Model):
            raise ExportError(f"to_tflite takes a keras.Model, got {type(model).__name__}.")
        self.model = model
        self.storage = storage
        self.ops, self.input_keys, self.output_keys = _flatten_graph(model)
        self.consumers = {}
        self.ops_by_index = {op.index: op for op in self.ops}
        for op in self.ops:
            for k in op.inputs:
                self.consumers.setdefault(k, []).append(op)
        self.kernels = {}  # op index -> KernelPlan
        self.acts = {}  # op index -> ActPlan
        self.folded_bn = {}  # BN op index -> kernel op index
        self.standalone_bn = {}  # BN op index -> BatchNormPlan (not foldable: its own integer op)
        self.layernorms = {}  # LayerNormalization op index -> BatchNormPlan of its gamma and beta
        self.bn = {}  # kernel op index -> BN weights
        problems = {"bits": [], "pow2": [], "pow2_act": [], "act_bits": [], "unsupported": [], "float": []}
        self.problems = []  # one dict per refused node: layer, class, problem, fix
        n_quantizers = self._plan_layers(storage, problems)
        if n_quantizers == 0 and raise_errors:
            raise ExportError(
                f"Model {model.name!r} has no tfdq quantizers (no QConv2D/QDepthwiseConv2D/"
                "QDense or ActivationQuantizer layers): there are no learned integers to "
                "export. Quantize it first: qmodel = tfdq.quantize_model(model), train, "
                "then export qmodel."
            )
        self._fold_batchnorms(problems)
        self._int8_where_int4_rounds_signed()
        self.error = _problems_message(problems)
        if self.error is not None and raise_errors:
            raise ExportError(self.error)

    def _plan_layers(self, storage, problems):
        """Plan every quantized kernel, activation quantizer and per-channel op; the quantizer count."""
        n_quantizers = 0
        for op in self.ops:
            layer = op.layer
            entry = registry.lookup(layer)
            if isinstance(layer, qlayers.QuantizedWeightsMixin):
                n_quantizers += 1
                refusal = _refusal(op)
                if refusal is not None:
                    self._refuse(problems, "unsupported", op, *refusal)
                    continue
                plan = _plan_kernel(op, layer.kernel_quantizer, storage, problems)
                if plan is not None:
                    self.kernels[op.index] = plan
            elif isinstance(layer, qlayers.ActivationQuantizer):
                n_quantizers += 1
                self._plan_activation(op, problems)
            elif isinstance(layer, quantizers_lib.Quantizer):
                self._refuse(
                    problems,
                    "unsupported",
                    op,
                    f"a bare {type(layer).__name__} quantizer layer",
                    "wrap it in tfdq.layers.ActivationQuantizer",
                )
            elif entry is not None and entry.role == registry.WEIGHTED:
                self._refuse(
                    problems,
                    "float",
                    op,
                    "float weights without a tfdq quantizer",
                    entry.fix or "quantize it with tfdq.quantize_model",
                )
            elif entry is not None and entry.rule == "batchnorm":
                continue  # checked below
            else:
                refusal = _refusal(op)
                if refusal is not None:
                    self._refuse(problems, "unsupported", op, *refusal)
                elif entry.rule == "affine" and registry.scalar_affine(layer)[2] is not None:
                    self._plan_channel_affine(op, problems)
                elif entry.rule == "layernorm":
                    c = int(op.node.input_tensors[0].shape[-1])
                    gamma = np.asarray(layer.gamma.numpy(), np.float64) if layer.scale else np.ones(c)
                    beta = np.asarray(layer.beta.numpy(), np.float64) if layer.center else np.zeros(c)
                    rank = len(op.node.input_tensors[0].shape)
                    self.layernorms[op.index] = BatchNormPlan(op.index, op.path, gamma, beta, rank)
                elif entry.rule == "layer_scale":
                    gamma = np.asarray(layer.gamma.numpy(), np.float64).reshape(-1)
                    rank = len(op.node.input_tensors[0].shape)
                    if rank in (2, 4):
                        self.standalone_bn[op.index] = BatchNormPlan(
                            op.index, op.path, gamma, np.zeros_like(gamma), rank
                        )
                    else:
                        self._refuse(problems, "unsupported", op, f"a rank-{rank} input", "")
        return n_quantizers

    def _fold_batchnorms(self, problems):
        """Fold each BatchNormalization into the kernel before it, or plan it standalone."""
        # It folds only right after a quantized layer with a linear activation whose output goes
        # nowhere else.
        for op in self.ops:
            entry = registry.lookup(op.layer)
            if entry is None or entry.rule != "batchnorm":
                continue
            src = self._producer_op(op.inputs[0])
            ok = (
                src is not None
                and src.index in self.kernels
                and self.kernels[src.index].kind in ("conv", "depthwise", "dense")
                and activation_name(src.layer.activation) == "linear"
                and len(self.consumers.get(src.outputs[0], [])) == 1
                and src.outputs[0] not in self.output_keys
                and op.layer.axis in (-1, len(op.node.input_tensors[0].shape) - 1)
            )
            if (
                src is not None
                and src.index not in self.kernels
                and isinstance(src.layer, qlayers.QuantizedWeightsMixin)
            ):
                continue  # its layer already has a bits/pow2 problem
            if not ok and self._plan_standalone_bn(op):
                continue
            if not ok:
                self._refuse(
                    problems,
                    "unsupported",
                    op,
                    "does not directly follow a quantized Conv2D/DepthwiseConv2D/Dense with a "
                    "linear activation, so it cannot be folded",
                    "put the BatchNormalization right after the convolution, before its activation",
                )
                continue
            plan = self.kernels[src.index]
            w = _bn_weights(op.layer)
            if w["factor"].shape[0] != plan.out_channels:
                self._refuse(
                    problems,
                    "unsupported",
                    op,
                    f"channel count does not match {src.path}",
                    "fold it over the channel axis of the layer before it",
                )
                continue
            rank = len(src.node.input_tensors[0].shape)
            if plan.kind == "dense" and rank != 2:
                self._refuse(
                    problems,
                    "unsupported",
                    op,
                    f"after a Dense on a rank-{rank} input",
                    "flatten before the Dense",
                )
                continue
            plan.bn_name = op.path
            plan.channel_factor = w["factor"]
            self.bn[src.index] = w
            self.folded_bn[op.index] = src.index

    def _plan_standalone_bn(self, op):
        """Plan a BatchNormalization that cannot fold as its own per-channel integer op (True if planned)."""
        rank = len(op.node.input_tensors[0].shape)
        if op.layer.axis not in (-1, rank - 1) or rank not in (2, 4):
            return False
        w = _bn_weights(op.layer)
        self.standalone_bn[op.index] = BatchNormPlan(
            op.index, op.path, w["factor"], w["beta"] - w["mean"] * w["factor"], rank
        )
        return True

    def _plan_channel_affine(self, op, problems):
        """A Rescaling / Normalization with one scale and offset per channel: as a standalone BatchNorm."""
        rank = len(op.node.input_tensors[0].shape)
        a, b, _ = registry.channel_affine(op.layer, op.node.input_tensors[0].shape[-1])
        if rank not in (2, 4):
            self._refuse(
                problems,
                "unsupported",
                op,
                f"a per-channel affine on a rank-{rank} tensor",
                "scale the data before the model",
            )
            return
        self.standalone_bn[op.index] = BatchNormPlan(op.index, op.path, a, b, rank)

    def _int8_where_int4_rounds_signed(self):
        """Store int8 where an int4 kernel could not be exact.

        LiteRT runs CONV_2D / DEPTHWISE_CONV_2D with int4 kernels (and a
        sub-byte FULLY_CONNECTED outside XNNPACK) through a requantization
        that rounds twice; for outputs that stay signed (no
        ReLU, a signed quantizer next: a residual branch, a linear
        bottleneck) this moves both sides of zero towards it, which no bias
        can undo. Such layers keep their learned integers but are stored as
        int8 (XNNPACK, one rounding); :attr:`KernelPlan.storage_note` says why.
        """
        for index, kplan in self.kernels.items():
            if not kplan.rounds_twice or kplan.storage != "int4":
                continue
            _, nonneg = self.kernel_output(index)
            if nonneg or activation_name(self.ops_by_index[index].layer.activation) in ("relu", "relu6"):
                continue
            kplan.storage, kplan.form = "int8", None
            kplan.storage_note = (
                f"int8, not {'int4' if kplan.n_allowed > INT2_MAX else 'int4/int2'} ({kplan.bits}-bit "
                "integers): its output is signed, and LiteRT's sub-byte kernels outside XNNPACK round "
                "twice, which moves negative outputs towards zero"
            )

    def _producer_op(self, key):
        for op in self.ops:
            if key in op.outputs:
                return op
        return None

    def _plan_activation(self, op, problems):
        q = op.layer.quantizer
        p = _quantizer_params(q)
        bits = int(round(p["bits"]))
        if q.FAMILY != "uniform":
            problems["pow2_act"].append(f"{op.path} ({type(q).__name__})")
            self.problems.append(
                {
                    "layer": op.path,
                    "class": type(q).__name__,
                    "kind": "pow2_act",
                    "problem": "a power-of-two activation quantizer has no integer kernel",
                    "fix": "use a uniform activation quantizer (U1/U2/U3)",
                }
            )
            return
        n = int(round_half_away(p["q_max"] / p["d"]))
        limit = INT8_MAX if q.signed else 255
        if bits > 8 or n > limit:
            problems["act_bits"].append(f"{op.path} ({bits} bits)")
            return
        self.acts[op.index] = ActPlan(op.index, op.path, type(q).__name__, q.signed, bits, p["d"], n)

    def _refuse(self, problems, category, op, detail, fix):
        """Record one node the exporter cannot take (``self.problems``) and its message part."""
        cls = ("keras.ops." if registry.is_operation(op.layer) else "") + type(op.layer).__name__
        problems[category].append(f"{op.path} ({cls})" + (f": {detail}" if category == "unsupported" else ""))
        self.problems.append(
            {"layer": op.path, "class": cls, "problem": detail, "fix": fix, "kind": category}
        )

    def sole_consumer(self, key, through_folded_bn=False):
        """The one op that reads ``key`` (None: several, none, or a model output); with
        ``through_folded_bn``, a BatchNormalization folded into ``key``'s producer is looked through."""
        for _ in range(2):
            cons = self.consumers.get(key, [])
            if len(cons) != 1 or key in self.output_keys:
                return None
            if through_folded_bn and cons[0].index in self.folded_bn:
                key, through_folded_bn = cons[0].outputs[0], False
                continue
            return cons[0]
        return None

    def downstream_quantizer(self, key, folded=False):
        """``(ActPlan, through_relu)`` of the learned quantizer that quantizes ``key``.

        Follows single consumers through one ReLU/ReLU6 (and, with
        ``folded``, through a folded BatchNormalization first); ``(None,
        False)`` when no learned quantizer takes the tensor next.
        """
        relu = False
        for _ in range(len(self.ops)):
            op = self.sole_consumer(key, through_folded_bn=folded)
            folded = False
            if op is None:
                break
            if op.index in self.acts:
                return self.acts[op.index], relu
            if _transparent(op.layer):
                key = op.outputs[0]
                continue
            if (
                not relu
                and registry.lookup(op.layer) is not None
                and registry.lookup(op.layer).rule == "activation"
                and activation_rule(op.layer) in ("relu", "relu6")
            ):
                key, relu = op.outputs[0], True
                continue
            break
        return None, False

    def downstream_step(self, key):
        """Step of the learned quantizer that quantizes ``key`` (through a ReLU), or None."""
        act, _ = self.downstream_quantizer(key)
        return None if act is None else act.step

    def kernel_output(self, index):
        """``(s_out, nonneg)`` for a kernel layer's requantization, or ``(None, False)``.

        ``s_out`` is the step of the learned activation quantizer its output
        (BatchNorm folded) goes to; ``nonneg`` tells that only non-negative
        values survive (a ReLU on the way, or an unsigned quantizer).
        """
        op = self.ops_by_index[index]
        act, relu = self.downstream_quantizer(op.outputs[0], folded=True)
        if act is None:
            return None, False
        own_relu = activation_name(op.layer.activation) in ("relu", "relu6")
        return act.step, bool(relu or own_relu or not act.signed)
