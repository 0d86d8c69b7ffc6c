"""Quantized Keras layers.

``QConv2D``, ``QDepthwiseConv2D`` and ``QDense`` are the Keras layers of the
same name whose kernel and bias pass through one weight quantizer (the bias
uses the kernel's parameters, as in the reference code) before the float
operation. ``ActivationQuantizer`` quantizes a feature map. Each holds its
quantizer as a sub-layer, so the quantizer parameters are weights of the
layer: they train, checkpoint and save with the model.

All layers are registered Keras serializables: a saved ``.keras`` model
loads with ``keras.models.load_model`` (safe mode on) after ``import tfdq``.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf
from keras import ops as kops

from tfdq import ops
from tfdq import quantizers as quantizers_lib

_PACKAGE = "tfdq"


def _make_quantizer(identifier, role, signed):
    if isinstance(identifier, quantizers_lib.Quantizer):
        return identifier
    if isinstance(identifier, dict):
        return keras.saving.deserialize_keras_object(identifier)
    return quantizers_lib.get(identifier, signed=signed, role=role)


class QuantizedWeightsMixin:
    """Shared part of the quantized layers: the weight quantizer.

    Its ``__init__`` is every quantized layer's constructor: the Keras
    layer's arguments plus ``kernel_quantizer`` (a name such as ``"U3"``, a
    quantizer object or its config), and it refuses ``channels_first``. A
    subclass writes only ``call``, with :meth:`quantized_weights`.
    """

    def __init__(
        self, *args: Any, kernel_quantizer: str | dict | quantizers_lib.Quantizer = "U3", **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._check_channels_last()
        self._init_quantizer(kernel_quantizer)

    def _init_quantizer(self, kernel_quantizer):
        self.kernel_quantizer = _make_quantizer(kernel_quantizer, "weight", True)

    def build(self, input_shape):
        super().build(input_shape)
        if not self.kernel_quantizer.built:
            self.kernel_quantizer.build(None)

    @staticmethod
    def float_kernel(layer):
        """The weight of the float Keras ``layer`` that this layer's quantized kernel replaces."""
        return layer.kernel

    def quantized_weights(self) -> tuple[Any, Any | None]:
        """``(Q(kernel), Q(bias) or None)`` with one set of quantizer parameters."""
        params = self.kernel_quantizer.forward_params()
        kernel = self.kernel_quantizer.quantize_tensor(self.kernel, params)
        bias = None
        if self.use_bias:
            bias = self.kernel_quantizer.quantize_tensor(self.bias, params)
        return kernel, bias

    def _finish(self, outputs, bias):
        if bias is not None:
            outputs = kops.add(outputs, bias)  # channels_last: broadcasts on the last axis
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def _check_channels_last(self):
        if getattr(self, "data_format", "channels_last") != "channels_last":
            raise ValueError(
                f"{type(self).__name__} supports data_format='channels_last' "
                f"only (layer {self.name!r} has {self.data_format!r})."
            )

    def get_config(self):
        config = super().get_config()
        config["kernel_quantizer"] = keras.saving.serialize_keras_object(self.kernel_quantizer)
        return config


@keras.saving.register_keras_serializable(_PACKAGE)
class QConv2D(QuantizedWeightsMixin, keras.layers.Conv2D):
    """``keras.layers.Conv2D`` with a learned weight quantizer.

    ``y = act(conv(x, Q(W)) + Q(bias))``. Args as ``Conv2D`` plus
    ``kernel_quantizer`` (name such as ``"U3"``, a quantizer object or its
    config; default ``"U3"``).
    """

    def call(self, inputs):
        kernel, bias = self.quantized_weights()
        return self._finish(self.convolution_op(inputs, kernel), bias)


@keras.saving.register_keras_serializable(_PACKAGE)
class QDepthwiseConv2D(QuantizedWeightsMixin, keras.layers.DepthwiseConv2D):
    """``keras.layers.DepthwiseConv2D`` with a learned weight quantizer."""

    def call(self, inputs):
        kernel, bias = self.quantized_weights()
        outputs = kops.depthwise_conv(
            inputs,
            kernel,
            strides=self.strides,
            padding=self.padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )
        return self._finish(outputs, bias)


@keras.saving.register_keras_serializable(_PACKAGE)
class QDense(QuantizedWeightsMixin, keras.layers.Dense):
    """``keras.layers.Dense`` with a learned weight quantizer."""

    def call(self, inputs, training=None):
        kernel, bias = self.quantized_weights()
        return self._finish(kops.matmul(inputs, kernel), bias)


