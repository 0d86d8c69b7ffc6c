"""One table of the Keras layers and operations tfdq knows.

Every supported Keras layer, Keras 3 operation node (``x + 3.0``,
``keras.ops.relu``, ...) and activation function has one :class:`Entry`
here, saying

* how :func:`tfdq.quantize_model` clones it (``clone``: replaced by a tfdq
  layer with a weight quantizer, kept as it is, or quantized through as a
  nested model) and how it decides where activation quantizers go and
  whether they are signed (``role``);
* how its memory is counted (``memory``: quantized weights at ``b_w`` bits,
  float weights at 32 bits, folded into the kernel before it, or nothing);
* how :func:`tfdq.export.to_tflite` exports it (``export``: ``exact`` on
  the learned grid, ``calibrated`` with a scale calibrated on data and
  listed in the export report, ``folded`` into the kernel before it, or
  ``refused``, with the fix), and which builder rule computes it
  (``rule``).

Cloning, memory accounting, export planning, the early exportability check
and the README's supported-layers table all read this table; adding a layer
means adding one entry. Lookups go by class (the most specific registered
base class wins), never by class name.
"""

import dataclasses

import keras
import numpy as np

from tfdq import _compat
from tfdq import layers as qlayers
from tfdq import models as _models
from tfdq._compat import nn_ops as _nn_ops
from tfdq._compat import numpy_ops as _np_ops

EXACT, CALIBRATED, FOLDED, REFUSED = "exact", "calibrated", "folded", "refused"

# roles: what a node means for quantizer placement and signs
PASS_THROUGH = "pass_through"  # moves or selects values: quantize where the input is produced
MERGE = "merge"  # >= 0 when all inputs (and constants) are
NONNEG = "nonneg"  # >= 0 whatever the input
ACTIVATION = "activation"  # decided by its activation function (see ACTIVATIONS)
SIGNED = "signed"  # may be negative
WEIGHTED = "weighted"  # a kernel layer (quantized or float)
NESTED = "nested"

# operand grids: which inputs of a node get a learned quantizer of their own (8 bits at the start, not
# counted in memory: parts of feature maps counted already), so that the integer file computes what
# Keras computes and no tensor inside the network needs a calibrated scale
MERGED = "merged"  # every operand, when two or more feature maps merge: a sum, difference or
# concatenation of values on learned grids is exact in the file (the operands' grids meet in one)
FACTORS = "factors"  # every operand, each on its own exact grid: the int8 MUL rounds once, onto the
# learned grid after it (a squeeze-and-excite gate and the map it scales)
INPUT = "input"  # its one input: an int8 op that computes from a grid and rounds only at its output
# (HARD_SWISH; a LayerNormalization decomposed into int8 ops)
UNFOLDED = "unfolded"  # its one input, unless the op folds into the kernel before it (a BatchNorm
# right after a quantized kernel with a linear activation whose output goes nowhere else); else it
# is exported as its own per-channel integer op (pre-activation BatchNorm: DenseNet, ResNetV2)
OPERAND_GRIDS = (MERGED, FACTORS, INPUT, UNFOLDED)


@dataclasses.dataclass(frozen=True)
class Entry:
    """How tfdq treats one Keras layer or operation (see module docstring)."""

    classes: tuple
    name: str
    clone: str = "keep"  # "quantize", "keep", "nested"
    role: str = SIGNED
    memory: str = "none"  # "quantized", "float", "folded", "none"
    export: str = EXACT
    rule: str = None  # the export builder's rule for it
    quantized: type = None  # the tfdq layer it becomes (clone == "quantize")
    check: object = None  # callable(layer, node) -> None or why this configuration is refused
    fix: str = ""  # what to do when it is refused
    note: str = ""
    operands: str = None  # which inputs get a learned quantizer (OPERAND_GRIDS), or None


@dataclasses.dataclass(frozen=True)
class Activation:
    """An activation function (``Activation(...)``, ``activation=`` or an op)."""

    names: tuple
    nonneg: bool
    export: str
    rule: str = None
    fix: str = ""
    operands: str = None  # as Entry.operands, for the node that applies it alone (an activation node)
    fixed_scale: bool = False  # TFLite fixes its int8 output scale (1/256, zero point -128)
    # A kernel layer's fused one is split off into an Activation layer of its own, so that the
    # kernel's output gets a learned quantizer (the file computes it from an int8 input).
    split: bool = False
    # The tfdq.layers function quantize_model puts in an Activation layer: Keras rounds it as
    # the file's int8 lookup table does (None: the function itself).
    int8: str = None
    # What the file computes it with: "logistic" (a LOGISTIC, its output at the fixed 1/256) or
    # "logistic_mul" (a LOGISTIC and an int8 MUL by it, which XNNPACK rounds to even).
    logistic: str = None
    # The tfdq.layers class an ``Activation`` layer of it becomes (its Keras value computed as the
    # file's int8 kernel computes it between the two learned grids), or None (the same class).
    layer: str = None


def _cls(module, name):
    """A Keras class that may be missing in other Keras versions (then skipped)."""
    return getattr(module, name, None)


def _channels_last(layer, node):
    fmt = getattr(layer, "data_format", "channels_last")
    if fmt != "channels_last":
        return f"data_format={fmt!r} (the exporter takes channels_last)"
    return None


def is_depthwise_grouped(layer, channels):
    """A Conv2D with ``groups`` = input channels = filters (ConvNeXt): a depthwise convolution."""
    groups = getattr(layer, "groups", 1)
    return groups > 1 and groups == channels == getattr(layer, "filters", None)


