"""``quantize_model``: turn a float Keras model into a learned-quantization one.

The model is cloned with ``keras.models.clone_model``: supported layers
(``Conv2D``, ``DepthwiseConv2D``, ``Dense``; ``SeparableConv2D`` split into
depthwise and pointwise) become their quantized versions with a weight
quantizer, Keras 3 operation nodes (``x + 3.0``, ``keras.ops.*``) are rebuilt
as they are, and every feature map that feeds a quantized layer
passes an :class:`~tfdq.layers.ActivationQuantizer` (the input image
included). Float weights are copied and the quantizers are initialized as the
paper does (docs/method.md section 4).

An unsigned quantizer placed on the output of a plain ReLU takes the ReLU's
input instead (``Q(relu(x)) = Q(x)`` for a quantizer that clips at 0), so
the ReLU drops out of the quantized graph: one elementwise pass less per
feature map, forward and backward. A ReLU after an ``Add`` / ``Concatenate``
stays: its input, a sum of values on learned grids, is often exactly 0,
where the ReLU's gradient and the quantizer's differ.

Placement of activation quantizers: a feature map that reaches a quantized
layer only through shape or pooling operations (Flatten, Dropout, pooling,
padding, ...) is quantized where it is produced, so that, as in the paper's
ResNet-20, the quantizer sits right after the ReLU and the identity shortcut
sees the quantized value too. A quantizer is unsigned when its input is
non-negative by construction (ReLU, ReLU6, a fused ``activation="relu"``,
sums and poolings of such) and signed otherwise. What each layer or
operation means for this (pass-through, merge, activation) comes from
:mod:`tfdq.registry`, as does whether it is quantized.

So that every tensor inside the network lies on a learned grid (and the
integer export calibrates nothing but the logits), two more kinds of
quantizer are placed, starting at 8 bits (the upper bound) and left out of
memory sizes (``counted=False``: they are parts of feature maps that are
counted already): one on every operand of an ``Add`` / ``Concatenate`` that
has none yet (a residual branch ending in BatchNorm: signed), and one on the
output of an average pooling whose result reaches a quantized layer (the mean
of quantized values is not on their grid).
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import keras
import numpy as np
from keras import tree

from tfdq import _compat, batchnorm, registry, validate
from tfdq import layers as qlayers
from tfdq import quantizers as quantizers_lib
from tfdq._compat import Functional
from tfdq.graph import model_nodes, producer
from tfdq.model import QuantizedModel

logger = logging.getLogger("tfdq")

AVERAGING = (
    keras.layers.AveragePooling1D,
    keras.layers.AveragePooling2D,
    keras.layers.AveragePooling3D,
    keras.layers.GlobalAveragePooling1D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalAveragePooling3D,
)


class QuantizationReport(dict):
    """What ``quantize_model`` did: quantized layers, activation quantizers
    and the layers that stay float (``report["float_layers"]``)."""


def _constants_nonneg(node):
    """True when every non-tensor number among a node's arguments is >= 0."""
    for value in tree.flatten((node.arguments.args, node.arguments.kwargs)):
        if isinstance(value, keras.KerasTensor) or value is None:
            continue
        try:
            if np.any(np.asarray(value, dtype=np.float64) < 0):
                return False
        except (TypeError, ValueError):
            return False
    return True


def _output_nonneg(layer):
    """An activation-like node's output is >= 0 by construction."""
    if isinstance(layer, keras.layers.ReLU):
        slope = float(getattr(layer, "negative_slope", 0.0) or 0.0)
        threshold = float(getattr(layer, "threshold", 0.0) or 0.0)
        return slope == 0.0 and threshold >= 0.0
    x_min = getattr(layer, "x_min", None)  # keras.ops.clip
    if x_min is not None:
        try:
            return float(x_min) >= 0.0
        except (TypeError, ValueError):
            return False
    act = registry.activation(registry.activation_function_name(layer))
    return act is not None and act.nonneg


def _is_nonneg(tensor, input_signs, cache):
    """True when ``tensor`` is >= 0 by construction of the graph."""
    key = id(tensor)
    if key in cache:
        return cache[key]
    layer, node = producer(tensor)
    entry = None if layer is None else registry.lookup(layer)
    role = None if entry is None else entry.role
    if layer is None:
        result = input_signs.get(id(tensor), False)
    elif isinstance(layer, keras.Model):
        position = [id(o) for o in node.outputs].index(id(tensor))
        inner_signs = {
            id(inner): _is_nonneg(outer, input_signs, cache)
            for inner, outer in zip(layer.inputs, node.input_tensors)
        }
        result = _is_nonneg(layer.outputs[position], inner_signs, {})
    elif isinstance(layer, qlayers.ActivationQuantizer):
        result = not layer.signed
    elif role in (registry.PASS_THROUGH, registry.MERGE):
        result = _constants_nonneg(node) and all(
            _is_nonneg(t, input_signs, cache) for t in node.input_tensors
        )
    elif role == registry.NONNEG:
        result = True
    elif role in (registry.ACTIVATION, registry.WEIGHTED):
        result = _output_nonneg(layer)
    else:
        result = False
    cache[key] = result
    return result


