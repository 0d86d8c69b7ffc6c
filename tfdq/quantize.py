"""``quantize_model``: turn a float Keras model into a learned-quantization one.

The model is cloned with ``keras.models.clone_model``: supported layers
(``Conv2D``, ``DepthwiseConv2D``, ``Dense``) become their quantized versions
with a weight quantizer, and every feature map that feeds a quantized layer
passes an :class:`~tfdq.layers.ActivationQuantizer` (the input image
included). Float weights are copied and the quantizers are initialized as the
paper does (METHOD.md section 4).

An unsigned quantizer placed on the output of a plain ReLU takes the ReLU's
input instead (``Q(relu(x)) = Q(x)`` for a quantizer that clips at 0), so
the ReLU drops out of the quantized graph: one elementwise pass less per
feature map, forward and backward.

Placement of activation quantizers: a feature map that reaches a quantized
layer only through shape or pooling operations (Flatten, Dropout, pooling,
padding, ...) is quantized where it is produced, so that, as in the paper's
ResNet-20, the quantizer sits right after the ReLU and the identity shortcut
sees the quantized value too. A quantizer is unsigned when its input is
non-negative by construction (ReLU, ReLU6, a fused ``activation="relu"``,
sums and poolings of such) and signed otherwise.
"""

import logging
import warnings

import keras
import numpy as np
from keras import tree
from keras.src.models.functional import Functional  # the class of Functional models

from tfdq import layers as qlayers
from tfdq.graph import IDENTITY_AT_INFERENCE, model_nodes, producer
from tfdq import quantizers as quantizers_lib
from tfdq import validate
from tfdq.model import QuantizedModel

logger = logging.getLogger("tfdq")

PASS_THROUGH = IDENTITY_AT_INFERENCE + (
    keras.layers.Flatten,
    keras.layers.Reshape,
    keras.layers.Permute,
    keras.layers.ZeroPadding1D,
    keras.layers.ZeroPadding2D,
    keras.layers.ZeroPadding3D,
    keras.layers.Cropping1D,
    keras.layers.Cropping2D,
    keras.layers.Cropping3D,
    keras.layers.MaxPooling1D,
    keras.layers.MaxPooling2D,
    keras.layers.MaxPooling3D,
    keras.layers.AveragePooling1D,
    keras.layers.AveragePooling2D,
    keras.layers.AveragePooling3D,
    keras.layers.GlobalMaxPooling1D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.GlobalMaxPooling3D,
    keras.layers.GlobalAveragePooling1D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalAveragePooling3D,
)
# Merges whose output is non-negative when every input is.
NONNEG_MERGES = (
    keras.layers.Add,
    keras.layers.Concatenate,
    keras.layers.Maximum,
    keras.layers.Minimum,
    keras.layers.Average,
    keras.layers.Multiply,
)
NONNEG_ACTIVATIONS = {"relu", "relu6", "sigmoid", "hard_sigmoid", "softmax", "exponential", "softplus"}
# Layers with weights that are handled without a quantizer of their own
# (BatchNormalization is folded into the preceding kernel at export).
WEIGHTED_BUT_SUPPORTED = (keras.layers.BatchNormalization,)


class QuantizationReport(dict):
    """What ``quantize_model`` did: quantized layers, activation quantizers
    and the layers that stay float (``report["float_layers"]``)."""


def _activation_name(layer):
    act = getattr(layer, "activation", None)
    if act is None:
        return None
    return getattr(act, "__name__", str(act))


def _is_nonneg(tensor, input_signs, cache):
    """True when ``tensor`` is >= 0 by construction of the graph."""
    key = id(tensor)
    if key in cache:
        return cache[key]
    layer, node = producer(tensor)
    if layer is None:
        result = input_signs.get(id(tensor), False)
    elif isinstance(layer, keras.layers.ReLU):
        slope = float(getattr(layer, "negative_slope", 0.0) or 0.0)
        threshold = float(getattr(layer, "threshold", 0.0) or 0.0)
        result = slope == 0.0 and threshold >= 0.0
    elif isinstance(layer, keras.Model):
        position = [id(o) for o in node.outputs].index(id(tensor))
        inner_signs = {
            id(inner): _is_nonneg(outer, input_signs, cache)
            for inner, outer in zip(layer.inputs, node.input_tensors)
        }
        result = _is_nonneg(layer.outputs[position], inner_signs, {})
    elif isinstance(layer, PASS_THROUGH + NONNEG_MERGES):
        result = all(_is_nonneg(t, input_signs, cache) for t in node.input_tensors)
    else:
        result = _activation_name(layer) in NONNEG_ACTIVATIONS
    cache[key] = result
    return result