def _kernel_config(layer, node):
    if isinstance(layer, _L.Conv2DTranspose) and tuple(layer.dilation_rate) != (1, 1):
        return f"dilation_rate={layer.dilation_rate} (TFLite's TRANSPOSE_CONV has no dilation)"
    groups = getattr(layer, "groups", 1)
    if groups != 1 and not is_depthwise_grouped(layer, node.input_tensors[0].shape[-1]):
        return (
            f"groups={groups} (the exporter takes ungrouped convolutions and groups = channels = "
            "filters, a depthwise convolution)"
        )
    return _channels_last(layer, node)


def _two_inputs(layer, node):
    n_inputs = len(node.input_tensors)
    if n_inputs != 2:
        return f"{n_inputs} inputs (the exporter combines two tensors at a time)"
    return None


def _numbers(node):
    return [a for a in node.arguments.args if not isinstance(a, keras.KerasTensor)]


def _binary_op(layer, node):
    """``x (op) y`` or ``x (op) c`` with a scalar constant c."""
    args = node.arguments.args
    if len(args) != 2 or node.arguments.kwargs:
        return "not a two-operand call"
    for a in _numbers(node):
        try:
            if np.ndim(a) != 0:
                return "a constant operand that is not a scalar"
        except (TypeError, ValueError):
            return f"an operand of type {type(a).__name__}"
    return None


def _divide_by_constant(layer, node):
    args = node.arguments.args
    reason = _binary_op(layer, node)
    if reason:
        return reason
    if isinstance(args[1], keras.KerasTensor) or float(args[1]) == 0.0:
        return "a division by a tensor (the exporter divides by nonzero constants)"
    return None


def _relu_config(layer, node):
    slope = float(getattr(layer, "negative_slope", 0.0) or 0.0)
    threshold = float(getattr(layer, "threshold", 0.0) or 0.0)
    max_value = getattr(layer, "max_value", None)
    if slope or threshold or (max_value is not None and float(max_value) != 6.0):
        return (
            f"ReLU(max_value={max_value}, negative_slope={slope}, threshold={threshold}) "
            "(the exporter takes ReLU() and ReLU(6.0))"
        )
    return None


def _layernorm_config(layer, node):
    rank = len(node.input_tensors[0].shape)
    axis = tuple(np.atleast_1d(layer.axis))
    if axis not in ((-1,), (rank - 1,)):
        return f"axis={layer.axis} (the exporter normalizes the last axis)"
    if getattr(layer, "rms_scaling", False):
        return "rms_scaling=True"
    if rank not in (2, 4):
        return f"a rank-{rank} input (the exporter takes 2-D and 4-D tensors)"
    return None


def _softmax_axis(layer, node):
    return (
        None if layer.axis in (-1, [-1], (-1,)) else f"axis={layer.axis} (the exporter takes the last axis)"
    )


def _scale_add_config(layer, node):
    if len(node.input_tensors) != 2:
        return f"{len(node.input_tensors)} inputs (x + scale * branch takes two)"
    try:
        float(layer.scale)
    except (TypeError, ValueError):
        return f"scale {layer.scale!r} is not a number"
    return None


_APP_LAYERS = _compat.keras_application_layers()
_L = keras.layers
_RESHAPE_HELP = "a Flatten/Reshape layer"

