"""Memory accounting of a tfdq model (METHOD.md section 5, Table 2 of the paper).

Weight memory of a quantized layer is ``(kernel + bias elements) * b_w`` bits;
activation memory of a quantized feature map is ``elements per sample * b_x``
bits. Sizes are reported in kB of 1024 bytes. The bitwidths are the
quantizers' inferred (or learned) ``b``, so every size here is a
differentiable function of the quantizer parameters (straight-through for
the rounding) and can enter a training loss.
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from tfdq import layers as qlayers
from tfdq import registry

BITS_PER_KB = 8.0 * 1024.0
FLOAT_BITS = 32.0


@dataclasses.dataclass
class SizeEntry:
    """One counted tensor: a layer's weights or one quantized feature map."""

    name: str
    kind: str  # "weight" or "activation"
    count: int  # elements (per sample for activations)
    layer: object
    quantizer: object = None  # None: a float tensor, counted at 32 bits
    is_input: bool = False  # the quantizer on the model's input image

    def bits(self):
        """Bitwidth tensor (differentiable) or 32.0 for float tensors."""
        if self.quantizer is None:
            return tf.constant(FLOAT_BITS)
        return self.quantizer.forward_params()["bits"]

    def kb(self):
        return self.count * self.bits() / BITS_PER_KB


def _weight_count(layer):
    count = int(np.prod(layer.kernel.shape))
    if getattr(layer, "use_bias", False) and layer.bias is not None:
        count += int(np.prod(layer.bias.shape))
    return count


def _feature_count(layer):
    shape = layer.output.shape
    if any(s is None for s in shape[1:]):
        raise ValueError(
            f"Activation quantizer {layer.name!r} has output shape {shape}: "
            "activation sizes need a static input shape. Build the model "
            "with keras.Input(shape=(H, W, C)) instead of None dimensions."
        )
    return int(np.prod(shape[1:]))


def _is_model_input(layer):
    node = layer._inbound_nodes[0]
    source = node.input_tensors[0]._keras_history.operation
    return isinstance(source, keras.layers.InputLayer)


def size_entries(model):
    """All counted tensors of ``model``: weights first, then activations.

    Weights: every layer with a weight quantizer, and every other layer with
    a kernel (kept float: counted at 32 bits). BatchNormalization is not
    counted (it is folded into the kernel). Activations: every
    :class:`~tfdq.layers.ActivationQuantizer` but those with ``counted=False``
    (operands of a residual sum or concatenation, pooled maps: see
    :func:`tfdq.quantize_model`); ``is_input`` marks the one on the model's
    input image.
    """
    entries = []
    for layer in qlayers._walk(model):
        counted = registry.counts_kernel(layer)
        if counted == "quantized":
            entries.append(SizeEntry(layer.name, "weight", _weight_count(layer), layer, layer.kernel_quantizer))
        elif counted == "float":
            entries.append(SizeEntry(layer.name, "weight", _weight_count(layer), layer, None))
    for layer in qlayers.activation_quantizer_layers(model):
        if not getattr(layer, "counted", True):
            continue  # an operand of a sum/concatenation or a pooled map: not a feature map of its own
        entries.append(
            SizeEntry(
                layer.name,
                "activation",
                _feature_count(layer),
                layer,
                layer.quantizer,
                is_input=_is_model_input(layer),
            )
        )
    return entries


def weight_kb(model, entries=None):
    """Total weight memory (8a) in kB, differentiable."""
    entries = size_entries(model) if entries is None else entries
    terms = [e.kb() for e in entries if e.kind == "weight"]
    return tf.add_n(terms) if terms else tf.constant(0.0)


def activation_kb(model, reduce="sum", include_input=False, entries=None):
    """Activation memory in kB: ``"sum"`` (8b) or ``"max"`` (8c), differentiable.

    The quantizer on the model's input image is left out unless
    ``include_input`` (the paper counts only feature maps the network makes).
    """
    if reduce not in ("sum", "max"):
        raise ValueError(f"reduce must be 'sum' or 'max', got {reduce!r}.")
    entries = size_entries(model) if entries is None else entries
    terms = [e.kb() for e in entries if e.kind == "activation" and (include_input or not e.is_input)]
    if not terms:
        return tf.constant(0.0)
    stacked = tf.stack(terms)
    return tf.reduce_sum(stacked) if reduce == "sum" else tf.reduce_max(stacked)


def mean_weight_bits(entries):
    """Mean weight bitwidth, weighted by parameter count (float at 32)."""
    weights = [e for e in entries if e.kind == "weight"]
    total = sum(e.count for e in weights)
    if not total:
        return tf.constant(0.0)
    return tf.add_n([e.count * e.bits() for e in weights]) / float(total)


def size_logs(model, entries=None):
    """``weight_kb``, ``act_kb_sum``, ``act_kb_max``, ``mean_bits`` (tensors)."""
    entries = size_entries(model) if entries is None else entries
    logs = {"weight_kb": weight_kb(model, entries), "mean_bits": mean_weight_bits(entries)}
    if any(e.kind == "activation" for e in entries):
        logs["act_kb_sum"] = activation_kb(model, "sum", entries=entries)
        logs["act_kb_max"] = activation_kb(model, "max", entries=entries)
    return logs


def minimum_sizes(model, entries=None, include_input=False):
    """Smallest reachable sizes: every quantizer at its minimum bitwidth.

    Returns ``{"weight_kb", "activation_kb_sum", "activation_kb_max"}`` as
    Python floats (float tensors stay at 32 bits).
    """
    entries = size_entries(model) if entries is None else entries

    def low(e):
        bits = FLOAT_BITS if e.quantizer is None else e.quantizer.bounds["bits"][0]
        return e.count * bits / BITS_PER_KB

    w = [low(e) for e in entries if e.kind == "weight"]
    a = [low(e) for e in entries if e.kind == "activation" and (include_input or not e.is_input)]
    return {
        "weight_kb": float(sum(w)),
        "activation_kb_sum": float(sum(a)),
        "activation_kb_max": float(max(a)) if a else 0.0,
    }