@keras.saving.register_keras_serializable(_PACKAGE)
class QConv2DTranspose(QuantizedWeightsMixin, keras.layers.Conv2DTranspose):
    """``keras.layers.Conv2DTranspose`` with a learned weight quantizer.

    ``y = act(conv_transpose(x, Q(W)) + Q(bias))``; exported as TFLite's
    TRANSPOSE_CONV holding the learned integers.
    """

    def call(self, inputs):
        kernel, bias = self.quantized_weights()
        outputs = kops.conv_transpose(
            inputs,
            kernel,
            strides=list(self.strides),
            padding=self.padding,
            output_padding=self.output_padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )
        return self._finish(outputs, bias)


@keras.saving.register_keras_serializable(_PACKAGE)
class QPReLU(QuantizedWeightsMixin, keras.layers.PReLU):
    """``keras.layers.PReLU`` whose slopes ``alpha`` pass through a learned weight quantizer.

    ``y = relu(x) - Q(alpha) relu(-x)``: the slopes are integers times the
    quantizer's step, as a kernel's are, so the exported file holds them
    exactly. ``kernel`` is ``alpha`` (what the quantizer, the memory
    accounting and the exporter read).
    """

    use_bias = False
    activation = None

    @property
    def kernel(self):
        return self.alpha

    @staticmethod
    def float_kernel(layer):
        return layer.alpha

    def call(self, inputs):
        alpha, _ = self.quantized_weights()
        return kops.relu(inputs) - alpha * kops.relu(-inputs)