ENTRIES = [
    # kernels with a learned weight quantizer
    Entry(
        (_L.Conv2D,),
        "Conv2D",
        "quantize",
        WEIGHTED,
        "float",
        EXACT,
        "kernel",
        qlayers.QConv2D,
        check=_kernel_config,
        note="learned integers k, scale d (a folded BatchNorm: d times abs(s_c) per channel)",
    ),
    Entry(
        (_L.DepthwiseConv2D,),
        "DepthwiseConv2D",
        "quantize",
        WEIGHTED,
        "float",
        EXACT,
        "kernel",
        qlayers.QDepthwiseConv2D,
        check=_channels_last,
        note="as Conv2D",
    ),
    Entry(
        (_L.Dense,), "Dense", "quantize", WEIGHTED, "float", EXACT, "kernel", qlayers.QDense, note="as Conv2D"
    ),
    Entry(
        (_L.Conv2DTranspose,),
        "Conv2DTranspose",
        "quantize",
        WEIGHTED,
        "float",
        EXACT,
        "kernel",
        qlayers.QConv2DTranspose,
        check=_kernel_config,
        note="TRANSPOSE_CONV: learned integers k, per-tensor scale d (a BatchNorm after it is not folded)",
    ),
    Entry(
        (_L.PReLU,),
        "PReLU",
        "quantize",
        SIGNED,
        "float",
        CALIBRATED,
        "kernel",
        qlayers.QPReLU,
        note="slopes alpha on a learned grid (integers k, scale d): RELU, min(x, 0) as a QUANTIZE, MUL by the int8 slopes, "
        "ADD; the product's scale calibrated",
    ),
    Entry(
        (qlayers.QuantizedWeightsMixin,),
        "QConv2D / QDepthwiseConv2D / QDense / QConv2DTranspose / QPReLU",
        "keep",
        WEIGHTED,
        "quantized",
        EXACT,
        "kernel",
        check=_kernel_config,
    ),
    Entry(
        (qlayers.ActivationQuantizer,),
        "ActivationQuantizer",
        "keep",
        SIGNED,
        "activation",
        EXACT,
        "act_quantizer",
        note="int8 tensor of scale d, clamped at q_max",
    ),
    Entry(
        (_L.BatchNormalization,),
        "BatchNormalization",
        "keep",
        SIGNED,
        "folded",
        FOLDED,
        "batchnorm",
        note="folded right after a quantized kernel with a linear activation; elsewhere (pre-activation: "
        "DenseNet, ResNetV2) its input gets a learned quantizer and it exports as a 1x1 DEPTHWISE_CONV_2D "
        "(exact products, int32 bias aligned by align_biases)",
        operands=UNFOLDED,
    ),
    # kernels tfdq does not quantize (yet): kept float, counted at 32 bits, refused by the exporter
    Entry(
        (_L.SeparableConv2D,),
        "SeparableConv2D",
        "split",
        WEIGHTED,
        "float",
        EXACT,
        "kernel",
        qlayers.QConv2D,
        check=_channels_last,
        note="split into QDepthwiseConv2D, a signed ActivationQuantizer and a 1x1 QConv2D (learned integers in "
        "both kernels)",
    ),
    Entry(
        tuple(
            c
            for c in (
                _L.Conv1D,
                _L.Conv3D,
                _L.EinsumDense,
                _L.Embedding,
                _L.SeparableConv1D,
                _L.Conv1DTranspose,
                _L.Conv3DTranspose,
            )
            if c
        ),
        "Conv1D, Conv3D, EinsumDense, Embedding",
        "keep",
        WEIGHTED,
        "float",
        REFUSED,
        fix="no tfdq quantized version: replace it by quantizable layers or remove it",
    ),
    # shape and selection: same scale as the input
    Entry(
        tuple(
            c
            for c in (
                _L.Dropout,
                _L.SpatialDropout1D,
                _L.SpatialDropout2D,
                _L.SpatialDropout3D,
                _L.GaussianNoise,
                _L.GaussianDropout,
                _L.AlphaDropout,
                _L.ActivityRegularization,
                _L.Identity,
            )
            if c
        ),
        "Dropout, SpatialDropout, GaussianNoise, GaussianDropout, AlphaDropout, ActivityRegularization, Identity",
        "keep",
        PASS_THROUGH,
        "none",
        EXACT,
        "identity",
        note="identity at inference",
    ),
    Entry((_L.Flatten, _L.Reshape), "Flatten, Reshape", "keep", PASS_THROUGH, "none", EXACT, "same_scale"),
    Entry(
        (_L.ZeroPadding2D, _L.Cropping2D, _L.MaxPooling2D, _L.GlobalMaxPooling2D),
        "ZeroPadding2D, Cropping2D, MaxPooling2D, GlobalMaxPooling2D",
        "keep",
        PASS_THROUGH,
        "none",
        EXACT,
        "same_scale",
        check=_channels_last,
    ),
    Entry(
        (_models.ZeroPadShortcut,),
        "tfdq.models.ZeroPadShortcut",
        "keep",
        PASS_THROUGH,
        "none",
        EXACT,
        "same_scale",
    ),
    Entry(
        (_L.AveragePooling2D, _L.GlobalAveragePooling2D),
        "AveragePooling2D, GlobalAveragePooling2D",
        "keep",
        PASS_THROUGH,
        "none",
        CALIBRATED,
        "average",
        check=_channels_last,
        note="the mean is off the input grid: calibrated scale",
    ),
    Entry(
        (
            _L.Permute,
            _L.ZeroPadding1D,
            _L.ZeroPadding3D,
            _L.Cropping1D,
            _L.Cropping3D,
            _L.MaxPooling1D,
            _L.MaxPooling3D,
            _L.GlobalMaxPooling1D,
            _L.GlobalMaxPooling3D,
        ),
        "Permute, 1D/3D padding, cropping and max pooling",
        "keep",
        PASS_THROUGH,
        "none",
        REFUSED,
        fix="the exporter takes the 2D versions",
    ),
    Entry(
        (_L.AveragePooling1D, _L.AveragePooling3D, _L.GlobalAveragePooling1D, _L.GlobalAveragePooling3D),
        "1D/3D average pooling",
        "keep",
        PASS_THROUGH,
        "none",
        REFUSED,
        fix="the exporter takes the 2D versions",
    ),
    # merges
    Entry(
        (_L.Add,),
        "Add",
        "keep",
        MERGE,
        "none",
        CALIBRATED,
        "add",
        check=_two_inputs,
        note="inputs without a learned quantizer get calibrated scales (the sum's step where it fits)",
        operands=MERGED,
    ),
    Entry(
        (_L.Concatenate,),
        "Concatenate",
        "keep",
        MERGE,
        "none",
        CALIBRATED,
        "concat",
        note="inputs without a learned quantizer get calibrated scales",
        operands=MERGED,
    ),
    Entry(
        (_L.Multiply,),
        "Multiply",
        "keep",
        MERGE,
        "none",
        CALIBRATED,
        "elementwise",
        check=_two_inputs,
        note="MUL of the factors (a squeeze-and-excite gate and its map) on learned grids; the output is "
        "quantized by the next learned quantizer or calibrated",
        operands=FACTORS,
    ),
    Entry(
        (_L.Maximum, _L.Minimum),
        "Maximum, Minimum",
        "keep",
        MERGE,
        "none",
        CALIBRATED,
        "elementwise",
        check=_two_inputs,
        note="MAXIMUM / MINIMUM; the output is quantized by the next learned quantizer or calibrated",
    ),
    Entry(
        (_L.Subtract,),
        "Subtract",
        "keep",
        SIGNED,
        "none",
        CALIBRATED,
        "elementwise",
        check=_two_inputs,
        note="SUB of two maps on learned grids (as Add): the next learned quantizer sets its scale, "
        "else calibrated",
        operands=MERGED,
    ),
    Entry((_L.Average,), "Average", "keep", MERGE, "none", REFUSED, fix="use Add, then Rescaling(1 / n)"),
    # activations
    Entry(
        (_L.ReLU,),
        "ReLU",
        "keep",
        ACTIVATION,
        "none",
        EXACT,
        "activation",
        check=_relu_config,
        note="ReLU() and ReLU(6.0): fused clamp",
    ),
    Entry(
        (_L.Activation,),
        "Activation",
        "keep",
        ACTIVATION,
        "none",
        EXACT,
        "activation",
        note="per activation function, see the table of activations",
    ),
    Entry(
        (_L.Softmax,),
        "Softmax",
        "keep",
        NONNEG,
        "none",
        EXACT,
        "softmax",
        check=_softmax_axis,
        note="TFLite's fixed int8 output scale 1/256",
    ),
    Entry(
        (_L.LeakyReLU,),
        "LeakyReLU",
        "keep",
        ACTIVATION,
        "none",
        CALIBRATED,
        "activation",
        note="LEAKY_RELU, output scale calibrated",
    ),
    Entry(
        (_L.ELU,),
        "ELU",
        "keep",
        SIGNED,
        "none",
        REFUSED,
        fix="no integer export yet: use ReLU or LeakyReLU",
    ),
    Entry(
        (_L.Rescaling, _L.Normalization),
        "Rescaling, Normalization",
        "keep",
        SIGNED,
        "none",
        CALIBRATED,
        "affine",
        check=lambda layer, node: _affine_config(layer, node),
        fix="scale the data before the model (include_preprocessing=False for keras.applications)",
        note="x a + b with one a, b for all channels: MUL/ADD by exact int8 constants; one a_c, b_c per "
        "channel: a 1x1 DEPTHWISE_CONV_2D (as a BatchNorm that cannot fold); the raw input's scale "
        "calibrated (integer pixels stay exact)",
    ),
    Entry(
        (_L.LayerNormalization,),
        "LayerNormalization",
        "keep",
        SIGNED,
        "none",
        CALIBRATED,
        "layernorm",
        check=_layernorm_config,
        note="decomposed into int8 MEAN, SUB, MUL, RSQRT (each output calibrated), then gamma and beta as "
        "a 1x1 DEPTHWISE_CONV_2D",
        operands=INPUT,
    ),
    Entry(
        tuple(c for c in (_APP_LAYERS.get("LayerScale"),) if c),
        "keras.applications' LayerScale (ConvNeXt)",
        "keep",
        SIGNED,
        "none",
        EXACT,
        "layer_scale",
        note="x gamma_c: a 1x1 DEPTHWISE_CONV_2D (exact products)",
    ),
    Entry(
        tuple(c for c in (_APP_LAYERS.get("StochasticDepth"),) if c),
        "keras.applications' StochasticDepth (ConvNeXt)",
        "keep",
        PASS_THROUGH,
        "none",
        EXACT,
        "identity",
        note="identity at inference",
    ),
    Entry(
        tuple(c for c in (_APP_LAYERS.get("CustomScaleLayer"),) if c),
        "keras.applications' CustomScaleLayer (InceptionResNetV2)",
        "keep",
        SIGNED,
        "none",
        CALIBRATED,
        "scaled_add",
        check=_scale_add_config,
        note="x + scale * branch: both operands on learned grids, MUL by the exact int8 constant scale "
        "(product calibrated), ADD",
        operands=MERGED,
    ),
    Entry(
        (keras.Model,),
        "nested Functional / Sequential model",
        "nested",
        NESTED,
        "none",
        EXACT,
        "nested",
        note="quantized and exported through the nesting",
    ),
]