def _placement(tensor, averages=None):
    """Walk up through pass-through layers to where the value is produced.

    The outputs of average poolings passed on the way are appended to
    ``averages`` (a list), when given.
    """
    while True:
        layer, node = producer(tensor)
        if layer is None or isinstance(layer, keras.Model):
            return tensor
        entry = registry.lookup(layer)
        if entry is None or entry.role != registry.PASS_THROUGH or len(node.input_tensors) != 1:
            return tensor
        if averages is not None and isinstance(layer, AVERAGING):
            averages.append(tensor)
        tensor = node.input_tensors[0]


def _as_functional(model):
    if isinstance(model, keras.Sequential):
        try:
            inputs = model.inputs
        except (AttributeError, ValueError):
            inputs = None
        if not model.built or not inputs:
            raise ValueError(
                f"Model {model.name!r} is not built, so its layers have no "
                "weights to quantize. Build it first: give the Sequential "
                "model a keras.Input(shape=...) as its first layer or call "
                "model.build(input_shape)."
            )
        inputs = inputs[0] if len(inputs) == 1 else inputs
        outputs = model.outputs[0] if len(model.outputs) == 1 else model.outputs
        return keras.Model(inputs, outputs, name=model.name)
    if not isinstance(model, Functional):
        raise ValueError(
            f"tfdq.quantize_model needs a Functional or Sequential model; "
            f"{model.name!r} is a subclassed {type(model).__name__}, whose graph "
            "Keras cannot see. Rebuild it with the functional API "
            "(inputs = keras.Input(...); outputs = layer(...)(inputs); "
            "keras.Model(inputs, outputs)) or as a keras.Sequential."
        )
    if not model.built:
        raise ValueError(f"Model {model.name!r} is not built. Call it on data or build it before quantizing.")
    return model


def _is_plain_relu(layer):
    """``max(x, 0)`` exactly: ReLU() with default arguments, Activation("relu"), keras.ops.relu."""
    entry = registry.lookup(layer)
    return (
        entry is not None
        and entry.role == registry.ACTIVATION
        and registry.activation_function_name(layer) == "relu"
    )


def _relu_input(tensor):
    """The input of the plain ReLU that produced ``tensor``, else ``tensor``.

    An unsigned quantizer clips to ``[0, q_max]``, so ``Q(relu(x)) = Q(x)``
    and its straight-through gradient is that of ReLU then quantizer
    everywhere but at x = 0 exactly (ReLU's gradient there is 0, the
    quantizer's 1): the quantizer takes the ReLU's input and the
    ReLU drops out of the quantized graph, which saves its forward and
    backward pass over the feature map in every training step. Export
    fuses the clamp at 0 into the producer as before.
    """
    layer, node = producer(tensor)
    if layer is None or not _is_plain_relu(layer) or len(node.input_tensors) != 1:
        return tensor
    source, source_node = producer(node.input_tensors[0])
    if (
        source is not None
        and registry.operand_grids(source) == registry.MERGED
        and len(source_node.input_tensors) >= 2
    ):
        # a sum of values on learned grids is often exactly 0, where the
        # ReLU's gradient (0) and the quantizer's (1) differ: keep the ReLU
        return tensor
    return node.input_tensors[0]


def _grid_operands(nodes):
    """The inputs that get a learned quantizer of their own (8 bits at the start, not counted: parts
    of feature maps), so that the integer file computes what Keras computes: for each node, those
    that its registry entry's ``operands`` names (:func:`tfdq.registry.operand_grids`):

    * ``MERGED``: every operand of a merge of two or more feature maps (a sum, difference,
      concatenation, CustomScaleLayer; ``x + 3.0`` merges one map and needs none);
    * ``FACTORS``: both factors of a Multiply layer (a squeeze-and-excite gate and the map it
      scales: the int8 MUL then rounds once, onto the next learned grid);
    * ``INPUT``: the input of a hard-swish activation (one int8 HARD_SWISH, which also rounds only
      at its output) and of a LayerNormalization (decomposed into int8 ops);
    * ``UNFOLDED``: the input of a BatchNormalization that no kernel before it absorbs
      (pre-activation blocks), exported as its own per-channel integer multiply-add
      (tfdq.export.plan.BatchNormPlan). It folds when it directly follows a quantized kernel with
      a linear activation whose output goes nowhere else.
    """
    uses = {}
    for _, node in nodes:
        for t in node.input_tensors:
            uses[id(t)] = uses.get(id(t), 0) + 1
    found = []
    for layer, node in nodes:
        kind = registry.operand_grids(layer)
        tensors = list(node.input_tensors)
        if kind == registry.FACTORS or (kind == registry.MERGED and len(tensors) >= 2):
            found += tensors
        elif kind in (registry.INPUT, registry.UNFOLDED) and len(tensors) == 1:
            src, _ = producer(tensors[0])
            folds = (
                kind == registry.UNFOLDED
                and src is not None
                and registry.is_quantizable(src)
                and registry.activation_function_name(src) == "linear"
                and uses.get(id(tensors[0]), 0) == 1
            )
            if not folds:
                found += tensors
    return found