def _placement(tensor):
    """Walk up through pass-through layers to where the value is produced."""
    while True:
        layer, node = producer(tensor)
        if layer is None or not isinstance(layer, PASS_THROUGH):
            return tensor
        if len(node.input_tensors) != 1:
            return tensor
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
        raise ValueError(
            f"Model {model.name!r} is not built. Call it on data or build it "
            "before quantizing."
        )
    return model


def _is_plain_relu(layer):
    """``max(x, 0)`` exactly: ReLU() with default arguments or Activation("relu")."""
    if isinstance(layer, keras.layers.ReLU):
        cfg = layer.get_config()
        return cfg.get("max_value") is None and not cfg.get("negative_slope") and not cfg.get("threshold")
    if isinstance(layer, keras.layers.Activation):
        return getattr(layer.activation, "__name__", "") == "relu"
    return False


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
    return node.input_tensors[0]


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
            if isinstance(identifier, quantizers_lib.Pow2Quantizer):
                with_zero = config.get("with_zero")
                with_zero = role == "activation" if with_zero is None else with_zero
                need = 1 + int(signed) + int(with_zero)
            else:
                need = 2 if signed else 1
            config["min_bits"] = max(config["min_bits"], need)
            config["max_bits"] = max(config.get("max_bits") or need, config["min_bits"])
        return type(identifier), config
    if isinstance(identifier, str):
        cls = quantizers_lib.get(identifier, **kwargs).__class__
        return cls, kwargs
    raise TypeError(
        f"Quantizer must be a name such as 'U3' or a tfdq quantizer object, "
        f"got {identifier!r}."
    )


def _check_finite(layer):
    for w in layer.weights:
        value = np.asarray(w.numpy())
        if not np.all(np.isfinite(value)):
            raise ValueError(
                f"Layer {layer.name!r} has non-finite values (NaN or Inf) in "
                f"weight {w.name!r}; quantizers cannot be initialized from "
                "them. Fix or retrain the float model first."
            )


def _calibration_stats(model, tensors, data):
    """Per tensor: max |value| and min value over the calibration data."""
    probe = keras.Model(model.inputs, list(tensors))
    outs = probe.predict(data, verbose=0)
    if len(tensors) == 1:
        outs = [outs]
    return [(float(np.max(np.abs(o))), float(np.min(o))) for o in outs]