# Keras 3 operation nodes (keras.ops calls and tensor arithmetic in a Functional graph)
SUBTRACTIONS = (_L.Subtract,) + tuple(c for c in (_cls(_np_ops, "Subtract"),) if c)
SCALAR_SHIFT_OPS = tuple(c for c in (_cls(_np_ops, "Add"), _cls(_np_ops, "Subtract")) if c)  # x + c, x - c
SCALAR_SCALE_OPS = tuple(c for c in (_cls(_np_ops, "Multiply"),) if c)  # x * c (x / c: DIVIDE_OPS)
DIVIDE_OPS = tuple(c for c in (_cls(_np_ops, "Divide"), _cls(_np_ops, "TrueDivide")) if c)
_OPS = [
    Entry(
        tuple(
            c
            for c in (
                _cls(_np_ops, "Reshape"),
                _cls(_np_ops, "Transpose"),
                _cls(_np_ops, "Squeeze"),
                _cls(_np_ops, "ExpandDims"),
            )
            if c
        ),
        "ops.reshape, ops.transpose, ops.squeeze, ops.expand_dims",
        "keep",
        PASS_THROUGH,
        "none",
        EXACT,
        "same_scale_op",
        note="values move, the scale stays",
    ),
    Entry(
        tuple(c for c in (_cls(_np_ops, "Add"),) if c),
        "ops.add, x + y",
        "keep",
        MERGE,
        "none",
        CALIBRATED,
        "elementwise",
        check=_binary_op,
        fix="write it with two operands (a tensor and a tensor or a scalar)",
        note="ADD; two feature maps: as the Add layer; a scalar operand is an exact int8 constant, "
        "output calibrated",
        operands=MERGED,
    ),
    Entry(
        tuple(
            c for c in (_cls(_np_ops, "Multiply"), _cls(_np_ops, "Maximum"), _cls(_np_ops, "Minimum")) if c
        ),
        "ops.multiply, ops.maximum, ops.minimum, x * y",
        "keep",
        MERGE,
        "none",
        CALIBRATED,
        "elementwise",
        check=_binary_op,
        fix="write it with two operands (a tensor and a tensor or a scalar)",
        note="MUL / MAXIMUM / MINIMUM; a scalar operand is an exact int8 constant; output calibrated",
    ),
    Entry(
        tuple(c for c in (_cls(_np_ops, "Subtract"),) if c),
        "ops.subtract, x - y",
        "keep",
        SIGNED,
        "none",
        CALIBRATED,
        "elementwise",
        check=_binary_op,
        fix="write it with two operands",
        note="SUB; two feature maps: as the Subtract layer; a scalar operand is an exact int8 constant, "
        "output calibrated",
        operands=MERGED,
    ),
    Entry(
        DIVIDE_OPS,
        "ops.divide, x / c",
        "keep",
        SIGNED,
        "none",
        CALIBRATED,
        "elementwise",
        check=_divide_by_constant,
        fix="divide by a nonzero constant (exported as a MUL by 1/c)",
        note="MUL by the int8 constant 1/c, output calibrated",
    ),
    Entry(
        tuple(c for c in (_cls(_np_ops, "Concatenate"),) if c),
        "ops.concatenate",
        "keep",
        MERGE,
        "none",
        CALIBRATED,
        "concat",
        note="as Concatenate",
        operands=MERGED,
    ),
    Entry(
        tuple(c for c in (_cls(_np_ops, "Mean"),) if c),
        "ops.mean",
        "keep",
        PASS_THROUGH,
        "none",
        CALIBRATED,
        "mean",
        note="MEAN (the squeeze of squeeze-and-excite), output calibrated",
    ),
    Entry(
        tuple(c for c in (_cls(_np_ops, "Clip"),) if c),
        "ops.clip",
        "keep",
        ACTIVATION,
        "none",
        REFUSED,
        fix="use ReLU(6.0) for clip(x, 0, 6)",
    ),
    Entry(
        tuple(
            c
            for c in (
                _cls(_nn_ops, "Relu"),
                _cls(_nn_ops, "Relu6"),
                _cls(_nn_ops, "Sigmoid"),
                _cls(_nn_ops, "HardSigmoid"),
                _cls(_nn_ops, "HardSilu"),
                _cls(_nn_ops, "Silu"),
                _cls(_nn_ops, "LeakyRelu"),
                _cls(_nn_ops, "Softmax"),
            )
            if c
        ),
        "ops.relu, relu6, sigmoid, hard_sigmoid, hard_silu, silu, leaky_relu, softmax",
        "keep",
        ACTIVATION,
        "none",
        CALIBRATED,
        "activation",
        note="as the activation function of the same name",
    ),
]
ENTRIES += [e for e in _OPS if e.classes]