def _template(identifier, role, signed, bits_bounds, init_bits):
    """Config of the quantizer to create for one tensor.

    A signed tensor needs at least 2 bits (sign and one magnitude bit): a
    lower bound of 1 from ``activation_bits`` applies to unsigned maps only.
    """
    if bits_bounds is not None and signed and bits_bounds[0] < 2:
        bits_bounds = (2, max(2, bits_bounds[1]))
    kwargs = {"signed": signed, "role": role, "init_bits": init_bits}
    if bits_bounds is not None:
        kwargs["min_bits"], kwargs["max_bits"] = bits_bounds
    if isinstance(identifier, quantizers_lib.Quantizer):
        # A template object: its own settings win (e.g. TQT's init_bits=2),
        # except the per-tensor values, which each tensor initializes itself.
        config = identifier.get_config()
        for key in ("name", "init_d", "init_q_max", "init_q_min", "dtype", "trainable"):
            config.pop(key, None)
        config.update(signed=signed, role=role)
        if config.get("init_bits") is None:
            config["init_bits"] = init_bits
        if bits_bounds is not None:
            config["min_bits"], config["max_bits"] = bits_bounds
        elif config["role"] != identifier.role:
            config.pop("min_bits", None)
            config.pop("max_bits", None)
        if config.get("min_bits") is not None:
            # the template may come from the other signedness: keep its bounds
            # but give this tensor the bits its sign (and zero level) need
            with_zero = config.get("with_zero")
            with_zero = role == "activation" if with_zero is None else with_zero
            need = quantizers_lib.min_bits(identifier.FAMILY, signed, with_zero)
            config["min_bits"] = max(config["min_bits"], need)
            config["max_bits"] = max(config.get("max_bits") or need, config["min_bits"])
        return type(identifier), config
    if isinstance(identifier, str):
        cls = quantizers_lib.get(identifier, **kwargs).__class__
        return cls, kwargs
    raise TypeError(f"Quantizer must be a name such as 'U3' or a tfdq quantizer object, got {identifier!r}.")


def _clone_operation(op, report):
    """A fresh copy of a Keras 3 operation node (``x + 3.0``, ``keras.ops.relu``).

    Operations have no weights; they are rebuilt from their config as Keras'
    own cloning does, or shared when their config cannot rebuild them (an
    operation computes only from its arguments, so sharing it is safe).
    Operations the registry does not know are kept and listed in
    ``report["unknown_operations"]``.
    """
    if registry.lookup(op) is None:
        report["unknown_operations"].append({"name": op.name, "class": type(op).__name__})
    try:
        return op.__class__.from_config(op.get_config())
    except Exception:  # noqa: BLE001 (any failure: keep the stateless original)
        return op


class _Split:
    """A SeparableConv2D cloned as QDepthwiseConv2D -> signed ActivationQuantizer -> 1x1 QConv2D.

    Keras computes a SeparableConv2D as exactly that depthwise then pointwise
    pair (strides and dilation on the depthwise step); split, each kernel has
    its own learned quantizer and the feature map between them a learned
    quantizer too, so the exported DEPTHWISE_CONV_2D and CONV_2D hold learned
    integers on both sides.
    """

    def __init__(self, layer, options, report):
        if layer.data_format != "channels_last":
            raise ValueError(
                f"{layer.name}: SeparableConv2D with data_format={layer.data_format!r} is not supported."
            )
        cls, kwargs = _template(
            options["weight_quantizer"], "weight", True, options["weight_bits"], options["init_bits"]
        )
        self.depthwise = qlayers.QDepthwiseConv2D(
            layer.kernel_size,
            strides=layer.strides,
            padding=layer.padding,
            depth_multiplier=layer.depth_multiplier,
            dilation_rate=layer.dilation_rate,
            use_bias=False,
            name=f"{layer.name}_depthwise",
            kernel_quantizer=cls(**dict(kwargs, name=f"{layer.name}_depthwise_wq")),
        )
        self.quantizer = None
        if options["quantize_activations"]:
            a_cls, a_kwargs = _template(
                options["activation_quantizer"],
                "activation",
                True,
                options["activation_bits"],
                options["init_bits"],
            )
            self.quantizer = qlayers.ActivationQuantizer(
                quantizer=a_cls(**a_kwargs, name=f"{layer.name}_depthwise_aq_q"),
                name=f"{layer.name}_depthwise_aq",
            )
            report["activation_quantizers"].append(
                {"name": self.quantizer.name, "signed": True, "calibrated": False}
            )
        self.pointwise = qlayers.QConv2D(
            layer.filters,
            1,
            use_bias=layer.use_bias,
            activation=layer.activation,
            name=layer.name,
            kernel_quantizer=cls(**dict(kwargs, name=f"{layer.name}_wq")),
        )
        for part in ("depthwise", "pointwise"):
            report["quantized_layers"].append({"name": f"{layer.name}/{part}", "class": type(layer).__name__})

    def call(self, x):
        h = self.depthwise(x)
        return self.pointwise(self.quantizer(h) if self.quantizer is not None else h)

    def copy_weights(self, orig):
        for new, kernel in ((self.depthwise, orig.depthwise_kernel), (self.pointwise, orig.pointwise_kernel)):
            new.kernel.assign(kernel)
            new.kernel_quantizer.initialize_from(kernel.numpy(), bits=new.kernel_quantizer.init["bits"])
        if orig.use_bias:
            self.pointwise.bias.assign(orig.bias)

    @staticmethod
    def depthwise_max_abs(orig, inputs):
        """Per example: max |depthwise part of ``orig``| on its (symbolic) input."""
        h = keras.ops.depthwise_conv(
            inputs,
            keras.ops.convert_to_tensor(orig.depthwise_kernel),
            strides=orig.strides,
            padding=orig.padding,
            dilation_rate=orig.dilation_rate,
        )
        return keras.ops.max(keras.ops.abs(h), axis=(1, 2, 3))