@keras.saving.register_keras_serializable(_PACKAGE)
class ActivationQuantizer(keras.layers.Layer):
    """Quantizes a feature map with a learned quantizer.

    ``signed=False`` (activations after ReLU/ReLU6) clips to ``[0, q_max]``;
    ``signed=True`` to ``[-q_max, q_max]``. ``quantizer`` is a name (default
    ``"U3"``), a quantizer object or its config. ``counted=False`` marks a
    quantizer that puts an operand of a sum or concatenation (or an average
    pooling's output) on a learned grid for the integer export: it is not a
    feature map of its own, so memory budgets and sizes leave it out.

    ``ties``: how values exactly half-way between two levels round.
    ``"away"`` (default): away from zero, the quantizer's own rule.
    ``"up"``: towards +inf, as LiteRT's XNNPACK ADD/SUB kernel requantizes
    a sum; ``quantize_model`` sets it on the signed quantizer that follows
    a sum or difference of feature maps, so that the integer file computes
    the same values (uniform quantizers only; forward only: the
    straight-through gradients are those of ``"away"``).
    ``"even"``: to the even level, as XNNPACK's MUL requantizes a product;
    ``quantize_model`` sets it on the quantizer after a swish (``x *
    sigmoid(x)``: one int8 MUL in the file, see :func:`int8_swish`).
    """

    def __init__(
        self,
        quantizer: str | dict | quantizers_lib.Quantizer = "U3",
        signed: bool = False,
        counted: bool = True,
        ties: str = "away",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.quantizer = _make_quantizer(quantizer, "activation", signed)
        self.counted = bool(counted)
        if ties not in ("away", "up", "even"):
            raise ValueError(
                f"ties={ties!r}: use 'away' (half away from zero), 'up' (half towards +inf) or "
                "'even' (half to the even level)."
            )
        if ties != "away" and self.quantizer.FAMILY != "uniform":
            raise ValueError(
                f"ties={ties!r} needs a uniform quantizer; {type(self.quantizer).__name__} has a "
                "power-of-two grid: use ties='away' or a U1/U2/U3 quantizer."
            )
        self.ties = ties

    @property
    def signed(self) -> bool:
        return self.quantizer.signed

    def build(self, input_shape):
        if not self.quantizer.built:
            self.quantizer.build(None)
        self.built = True

    def call(self, inputs):
        if self.ties == "away":
            return self.quantizer.quantize_tensor(inputs)
        params = self.quantizer.forward_params()
        q = self.quantizer.quantize_tensor(inputs, params)
        move = ops.negative_ties_up if self.ties == "up" else ops.ties_to_even
        return q + tf.stop_gradient(move(inputs, q, params["d"], params["q_max"]))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config["quantizer"] = keras.saving.serialize_keras_object(self.quantizer)
        if not self.counted:
            config["counted"] = False
        if self.ties != "away":
            config["ties"] = self.ties
        return config


def _uniform_activation_quantizer(layer):
    return isinstance(layer, ActivationQuantizer) and layer.quantizer.FAMILY == "uniform"


@keras.saving.register_keras_serializable(_PACKAGE)
class QHardSwish(keras.layers.Activation):
    """``Activation("hard_swish")`` that computes, between two learned quantizers, the levels of
    LiteRT's int8 HARD_SWISH.

    The integer file computes hard-swish as one HARD_SWISH op from the learned input grid (step
    ``d_in``) onto the learned output grid (``d_out``). That kernel works in 16-bit fixed point
    and puts a few values one step away from ``x relu6(x + 3) / 6`` rounded onto the output grid
    (0.02% of a trained MobileNetV3's stem; the difference grows downstream). Here the forward
    value is the kernel's: its output level for each input level, from a table of the 512
    possible input values that :func:`tfdq.ops.hard_swish_int8_table` computes from the two steps
    as the kernel does (one gather per element, :func:`tfdq.ops.hard_swish_int8_forward`). The
    gradient is the float hard-swish's, and the output quantizer sees the float function's
    rounding residual (clipped to 0.49 steps) around the kernel's level, so ``d_out`` learns as
    elsewhere.

    The two quantizers are found in the graph: the layer's only input must come from a uniform
    :class:`ActivationQuantizer` and its output go to one only. Otherwise (the layer used
    outside ``quantize_model``'s graph, or called on its own) it is the float hard-swish.
    ``quantize_model`` puts this layer where a model has ``Activation("hard_swish")`` (or
    ``"hard_silu"``). Exact for LiteRT's portable kernel (the one x86 runs; XNNPACK takes no int8
    HARD_SWISH); ARM's NEON code path was not checked.
    """

    def __init__(self, activation="hard_swish", **kwargs):
        super().__init__(activation, **kwargs)

    def learned_quantizers(self):
        """``(input ActivationQuantizer, output ActivationQuantizer)`` around this layer, or None."""
        nodes = getattr(self, "_inbound_nodes", [])
        outbound = getattr(self, "_outbound_nodes", [])
        if len(nodes) != 1 or len(outbound) != 1 or len(nodes[0].input_tensors) != 1:
            return None
        history = getattr(nodes[0].input_tensors[0], "_keras_history", None)
        source = None if history is None else history.operation
        target = outbound[0].operation
        if _uniform_activation_quantizer(source) and _uniform_activation_quantizer(target):
            return source, target
        return None

    def call(self, inputs):
        y = self.activation(inputs)
        found = self.learned_quantizers()
        if found is None or y.dtype != tf.float32:
            return y
        d_in = tf.stop_gradient(found[0].quantizer.forward_params()["d"])
        d_out = tf.stop_gradient(found[1].quantizer.forward_params()["d"])
        table = tf.cast(ops.hard_swish_int8_table(d_in, d_out), y.dtype)
        return ops.hard_swish_int8_forward(inputs, y, table, d_in, d_out)


@keras.saving.register_keras_serializable(_PACKAGE)
def int8_swish(x):
    """``x * sigmoid(x)`` with the sigmoid on TFLite's int8 LOGISTIC output grid.

    The integer file computes swish as LOGISTIC (its int8 output has the
    fixed scale 1/256, zero point -128: levels 0 to 255/256) and one MUL;
    ``quantize_model`` swaps the swish of an ``Activation`` layer for this
    function (and puts a learned quantizer on its input) so that Keras rounds
    the sigmoid where the file does. The rounding is straight-through: the
    gradient is swish's.
    """
    x = kops.convert_to_tensor(x)
    return x * int8_sigmoid(x)


@keras.saving.register_keras_serializable(_PACKAGE)
def int8_sigmoid(x):
    """``sigmoid(x)`` rounded onto TFLite's int8 LOGISTIC output grid (scale 1/256, levels 0 to 255).

    The rounding is computed from a float64 sigmoid, as the file's lookup table is (a float32
    sigmoid lands on a half level, 128.5 / 256 at x = 2^-7, and rounds the other way). The
    gradient is the sigmoid's (straight-through).
    """
    x = kops.convert_to_tensor(x)
    g = kops.sigmoid(x)
    g_q = kops.cast(
        kops.minimum(kops.round(kops.sigmoid(kops.cast(x, "float64")) * 256.0), 255.0) * (1.0 / 256.0),
        g.dtype,
    )
    # exact: g + (g_q - g) == g_q (Sterbenz; g_q = 0 gives -g + g)
    return g + kops.stop_gradient(g_q - g)


def weight_quantized_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """All layers of ``model`` (nested models included) with a weight quantizer."""
    return [l for l in _walk(model) if isinstance(l, QuantizedWeightsMixin)]


def activation_quantizer_layers(model: keras.Model) -> list[ActivationQuantizer]:
    """All :class:`ActivationQuantizer` layers of ``model``, nested ones included."""
    return [l for l in _walk(model) if isinstance(l, ActivationQuantizer)]


def _walk(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _walk(layer)
        else:
            yield layer