# op classes -> the activation function they compute
_OP_ACTIVATION = {
    c: name
    for c, name in (
        (_cls(_nn_ops, "Relu"), "relu"),
        (_cls(_nn_ops, "Relu6"), "relu6"),
        (_cls(_nn_ops, "Sigmoid"), "sigmoid"),
        (_cls(_nn_ops, "HardSigmoid"), "hard_sigmoid"),
        (_cls(_nn_ops, "HardSilu"), "hard_silu"),
        (_cls(_nn_ops, "Silu"), "silu"),
        (_cls(_nn_ops, "LeakyRelu"), "leaky_relu"),
        (_cls(_nn_ops, "Softmax"), "softmax"),
    )
    if c is not None
}

ACTIVATIONS = [
    Activation(("linear", None), False, EXACT, "linear"),
    Activation(("relu",), True, EXACT, "relu"),
    Activation(("relu6",), True, EXACT, "relu6"),
    Activation(("softmax",), True, EXACT, "softmax", fixed_scale=True),
    Activation(
        ("sigmoid", "int8_sigmoid"),
        True,
        CALIBRATED,
        "sigmoid",
        operands=INPUT,
        fixed_scale=True,
        split=True,
        int8="int8_sigmoid",
        logistic="logistic",
    ),
    Activation(("hard_sigmoid",), True, CALIBRATED, "hard_sigmoid"),
    Activation(
        ("hard_swish", "hard_silu"), False, CALIBRATED, "hard_swish", operands=INPUT, layer="QHardSwish"
    ),
    Activation(
        ("swish", "silu", "int8_swish"),
        False,
        CALIBRATED,
        "swish",
        operands=INPUT,
        split=True,
        int8="int8_swish",
        logistic="logistic_mul",
    ),
    Activation(("leaky_relu",), False, CALIBRATED, "leaky_relu"),
    Activation(("gelu",), False, CALIBRATED, "gelu"),
    Activation(("exponential", "softplus"), True, REFUSED, fix="use relu, relu6, sigmoid or swish"),
]

_BY_CLASS = {}
for _e in ENTRIES:
    for _c in _e.classes:
        _BY_CLASS.setdefault(_c, _e)
_ACT_BY_NAME = {n: a for a in ACTIVATIONS for n in a.names}