def _calibrate_splits(model, splits, graph_nodes, calibration_data):
    """Start every split SeparableConv2D's inner quantizer from the float model's depthwise output
    over the calibration data, all in one pass (a probe model per layer would trace the network
    once per SeparableConv2D: minutes for Xception)."""
    splits = [(orig, new) for orig, new in splits if new.quantizer is not None]
    if not splits or calibration_data is None:
        return
    outputs = [_Split.depthwise_max_abs(o, graph_nodes[id(o)][0].input_tensors[0]) for o, _ in splits]
    maxima = keras.Model(model.inputs, outputs).predict(calibration_data, verbose=0)
    if len(outputs) == 1:
        maxima = [maxima]
    for (_, new), m in zip(splits, maxima):
        q = new.quantizer.quantizer
        q.initialize_from(np.array([float(np.max(m))]), bits=q.init["bits"])


def _split_separable(layer, options, report):
    return _Split(layer, options, report)


def _check_finite(layer):
    for w in layer.weights:
        value = np.asarray(w.numpy())
        if not np.all(np.isfinite(value)):
            raise ValueError(
                f"Layer {layer.name!r} has non-finite values (NaN or Inf) in "
                f"weight {w.name!r}; quantizers cannot be initialized from "
                "them. Fix or retrain the float model first."
            )


# Moving statistics further than this from the calibration data's (standard
# deviations apart, or a factor between standard deviations) get a warning.
STALE_SHIFT, STALE_RATIO = 1.0, 2.0


@contextlib.contextmanager
def _batchnorm_for_calibration(model, calibration_data, report):
    """Calibrate (and clone) with BatchNorm statistics re-estimated on the
    calibration data, the statistics training mode will normalize with.

    The float model keeps its own statistics (they are restored after the
    block); the quantized clone copies the re-estimated ones, which its
    quantizer ranges were fitted to. ``report["batchnorm"]`` holds the
    re-estimation's summary; stale moving statistics get a warning.
    """
    report["batchnorm"] = None
    if calibration_data is None or not batchnorm.batchnorm_layers(model):
        yield
        return
    with batchnorm.reestimated_statistics(model, calibration_data) as result:
        report["batchnorm"] = {k: v for k, v in result.items() if k != "layers"} | {
            "layers": len(result["layers"])
        }
        if result["max_mean_shift"] > STALE_SHIFT or result["max_std_ratio"] > STALE_RATIO:
            warnings.warn(
                f"The BatchNorm moving statistics of {model.name!r} are far from its activations on "
                f"the calibration data (means up to {result['max_mean_shift']:.3g} standard deviations "
                f"off, standard deviations up to {result['max_std_ratio']:.3g}x off): they lag "
                "behind its weights (no or short training with a high BatchNorm momentum). The activation "
                "ranges were calibrated, and the quantized model's statistics set, from the "
                "statistics re-estimated on the calibration data. The float model is unchanged; "
                "to evaluate it in inference mode, call tfdq.recalibrate_batchnorm(model, x_train).",
                stacklevel=4,
            )
        yield


def _calibration_stats(model, tensors, data):
    """Per tensor: max |value| and min value over the calibration data.

    The probe model reduces each tensor to its per-example max |value| and min
    inside the graph, so ``predict`` keeps two numbers per example and tensor
    rather than every feature map of every calibration example at once (for
    Xception at 71x71, 128 examples: about 1 GB). Maxima and minima are exact,
    so the result is the one of the maps themselves.
    """
    outputs = []
    for t in tensors:
        axes = tuple(range(1, len(t.shape)))
        if axes:
            outputs += [keras.ops.max(keras.ops.abs(t), axis=axes), keras.ops.min(t, axis=axes)]
        else:
            outputs += [keras.ops.abs(t), t]
    outs = keras.Model(model.inputs, outputs).predict(data, verbose=0)
    return [(float(np.max(outs[2 * i])), float(np.min(outs[2 * i + 1]))) for i in range(len(tensors))]