def quantize_model(
    model,
    weight_quantizer="U3",
    activation_quantizer="U3",
    quantize_activations=True,
    calibration_data=None,
    init_bits=4,
    weight_bits=None,
    activation_bits=None,
    strict=False,
    return_report=False,
):
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
            ``d = 2^-3``, ``b = 4``.
        init_bits: starting bitwidth b (METHOD.md section 4: 4).
        weight_bits, activation_bits: ``(min_bits, max_bits)`` bounds;
            defaults (2, 8) and (1, 8) as the reference code.
        strict: raise instead of leaving unsupported weighted layers float.
        return_report: also return a :class:`QuantizationReport`.

    Returns:
        The quantized model, a :class:`tfdq.model.QuantizedModel` (a
        Functional model; not compiled), and the report if asked. Its
        quantizers are initialized: weights with ``b = init_bits`` and
        power-of-two ``d = 2^floor(log2(max|W| / (2^(b-1) - 1)))``.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"tfdq.quantize_model takes a keras.Model, got {type(model).__name__}."
        )
    # Validate the request before any work (tfdq.validate).
    validate.refuse_mixed_precision(model, "quantize a model")
    validate.refuse_quantized(model)
    init_bits = validate.init_bits(init_bits)
    weight_bits = validate.bit_bounds("weight_bits", weight_bits)
    activation_bits = validate.bit_bounds("activation_bits", activation_bits)
    calibration_data = validate.calibration_inputs(model, calibration_data)
    # Validate the parametrization names and bounds up front.
    w_cls, w_kwargs = _template(weight_quantizer, "weight", True, weight_bits, init_bits)
    w_cls(**w_kwargs)
    if quantize_activations:
        _template(activation_quantizer, "activation", False, activation_bits, init_bits)
    report = QuantizationReport(quantized_layers=[], activation_quantizers=[], float_layers=[])
    quantized = _quantize_graph(
        model,
        dict(
            weight_quantizer=weight_quantizer,
            activation_quantizer=activation_quantizer,
            quantize_activations=quantize_activations,
            init_bits=float(init_bits),
            weight_bits=weight_bits,
            activation_bits=activation_bits,
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
    logger.info(
        "tfdq.quantize_model: %d quantized layers, %d activation quantizers, %d float layers",
        len(report["quantized_layers"]),
        len(report["activation_quantizers"]),
        len(report["float_layers"]),
    )
    return (quantized, report) if return_report else quantized


def _quantize_graph(model, options, calibration_data, report, input_signs=None):
    """Clone one Functional graph (recursing into nested models)."""
    model = _as_functional(model)
    nodes = model_nodes(model)
    graph_nodes = {}  # id(layer) -> its nodes in this graph (a loaded model has extra ones)
    for layer, node in nodes:
        graph_nodes.setdefault(id(layer), []).append(node)

    # 1. Where do activation quantizers go, and are they signed?
    targets = {}  # id(original tensor) -> original tensor
    if options["quantize_activations"]:
        for layer, node in nodes:
            if type(layer) in qlayers.QUANTIZED_LAYERS:
                for t in node.input_tensors:
                    placed = _placement(t)
                    targets[id(placed)] = placed
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
            clone = _quantize_graph(layer, options, None, report, inner_signs)
        elif type(layer) in qlayers.QUANTIZED_LAYERS:
            config = layer.get_config()
            cls, kwargs = _template(
                options["weight_quantizer"], "weight", True, options["weight_bits"], options["init_bits"]
            )
            kwargs = dict(kwargs, name=f"{layer.name}_wq")
            config["kernel_quantizer"] = cls(**kwargs)
            clone = qlayers.QUANTIZED_LAYERS[type(layer)].from_config(config)
            report["quantized_layers"].append({"name": layer.name, "class": type(layer).__name__})
        else:
            clone = layer.__class__.from_config(layer.get_config())
            if layer.weights and not isinstance(layer, WEIGHTED_BUT_SUPPORTED):
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
            cls, kwargs = _template(
                options["activation_quantizer"],
                "activation",
                signed[id(orig)],
                options["activation_bits"],
                options["init_bits"],
            )
            base = orig._keras_history.operation.name
            quantizer = cls(**kwargs, name=f"{base}_aq_q")
            if id(orig) in stats:
                max_abs, _ = stats[id(orig)]
                quantizer.initialize_from(np.array([max_abs]), bits=quantizer.init["bits"])
            aq = qlayers.ActivationQuantizer(quantizer=quantizer, name=f"{base}_aq")
            out = aq(new_tensor)
            new_to_orig_tensor[id(out)] = orig
            quantized_cache[id(orig)] = out
            report["activation_quantizers"].append(
                {"name": aq.name, "signed": signed[id(orig)], "calibrated": id(orig) in stats}
            )
        return quantized_cache[id(orig)]

    def call_function(layer, *args, **kwargs):
        flat_in = [t for t in tree.flatten((args, kwargs)) if isinstance(t, keras.KerasTensor)]
        orig_inputs = [id(new_to_orig_tensor.get(id(t))) for t in flat_in]
        args, kwargs = tree.map_structure(
            lambda t: quantized_input(t) if isinstance(t, keras.KerasTensor) else t,
            (args, kwargs),
        )
        outputs = layer(*args, **kwargs)
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

    # 3. Copy float weights, initialize weight quantizers.
    for orig, new in pairs:
        if isinstance(orig, keras.Model):
            continue  # copied by the recursive call
        _check_finite(orig)
        if isinstance(new, qlayers.QuantizedWeightsMixin):
            new.kernel.assign(orig.kernel)
            if orig.use_bias:
                new.bias.assign(orig.bias)
            new.kernel_quantizer.initialize_from(orig.kernel.numpy(), bits=new.kernel_quantizer.init["bits"])
        elif orig.weights:
            new.set_weights(orig.get_weights())
    return clone