def scalar_affine(layer):
    """``(a, b, None)`` when ``layer`` computes ``x a + b`` with scalars a, b, else ``(None, None, why not)``."""
    if isinstance(layer, _L.Rescaling):
        a, b = np.asarray(layer.scale, np.float64), np.asarray(layer.offset, np.float64)
    else:
        if getattr(layer, "invert", False) or getattr(layer, "mean", None) is None:
            return None, None, "an inverted or unbuilt Normalization"
        mean = np.asarray(layer.mean, np.float64)
        std = np.maximum(np.sqrt(np.asarray(layer.variance, np.float64)), keras.backend.epsilon())
        a, b = 1.0 / std, -mean / std
    if np.ptp(a) > 0 or np.ptp(b) > 0:
        return None, None, "a different scale or offset per channel (the exporter takes one for all channels)"
    return float(a.reshape(-1)[0]), float(b.reshape(-1)[0]), None


def channel_affine(layer, channels):
    """``(a, b, None)`` with one scale and offset per channel (arrays of ``channels``) when the
    Rescaling / Normalization ``layer`` computes ``x a_c + b_c`` over the last axis, else
    ``(None, None, why not)``."""
    if isinstance(layer, _L.Rescaling):
        a, b = np.asarray(layer.scale, np.float64), np.asarray(layer.offset, np.float64)
    else:
        if getattr(layer, "invert", False) or getattr(layer, "mean", None) is None:
            return None, None, "an inverted or unbuilt Normalization"
        axis = tuple(np.atleast_1d(layer.axis))
        if axis not in ((-1,),):
            rank = len(getattr(layer, "_build_input_shape", None) or ()) or None
            if rank is None or axis != (rank - 1,):
                return None, None, f"axis={layer.axis} (the exporter normalizes the last axis)"
        mean = np.asarray(layer.mean, np.float64)
        std = np.maximum(np.sqrt(np.asarray(layer.variance, np.float64)), keras.backend.epsilon())
        a, b = 1.0 / std, -mean / std
    a, b = a.reshape(-1), b.reshape(-1)
    if a.size not in (1, channels) or b.size not in (1, channels):
        return None, None, f"{a.size} scales for {channels} channels"
    return np.broadcast_to(a, (channels,)).copy(), np.broadcast_to(b, (channels,)).copy(), None


def _affine_config(layer, node):
    channels = node.input_tensors[0].shape[-1]
    if scalar_affine(layer)[2] is None:
        return None
    return channel_affine(layer, channels)[2] if channels else "an unknown channel count"


def lookup(op):
    """The :class:`Entry` of a layer or operation (most specific class first), or None."""
    for cls in type(op).__mro__:
        entry = _BY_CLASS.get(cls)
        if entry is not None:
            return entry
    return None


def activation_function_name(op):
    """Name of the activation function ``op`` applies (``"linear"`` for none), or None.

    For an ``Activation`` layer, a kernel layer's ``activation=`` argument,
    a ``ReLU`` layer (``"relu"`` or ``"relu6"``; None for other settings) or
    an activation operation such as ``keras.ops.relu``.
    """
    op_name = _OP_ACTIVATION.get(type(op))
    if op_name is not None:
        return op_name
    if isinstance(op, _L.LeakyReLU):
        return "leaky_relu"
    if isinstance(op, _L.ReLU):
        if _relu_config(op, None) is not None:
            return None
        return "relu" if op.max_value is None else "relu6"
    fn = getattr(op, "activation", None)
    if fn is None:
        return "linear"
    return getattr(fn, "__name__", str(fn))


def activation(name):
    """The :class:`Activation` entry of an activation function name, or None."""
    return _ACT_BY_NAME.get(name)


def has_fixed_output_scale(op):
    """Whether TFLite fixes the int8 scale of ``op``'s output (softmax, sigmoid: 1/256): such an
    output needs no learned quantizer of its own to be computed alike by Keras and the file."""
    act = activation(activation_function_name(op))
    return act is not None and act.fixed_scale


def _activation_field(op, field):
    act = activation(activation_function_name(op))
    return None if act is None else getattr(act, field)


def splits_fused_activation(op):
    """Whether ``quantize_model`` splits ``op``'s fused ``activation=`` off into an ``Activation``
    layer (sigmoid, swish: the file computes them from an int8 input, which gets a learned grid)."""
    return bool(_activation_field(op, "split"))


def int8_activation_name(op):
    """Name of the ``tfdq.layers`` function that computes ``op``'s activation as the file's int8
    lookup table rounds it (``"int8_sigmoid"``, ``"int8_swish"``), or None."""
    return _activation_field(op, "int8")


def activation_layer_name(op):
    """Name of the ``tfdq.layers`` class that an ``Activation`` layer applying ``op``'s function
    becomes in ``quantize_model`` (``"QHardSwish"``), or None (the layer's own class)."""
    return _activation_field(op, "layer")


def logistic_form(op):
    """``"logistic"`` (sigmoid), ``"logistic_mul"`` (swish) or None: how the file computes ``op``'s
    activation from TFLite's LOGISTIC."""
    return _activation_field(op, "logistic")


def operand_grids(op):
    """Which inputs of ``op`` get a learned quantizer of their own: one of :data:`OPERAND_GRIDS`
    (``MERGED``, ``FACTORS``, ``INPUT``, ``UNFOLDED``) or None, from its entry's ``operands``; for an
    activation node (``Activation``, ``ReLU``, ``keras.ops.hard_silu``, ...) from its activation
    function's entry (a kernel layer's fused ``activation=`` needs none)."""
    entry = lookup(op)
    if entry is None:
        return None
    if entry.role == ACTIVATION:
        act = activation(activation_function_name(op))
        return None if act is None else act.operands
    return entry.operands