def quantize_model(
    model: keras.Model,
    weight_quantizer: str | quantizers_lib.Quantizer = "U3",
    activation_quantizer: str | quantizers_lib.Quantizer = "U3",
    quantize_activations: bool = True,
    calibration_data=None,
    init_bits: float = 4,
    weight_bits: tuple[float, float] | None = None,
    activation_bits: tuple[float, float] | None = None,
    strict: bool = False,
    return_report: bool = False,
    target: str | None = "tflite",
    quantize_input: bool = True,
    init: str = "float",
    activation_init: str | None = None,
    quantize_output: bool = True,
) -> QuantizedModel | tuple[QuantizedModel, QuantizationReport]:
    """Clone ``model`` into a learned-quantization model.

    Args:
        model: a built Keras 3 Functional or Sequential model (nested models
            are quantized through the nesting).
        weight_quantizer: parametrization for kernels: ``"U1"``, ``"U2"``,
            ``"U3"`` (default), ``"P1"``, ``"P2"``, ``"P3"`` or a tfdq
            quantizer object used as a template.
        activation_quantizer: the same for feature maps.
        quantize_activations: insert activation quantizers (default True).
        calibration_data: optional batch (array or dataset of inputs) used to
            initialize the activation ranges and to decide whether the model
            input is non-negative. Without it activations start at
            ``d = 2^-3``, ``b = 4``. Ranges are calibrated with BatchNorm
            statistics re-estimated on this data (the batch statistics
            that training mode normalizes with; moving averages of a
            briefly trained model can be far off and would make the ranges
            clip everything): the quantized model takes these statistics,
            the float model keeps its own (``report["batchnorm"]``
            summarizes the change; a warning says when it was large).
        init_bits: starting bitwidth b (docs/method.md section 4: 4).
        weight_bits, activation_bits: ``(min_bits, max_bits)`` bounds;
            defaults (2, 8) and (1, 8) as the reference code.
        strict: raise instead of leaving unsupported weighted layers float,
            and, with ``target="tflite"``, instead of warning about layers
            the exporter cannot take.
        return_report: also return a :class:`QuantizationReport`.
        target: ``"tflite"`` (default): check, before any training, that
            :func:`tfdq.export.to_tflite` can take every layer and operation
            of the quantized model; each one it cannot is named with the fix
            in a warning (an error with ``strict=True``) and in
            ``report["export_problems"]``. ``None``: no check (a model
            trained for Keras only).
        quantize_input: also quantize the model input where it feeds a
            quantized layer (default True). The paper's reference code
            quantizes only the feature maps after the ReLUs and feeds the
            first convolution the float image: ``quantize_input=False``. An
            unquantized input gets an 8-bit scale calibrated on data at
            export, as any tensor without a learned quantizer.
        init: ``"float"`` (default): weight quantizers start from the
            kernels they quantize (the paper's initialization from a trained
            float network, section 4). ``"random"``: every quantizer starts
            at its defaults, ``d = 2^-3`` and ``b = init_bits`` (power of two:
            ``q_max = 1``), whatever the weights are: the paper's
            initialization for training from scratch (pass an untrained
            model); activations then start at their defaults too unless
            ``activation_init="calibrate"``.
        activation_init: how activation quantizers start. ``"calibrate"``:
            from the largest value over ``calibration_data``
            (``d = 2^floor(log2(max / (2^b - 1)))``, unsigned); ``"default"``:
            at ``d = 2^-3``, ``b = init_bits`` (``q_max = 1.875`` for an
            unsigned 4-bit quantizer), as the reference code starts every
            activation quantizer, the fixed ones included; ``None``
            (default): ``"calibrate"`` when ``calibration_data`` is given and
            ``init="float"``, else ``"default"``.
        quantize_output: put an uncounted 8-bit quantizer on each model output
            that is not already on a grid TFLite fixes (softmax and sigmoid
            outputs are), usually the logits (default True). The integer file
            stores its outputs as int8 in any case; with the quantizer the
            Keras model computes the same integers, so both break ties alike
            (two logits one step apart in float can be equal in the file) and
            ``verify`` compares like with like. It starts at 8 bits from the
            calibrated largest output (or the defaults) and is not charged to
            any activation budget. ``False``: the outputs stay float in Keras
            and the file's output scale is calibrated on data at export.

    Returns:
        The quantized model, a :class:`tfdq.model.QuantizedModel` (a
        Functional model; not compiled), and the report if asked. Its
        quantizers are initialized: weights with ``b = init_bits`` and
        power-of-two ``d = 2^floor(log2(max|W| / (2^(b-1) - 1)))``.

    Example:

    >>> import keras, numpy as np, tfdq
    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, name="conv"), keras.layers.ReLU(name="relu"),
    ...     keras.layers.Flatten(name="flat"), keras.layers.Dense(10, name="logits")])
    >>> x = np.random.default_rng(0).uniform(0, 1, (32, 8, 8, 1)).astype("float32")
    >>> qmodel = tfdq.quantize_model(model, calibration_data=x)
    >>> [type(layer).__name__ for layer in qmodel.layers[1:]]
    ['ActivationQuantizer', 'QConv2D', 'ActivationQuantizer', 'Flatten', 'QDense', 'ActivationQuantizer']
    >>> qmodel.get_layer("conv").kernel_quantizer.describe()  # max|W| = 0.22: d = 2^-5, 7 steps
    {'bits': 4.0, 'd': 0.03125, 'q_max': 0.21875}
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"tfdq.quantize_model takes a keras.Model, got {type(model).__name__}.")
    # Validate the request before any work (tfdq.validate).
    validate.refuse_mixed_precision(model, "quantize a model")
    validate.refuse_quantized(model)
    init_bits = validate.init_bits(init_bits)
    weight_bits = validate.bit_bounds("weight_bits", weight_bits)
    activation_bits = validate.bit_bounds("activation_bits", activation_bits)
    calibration_data = validate.calibration_inputs(model, calibration_data)
    if init not in ("float", "random"):
        raise ValueError(
            f"init={init!r}: use 'float' (from the model's weights) or 'random' (quantizer defaults)."
        )
    if activation_init is None:
        activation_init = "calibrate" if calibration_data is not None and init == "float" else "default"
    if activation_init not in ("calibrate", "default"):
        raise ValueError(
            f"activation_init={activation_init!r}: use 'calibrate' (from calibration_data) or "
            "'default' (d = 2^-3, b = init_bits, as the paper's reference code)."
        )
    if activation_init == "calibrate" and calibration_data is None and quantize_activations:
        raise ValueError(
            "activation_init='calibrate' needs calibration_data (a few hundred training inputs); "
            "pass it, or use activation_init='default'."
        )
    # Validate the parametrization names and bounds up front.
    w_cls, w_kwargs = _template(weight_quantizer, "weight", True, weight_bits, init_bits)
    w_cls(**w_kwargs)
    if quantize_activations:
        _template(activation_quantizer, "activation", False, activation_bits, init_bits)
    report = QuantizationReport(
        quantized_layers=[], activation_quantizers=[], float_layers=[], unknown_operations=[]
    )
    calibrate = activation_init == "calibrate" and quantize_activations and calibration_data is not None
    with _batchnorm_for_calibration(model, calibration_data if calibrate else None, report):
        quantized = _quantize_graph(
            model,
            dict(
                weight_quantizer=weight_quantizer,
                activation_quantizer=activation_quantizer,
                quantize_activations=quantize_activations,
                init_bits=float(init_bits),
                weight_bits=weight_bits,
                activation_bits=activation_bits,
                quantize_input=bool(quantize_input),
                quantize_output=bool(quantize_output),
                weights_from_kernels=init == "float",
                calibrate_activations=activation_init == "calibrate",
            ),
            calibration_data,
            report,
        )
    quantized = QuantizedModel(quantized.input, quantized.output, name=quantized.name)
    if report["float_layers"]:
        message = "These layers have weights but no tfdq quantized version and stay float: " + ", ".join(
            f"{r['name']} ({r['class']})" for r in report["float_layers"]
        )
        if strict:
            raise ValueError(message + ". Remove strict=True to keep them float.")
        warnings.warn(message, stacklevel=2)
    if target not in ("tflite", None):
        raise ValueError(f"target must be 'tflite' or None, got {target!r}.")
    report["export_problems"] = export_problems(quantized) if target == "tflite" else []
    if report["export_problems"]:
        message = (
            "tfdq.export.to_tflite cannot take these layers of the quantized model (found before "
            "training):\n" + format_problems(report["export_problems"])
        )
        if strict:
            raise ValueError(message + "\nFix them, or pass target=None to train for Keras only.")
        warnings.warn(
            message + "\n(strict=True refuses such a model; target=None skips this check.)", stacklevel=2
        )
    logger.info(
        "tfdq.quantize_model: %d quantized layers, %d activation quantizers, %d float layers",
        len(report["quantized_layers"]),
        len(report["activation_quantizers"]),
        len(report["float_layers"]),
    )
    return (quantized, report) if return_report else quantized


def export_problems(qmodel):
    """What :func:`tfdq.export.to_tflite` would refuse in a quantized model, before training.

    Runs the exporter's own planning (no conversion, no data) and returns one
    dict per node it cannot take: ``layer``, ``class``, ``problem``, ``fix``.
    Learned bitwidths above 8 are not among them (they depend on training).
    """
    from tfdq.export.plan import ExportError, Plan  # noqa: PLC0415 (export builds on this module)

    try:
        return list(Plan(qmodel, raise_errors=False).problems)
    except ExportError as e:
        return [
            {
                "layer": qmodel.name,
                "class": type(qmodel).__name__,
                "problem": str(e),
                "fix": "",
                "kind": "model",
            }
        ]


def format_problems(problems, limit=6):
    """One line per kind of export problem, naming the nodes: ``- Class: problem (a, b, ...). Fix: ...``."""
    groups = {}
    for p in problems:
        groups.setdefault((p["class"], p["problem"], p["fix"]), []).append(p["layer"])
    lines = []
    for (cls, problem, fix), names in groups.items():
        shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
        lines.append(f"- {cls}: {problem} ({shown})" + (f". Fix: {fix}" if fix else ""))
    return "\n".join(lines)


def _quantizable_outputs(model):
    """The outputs of ``model`` that get an uncounted output quantizer: float
    tensors made by a layer or op (not an input passed through) whose range
    TFLite does not fix (softmax and sigmoid outputs have a fixed int8 scale)."""
    found = []
    for t in model.outputs:
        layer, _ = producer(t)
        if layer is None or not str(getattr(t, "dtype", "float32")).startswith("float"):
            continue
        if isinstance(layer, qlayers.ActivationQuantizer):
            continue
        if registry.has_fixed_output_scale(layer):
            continue
        found.append(t)
    return found


def _ends_in_logistic_mul(layer, node):
    """True for a swish (``Activation``: LOGISTIC, then a MUL in the file) and for a ``Multiply``
    with a sigmoid factor (EfficientNet's squeeze-and-excite gate): their int8 MUL rounds ties
    to even (XNNPACK), and the factor from LOGISTIC has TFLite's fixed scale 1/256, which no
    per-tensor nudge can move (the MobileNetV3 gate's hard-sigmoid can: tfdq.export.build)."""
    if isinstance(layer, keras.layers.Activation):
        return registry.logistic_form(layer) == "logistic_mul"
    if not isinstance(layer, keras.layers.Multiply) or node is None:
        return False
    for t in node.input_tensors:
        src, _ = producer(t)
        while isinstance(src, qlayers.ActivationQuantizer):
            src, _ = producer(src.input)
        if isinstance(src, keras.layers.Activation) and registry.logistic_form(src) == "logistic":
            return True
    return False


def _split_fused_activations(model):
    """``model`` with every kernel layer's fused sigmoid / swish split off into an ``Activation``
    layer named ``<layer>_<activation>`` after a linear copy of the layer (same name, same
    weights). Every other layer is shared with ``model``; ``model`` itself when nothing splits.
    A layer whose output is a model output keeps its activation (and its name as the output's)."""
    outputs = {id(producer(t)[0]) for t in model.outputs}
    fused = [
        layer
        for layer, _ in model_nodes(model)
        if id(layer) not in outputs
        and registry.is_quantizable(layer)
        and not isinstance(layer, keras.Model)
        and registry.splits_fused_activation(layer)  # (the registry: sigmoid, swish)
    ]
    if not fused:
        return model
    linear = {}
    for layer in fused:
        config = layer.get_config()
        config["activation"] = "linear"
        copy = layer.__class__.from_config(config)
        linear[id(layer)] = (copy, layer, registry.activation_function_name(layer))

    def clone_function(layer):
        return linear[id(layer)][0] if id(layer) in linear else layer

    def call_function(layer, *args, **kwargs):
        out = layer(*args, **kwargs)
        for copy, orig, act in linear.values():
            if copy is layer:
                if not copy.get_weights() or len(copy.weights) != len(orig.weights):
                    raise ValueError(f"{orig.name}: could not split its {act} activation off.")
                copy.set_weights(orig.get_weights())
                return keras.layers.Activation(orig.activation, name=f"{orig.name}_{act}")(out)
        return out

    return keras.models.clone_model(model, clone_function=clone_function, call_function=call_function)


def _quantize_graph(model, options, calibration_data, report, input_signs=None, raw_inputs=None, top=True):
    """Clone one Functional graph (recursing into nested models).

    ``raw_inputs``: positions of ``model.inputs`` that carry the outermost
    model's input (all of them at the top level), left unquantized when
    ``options["quantize_input"]`` is False.
    """
    model = _split_fused_activations(_as_functional(model))
    nodes = model_nodes(model)
    graph_nodes = {}  # id(layer) -> its nodes in this graph (a loaded model has extra ones)
    for layer, node in nodes:
        graph_nodes.setdefault(id(layer), []).append(node)
    if raw_inputs is None:
        raw_inputs = range(len(model.inputs))
    raw = {id(model.inputs[i]) for i in raw_inputs}

    # 1. Where do activation quantizers go, and are they signed?
    targets = {}  # id(original tensor) -> original tensor
    internal = set()  # ids of targets that complete the grid (not counted as feature maps)
    output_ids = set()  # ids of the model outputs that get quantize_output's quantizer
    if options["quantize_activations"]:
        averages = []
        for layer, node in nodes:
            if registry.is_quantizable(layer):
                for t in node.input_tensors:
                    placed = _placement(t, averages)
                    if options["quantize_input"] or id(placed) not in raw:
                        targets[id(placed)] = placed
        # an average pooling's output that an operand grid needs (a pre-activation BatchNorm or a
        # Concatenate after DenseNet's transition pooling) gets a quantizer of its own: the file
        # rounds the average there once, as Keras does
        grid = [_placement(t, averages) for t in _grid_operands(nodes)]
        outputs = _quantizable_outputs(model) if top and options["quantize_output"] else []
        output_ids = {id(t) for t in outputs}
        for t in averages + grid + outputs:
            if id(t) not in targets and (options["quantize_input"] or id(t) not in raw):
                targets[id(t)] = t
                internal.add(id(t))
    target_list = list(targets.values())
    stats = {}
    if target_list and calibration_data is not None and input_signs is None:
        for t, s in zip(target_list, _calibration_stats(model, target_list, calibration_data)):
            stats[id(t)] = s
    if input_signs is None:
        input_signs = {}
        for t in model.inputs:
            if id(t) in stats:
                input_signs[id(t)] = stats[id(t)][1] >= 0.0
    sign_cache = {}
    signed = {k: not _is_nonneg(t, input_signs, sign_cache) for k, t in targets.items()}

    # 2. Clone, swapping layers and inserting quantizers.
    new_inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t.name) for t in model.inputs]
    new_to_orig_tensor = {id(n): o for n, o in zip(new_inputs, model.inputs)}
    new_to_orig_layer = {}
    quantized_cache = {}
    pairs = []

    def clone_function(layer):
        if isinstance(layer, keras.Model):
            inner_signs = None
            feeds = graph_nodes.get(id(layer), [None])[0]
            inner_raw = [
                i
                for i, t in enumerate(feeds.input_tensors if feeds is not None else ())
                if id(_placement(t)) in raw
            ]
            clone = _quantize_graph(layer, options, None, report, inner_signs, inner_raw, top=False)
        elif registry.is_quantizable(layer) and registry.lookup(layer).clone == "split":
            clone = _split_separable(layer, options, report)
        elif registry.is_quantizable(layer):
            config = layer.get_config()
            cls, kwargs = _template(
                options["weight_quantizer"], "weight", True, options["weight_bits"], options["init_bits"]
            )
            kwargs = dict(kwargs, name=f"{layer.name}_wq")
            config["kernel_quantizer"] = cls(**kwargs)
            clone = registry.lookup(layer).quantized.from_config(config)
            report["quantized_layers"].append({"name": layer.name, "class": type(layer).__name__})
        elif registry.is_operation(layer):
            clone = _clone_operation(layer, report)
        else:
            config = layer.get_config()
            if isinstance(layer, keras.layers.Activation) and layer.activation is not None:
                # the sigmoid on LOGISTIC's int8 grid, as the file computes it
                int8 = registry.int8_activation_name(layer)
                if int8 is not None:
                    config["activation"] = getattr(qlayers, int8)
            cls = layer.__class__
            if type(layer) is keras.layers.Activation and registry.activation_layer_name(layer):
                cls = getattr(qlayers, registry.activation_layer_name(layer))
            clone = cls.from_config(config)
            if registry.has_float_weights(layer):
                report["float_layers"].append({"name": layer.name, "class": type(layer).__name__})
        new_to_orig_layer[id(clone)] = layer
        pairs.append((layer, clone))
        return clone

    def quantized_input(new_tensor):
        orig = new_to_orig_tensor.get(id(new_tensor))
        if orig is None or id(orig) not in targets:
            return new_tensor
        if id(orig) not in quantized_cache:
            if not signed[id(orig)]:
                new_tensor = _relu_input(new_tensor)
            init_bits = options["init_bits"]
            if id(orig) in internal:  # not counted: start at full precision
                init_bits = float((options["activation_bits"] or (1, 8))[1])
            cls, kwargs = _template(
                options["activation_quantizer"],
                "activation",
                signed[id(orig)],
                options["activation_bits"],
                init_bits,
            )
            base = _compat.keras_history(orig).operation.name
            quantizer = cls(**kwargs, name=f"{base}_aq_q")
            if id(orig) in stats and options["calibrate_activations"]:
                max_abs, _ = stats[id(orig)]
                quantizer.initialize_from(np.array([max_abs]), bits=quantizer.init["bits"])
            # a signed map straight out of a sum: the file's ADD rounds its ties half up; so do the
            # QUANTIZE ops that bring a concatenation's operands onto one scale, and the average
            # pooling's DEPTHWISE_CONV_2D (its int32 bias nudges ties up, tfdq.export.build)
            layer, node = producer(orig)
            ties = "away"
            if (
                signed[id(orig)]
                and quantizer.FAMILY == "uniform"
                and (
                    registry.is_integer_sum(layer, node)
                    or registry.is_concatenation(layer)
                    or isinstance(layer, AVERAGING)
                )
            ):
                ties = "up"
            elif quantizer.FAMILY == "uniform" and _ends_in_logistic_mul(layer, node):
                ties = "even"  # an int8 MUL by a LOGISTIC output, which XNNPACK rounds to even
            aq = qlayers.ActivationQuantizer(
                quantizer=quantizer, name=f"{base}_aq", counted=id(orig) not in internal, ties=ties
            )
            out = aq(new_tensor)
            new_to_orig_tensor[id(out)] = orig
            quantized_cache[id(orig)] = out
            report["activation_quantizers"].append(
                {
                    "name": aq.name,
                    "signed": signed[id(orig)],
                    "calibrated": id(orig) in stats and options["calibrate_activations"],
                    "counted": id(orig) not in internal,
                    "output": id(orig) in output_ids,
                }
            )
        return quantized_cache[id(orig)]

    def call_function(layer, *args, **kwargs):
        flat_in = [t for t in tree.flatten((args, kwargs)) if isinstance(t, keras.KerasTensor)]
        orig_inputs = [id(new_to_orig_tensor.get(id(t))) for t in flat_in]
        args, kwargs = tree.map_structure(
            lambda t: quantized_input(t) if isinstance(t, keras.KerasTensor) else t,
            (args, kwargs),
        )
        outputs = layer(*args, **kwargs) if not isinstance(layer, _Split) else layer.call(*args, **kwargs)
        orig_layer = new_to_orig_layer[id(layer)]
        for node in graph_nodes.get(id(orig_layer), ()):
            if [id(t) for t in node.input_tensors] == orig_inputs:
                for o, n in zip(node.outputs, tree.flatten(outputs)):
                    new_to_orig_tensor[id(n)] = o
                break
        return outputs

    input_structure = tree.pack_sequence_as(model._inputs_struct, new_inputs)
    clone = keras.models.clone_model(
        model,
        input_tensors=input_structure,
        clone_function=clone_function,
        call_function=call_function,
    )

    if top and any(id(t) in targets for t in model.outputs):
        # outputs have no consumer in the graph: quantize them here
        new_outputs = [quantized_input(t) for t in clone.outputs]
        clone = keras.Model(
            clone.input, tree.pack_sequence_as(clone._outputs_struct, new_outputs), name=clone.name
        )

    # 3. Copy float weights, initialize weight quantizers.
    for orig, new in pairs:
        if isinstance(orig, keras.Model) or registry.is_operation(orig):
            continue  # copied by the recursive call; operations have no weights
        _check_finite(orig)
        if isinstance(new, _Split):
            new.copy_weights(orig)
        elif isinstance(new, qlayers.QuantizedWeightsMixin):
            kernel = new.float_kernel(orig)
            new.kernel.assign(kernel)
            if getattr(orig, "use_bias", False):
                new.bias.assign(orig.bias)
            if options["weights_from_kernels"]:
                new.kernel_quantizer.initialize_from(kernel.numpy(), bits=new.kernel_quantizer.init["bits"])
        elif orig.weights:
            new.set_weights(orig.get_weights())
    _calibrate_splits(
        model, [(o, n) for o, n in pairs if isinstance(n, _Split)], graph_nodes, calibration_data
    )
    return clone