def is_integer_sum(layer, node=None):
    """True when ``layer`` (called at ``node``) adds or subtracts feature maps and the
    integer export computes it as an int8 ADD / SUB: ``Add``, ``Subtract``, ``x + y``,
    ``x - y`` and InceptionResNetV2's ``x + scale * branch`` (the merges whose
    ``operands`` are ``MERGED``, concatenations aside). LiteRT's XNNPACK kernel
    rounds its requantized result half up, so the signed quantizer after it does too
    (:class:`tfdq.layers.ActivationQuantizer`'s ``ties``)."""
    entry = lookup(layer)
    if entry is None or entry.operands != MERGED or entry.rule == "concat":
        return False
    return not is_operation(layer) or node is None or len(node.input_tensors) == 2


def is_concatenation(layer):
    """True for a concatenation (``Concatenate``, ``keras.ops.concatenate``). Its operands lie on
    learned grids of their own; the file moves each onto the output's scale with an int8
    QUANTIZE (CONCATENATION takes one scale), which LiteRT's XNNPACK rounds half up like its ADD,
    so the signed quantizer after it does too."""
    entry = lookup(layer)
    return entry is not None and entry.rule == "concat"


def is_tensor_sum(layer, node):
    """True for a sum or difference of two feature maps: ``x + y``, ``x - y``, ``keras.ops.add`` /
    ``subtract``, the ``Subtract`` layer (no constant operand). Both operands get learned quantizers
    (``operands=MERGED``), so the result lies on their grids, with one sign flipped for a
    difference: exported as the ``Add`` layer is (by SUB for a difference)."""
    entry = lookup(layer)
    return (
        entry is not None
        and entry.operands == MERGED
        and entry.rule == "elementwise"
        and len(node.input_tensors) == 2
    )


def is_difference(layer):
    """True for the ``Subtract`` layer and ``x - y`` / ``keras.ops.subtract``."""
    return isinstance(layer, SUBTRACTIONS)


def is_operation(op):
    """True for a Keras 3 operation node that is not a layer (``x + 3.0``, ``keras.ops.relu``)."""
    return not isinstance(op, _L.Layer)


def is_quantizable(layer):
    """True when ``quantize_model`` replaces ``layer`` by a tfdq layer with a weight quantizer."""
    entry = lookup(layer)
    # the exact class only: a subclass may compute something else in its call()
    return entry is not None and entry.clone in ("quantize", "split") and type(layer) in entry.classes


def has_float_weights(layer):
    """A layer whose weights tfdq neither quantizes nor folds (kept float)."""
    if is_operation(layer) or not layer.weights:
        return False
    if is_quantizable(layer) or isinstance(layer, (qlayers.QuantizedWeightsMixin, keras.Model)):
        return False
    entry = lookup(layer)
    return entry is None or entry.role == WEIGHTED


def counts_kernel(layer):
    """Memory accounting of a layer's kernel: ``"quantized"`` (kernel + bias at
    ``b_w`` bits), ``"float"`` (at 32 bits) or None (not counted: no kernel,
    or folded into the kernel before it)."""
    if is_operation(layer) or isinstance(layer, keras.Model):
        return None
    entry = lookup(layer)
    if entry is not None and entry.memory == "quantized":
        return "quantized"
    if (entry is None or entry.memory == "float") and getattr(layer, "kernel", None) is not None:
        return "float"
    return None


_CLONE_TEXT = {
    "keep": "kept",
    "nested": "quantized through",
    "split": "-> `QDepthwiseConv2D`, `ActivationQuantizer`, `QConv2D` 1x1",
}
_OPERANDS_TEXT = {
    None: "-",
    MERGED: "each operand (of 2+ maps)",
    FACTORS: "each factor",
    INPUT: "its input",
    UNFOLDED: "its input unless folded",
}
_MEMORY_TEXT = {
    "quantized": "(kernel + bias) x b_w",
    "float": "kernel + bias at 32 bits",
    "folded": "0 (folded)",
    "activation": "elements x b_x",
    "none": "-",
}


def markdown_table():
    """The README's supported-layers table, generated from :data:`ENTRIES` and :data:`ACTIVATIONS`."""
    rows = [
        "| Keras layer or op | `quantize_model` | learned operand quantizers | memory | TFLite export "
        "| notes, fix |",
        "|---|---|---|---|---|---|",
    ]
    for e in ENTRIES:
        if e.clone == "split":
            clone, memory = _CLONE_TEXT["split"], _MEMORY_TEXT["quantized"] + " each"
        elif e.clone == "quantize":
            clone, memory = f"-> `{e.quantized.__name__}`", _MEMORY_TEXT["quantized"]
        else:
            clone, memory = _CLONE_TEXT[e.clone], _MEMORY_TEXT[e.memory]
        notes = "; ".join(t for t in (e.note, e.fix) if t)
        operands = _OPERANDS_TEXT[e.operands]
        rows.append(f"| {e.name} | {clone} | {operands} | {memory} | {e.export} | {notes} |")
    rows.append("")
    rows.append("| activation function | sign | learned operand quantizers | TFLite export | fix |")
    rows.append("|---|---|---|---|---|")
    for a in ACTIVATIONS:
        names = ", ".join(f"`{n}`" for n in a.names if n is not None)
        sign = ">= 0" if a.nonneg else "signed"
        rows.append(f"| {names} | {sign} | {_OPERANDS_TEXT[a.operands]} | {a.export} | {a.fix} |")
    return "\n".join(rows) + "\n"


# keras.applications families as the sweep (benchmarks/applications_sweep.py, tests/test_applications_sweep.py)
# finds them: weights=None, the smallest input each allows, quantize_model + forward + to_tflite + LiteRT.
# "exports": an all-integer file that LiteRT runs; "refused": quantize_model(target="tflite") names the layers
# before training. The sweep test asserts each row.
APPLICATIONS = {
    "ConvNeXtTiny": (
        "exports",
        "per-channel Normalization, Conv2D(groups=channels) as DEPTHWISE_CONV_2D, LayerNormalization "
        "decomposed (calibrated intermediates), GELU, LayerScale",
    ),
    "ConvNeXtSmall": ("exports", "as ConvNeXtTiny"),
    "DenseNet121": ("exports", "pre-activation BatchNorms as 1x1 DEPTHWISE_CONV_2D, Concatenate"),
    "EfficientNetB0": ("exports", "swish, squeeze-and-excite"),
    "EfficientNetB1": ("exports", "as B0"),
    "EfficientNetB2": ("exports", "as B0"),
    "EfficientNetB3": ("exports", "as B0"),
    "EfficientNetB4": ("exports", "as B0"),
    "EfficientNetV2B0": ("exports", "per-channel Normalization as 1x1 DEPTHWISE_CONV_2D, swish, SE"),
    "EfficientNetV2B1": ("exports", "as V2B0"),
    "EfficientNetV2B2": ("exports", "as V2B0"),
    "EfficientNetV2B3": ("exports", "as V2B0"),
    "EfficientNetV2S": ("exports", "as V2B0"),
    "InceptionResNetV2": ("exports", "CustomScaleLayer: MUL by the exact scale, ADD"),
    "InceptionV3": ("exports", ""),
    "MobileNet": ("exports", ""),
    "MobileNetV2": ("exports", ""),
    "MobileNetV3Small": ("exports", "hard-swish, squeeze-and-excite"),
    "MobileNetV3Large": ("exports", "hard-swish, squeeze-and-excite"),
    "NASNetMobile": ("exports", "SeparableConv2D split, Cropping2D, ZeroPadding2D, AveragePooling2D"),
    "ResNet50": ("exports", ""),
    "ResNet101": ("exports", ""),
    "ResNet50V2": ("exports", "pre-activation BatchNorms as 1x1 DEPTHWISE_CONV_2D"),
    "ResNet101V2": ("exports", "as ResNet50V2"),
    "VGG16": ("exports", ""),
    "Xception": ("exports", "SeparableConv2D split into learned depthwise + pointwise"),
}


# The models of APPLICATIONS whose exported file the sweep has checked: an all-integer file that LiteRT
# ran (benchmarks/applications_sweep.py; rows in benchmarks/results/applications_sweep.json, which
# tests/test_applications_sweep.py checks against this set). The README lists these only.
APPLICATIONS_CHECKED = frozenset(
    {
        "ConvNeXtSmall",
        "ConvNeXtTiny",
        "DenseNet121",
        "EfficientNetB0",
        "EfficientNetB1",
        "EfficientNetB2",
        "EfficientNetB3",
        "EfficientNetB4",
        "EfficientNetV2B0",
        "EfficientNetV2B1",
        "EfficientNetV2B2",
        "EfficientNetV2B3",
        "EfficientNetV2S",
        "InceptionResNetV2",
        "InceptionV3",
        "MobileNet",
        "MobileNetV2",
        "MobileNetV3Large",
        "MobileNetV3Small",
        "NASNetMobile",
        "ResNet101",
        "ResNet101V2",
        "ResNet50",
        "ResNet50V2",
        "VGG16",
        "Xception",
    }
)


def applications_table():
    """The README's table of keras.applications families: those of :data:`APPLICATIONS` whose file
    the sweep checked (:data:`APPLICATIONS_CHECKED`), then the names planning accepts unchecked."""
    rows = [
        "| keras.applications model | all-integer file, run in LiteRT | what it needs |",
        "|---|---|---|",
    ]
    for name, (status, note) in APPLICATIONS.items():
        if name in APPLICATIONS_CHECKED:
            rows.append(
                f"| {name} | {'yes' if status == 'exports' else 'refused before training'} | {note} |"
            )
    unchecked = [name for name in APPLICATIONS if name not in APPLICATIONS_CHECKED]
    if unchecked:
        rows += [
            "",
            "Planning (`quantize_model(..., strict=True)`) also accepts "
            + ", ".join(unchecked)
            + "; no exported file of these has been checked yet "
            "(`python -m benchmarks.applications_sweep --models NAME`).",
        ]
    return "\n".join(rows) + "\n"


def readme_tables():
    """What the README holds between its markers: the layers table, then the keras.applications table."""
    return "\n" + markdown_table() + "\n" + applications_table()


README_BEGIN = "<!-- supported-layers table: generated by tfdq.registry.markdown_table() -->"
README_END = "<!-- end of supported-layers table -->"


def write_readme_table(path):
    """Replace the table between the README's markers by :func:`markdown_table` (returns True if changed)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start = text.index(README_BEGIN) + len(README_BEGIN)
    end = text.index(README_END)
    new = text[:start] + readme_tables() + text[end:]
    if new != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
    return new != text


if __name__ == "__main__":  # python -m tfdq.registry README.md: refresh the README's table
    import sys

    print(
        "updated" if write_readme_table(sys.argv[1] if len(sys.argv) > 1 else "README.md") else "up to date"
    )
