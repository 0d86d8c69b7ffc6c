"""Memory accounting of a tfdq model (Table 2 of the paper).

Weight memory of a quantized layer is ``(kernel + bias elements) * b_w`` bits;
activation memory of a quantized feature map is ``elements per sample * b_x``
bits. Sizes are reported in kB of 1024 bytes. Every size here is a
differentiable function of the quantizer parameters (straight-through for
the rounding) and can enter a training loss.

Bits charged = bits stored. The bitwidth charged for a tensor is the one its
stored integers need, not the paper's ``ceil(log2(q_max/d + 1) + 1)`` of the
float ratio: a uniform grid stores the integers ``round(clip(x)/d)``, whose
largest magnitude is ``n = round(q_max/d)`` (for weights
``round(min(q_max, max|W|)/d)``: a range wider than the kernel stores no
larger integer), and ``n`` needs ``ceil(log2(n + 1)) + 1`` bits signed,
``ceil(log2(n + 1))`` unsigned, never fewer than the quantizer's minimum.
The paper's formula charges a 3rd bit for ``q_max = 1.4 d`` although only
``{-1, 0, 1}`` is ever stored. The gradient is the paper's (straight-through
on the float formula), so a constraint still pulls ``d`` up and ``q_max``
down. Power-of-two grids store exactly ``log2(q_max/q_min) + 1`` octaves and
are charged that.

A uniform quantizer with ``full_grid=True`` has its forward ``q_max`` snapped
to the full grid of its bitwidth, ``(2^(b-1) - 1) d``: it is charged ``b``,
the paper's formula, weights included (the grid's range, not the kernel's).

:class:`Sizes` computes every tensor's bits once (one ``forward_params`` per
quantizer); the budget's loss term, the logs and the gradient-clip bounds of
one training step all read the same :class:`Sizes`.
"""

import dataclasses
import weakref

import keras
import numpy as np
import tensorflow as tf

from tfdq import _compat, ops, registry
from tfdq import layers as qlayers

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

    def bits(self, params=None):
        """Charged bitwidth (the stored integers' width; differentiable), or
        32.0 for float tensors. ``params``: the quantizer's forward values
        if already computed."""
        if self.quantizer is None:
            return tf.constant(FLOAT_BITS)
        params = self.quantizer.forward_params() if params is None else params
        return stored_bits(self.quantizer, params, self.layer.kernel if self.kind == "weight" else None)

    def kb(self, params=None):
        return self.count * self.bits(params) / BITS_PER_KB


def stored_bits(quantizer, params, kernel=None):
    """Bits of the integers ``quantizer`` stores (module docstring): the value
    of the stored range, the straight-through gradient of ``params["bits"]``.

    ``kernel``: the weights it quantizes (their largest magnitude caps the
    range); None for activations.
    """
    bits = params["bits"]
    lo_bits = quantizer.bounds["bits"][0]
    if "d" in params:
        q_max, d = params["q_max"], params["d"]
        if kernel is not None and not getattr(quantizer, "full_grid", False):
            q_max = tf.minimum(q_max, tf.reduce_max(tf.abs(tf.cast(kernel, q_max.dtype))))
        # n = round(range / d) >= 0 needs floor(log2 n) + 1 magnitude bits,
        # read exactly from the float32 exponent of n (1 for n = 0)
        n = tf.maximum(ops.round_half_away(tf.cast(q_max / d, tf.float32)), 1.0)
        used = ops.exact_log2_int(n) + (2.0 if quantizer.signed else 1.0)
    else:
        used = ops.pow2_bits(params["q_min"], params["q_max"], quantizer.signed, quantizer.with_zero)
    used = tf.stop_gradient(tf.maximum(tf.cast(used, bits.dtype), lo_bits))
    return bits + tf.stop_gradient(used - bits)


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
    node = _compat.inbound_nodes(layer)[0]
    source = _compat.keras_history(node.input_tensors[0]).operation
    return isinstance(source, keras.layers.InputLayer)


_ENTRIES = weakref.WeakKeyDictionary()


def size_entries(model):
    """All counted tensors of ``model`` (cached per model: the walk over the
    layers runs once; see :func:`_size_entries`)."""
    try:
        cached = _ENTRIES.get(model)
    except TypeError:  # not weak-referenceable
        return _size_entries(model)
    if cached is None:
        cached = _size_entries(model)
        _ENTRIES[model] = cached
    return list(cached)


def _size_entries(model):
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
            entries.append(
                SizeEntry(layer.name, "weight", _weight_count(layer), layer, layer.kernel_quantizer)
            )
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


class Sizes:
    """Every counted tensor's charged bits, computed once.

    One ``forward_params`` per quantizer (``params[id(quantizer)]``, also the
    source of the gradient-clip bounds); the totals below all read the same
    tensors, so a training step builds the size graph once.
    """

    def __init__(self, model=None, entries=None):
        self.entries = size_entries(model) if entries is None else list(entries)
        self.params = {}
        self.bits = []
        self._totals = {}
        for e in self.entries:
            p = None
            if e.quantizer is not None:
                key = id(e.quantizer)
                if key not in self.params:
                    self.params[key] = e.quantizer.forward_params()
                p = self.params[key]
            self.bits.append(e.bits(p))
        self.kb = [e.count * b / BITS_PER_KB for e, b in zip(self.entries, self.bits)]

    def _total(self, key, select, reduce):
        if key not in self._totals:
            terms = [kb for e, kb in zip(self.entries, self.kb) if select(e)]
            if not terms:
                self._totals[key] = tf.constant(0.0)
            elif reduce == "sum":
                self._totals[key] = tf.add_n(terms)
            else:
                self._totals[key] = tf.reduce_max(tf.stack(terms))
        return self._totals[key]

    def weight_kb(self):
        """Total weight memory (8a) in kB."""
        return self._total("weight", lambda e: e.kind == "weight", "sum")

    def activation_kb(self, reduce="sum", include_input=False):
        """Activation memory in kB: ``"sum"`` (8b) or ``"max"`` (8c)."""
        if reduce not in ("sum", "max"):
            raise ValueError(f"reduce must be 'sum' or 'max', got {reduce!r}.")
        return self._total(
            ("activation", reduce, include_input),
            lambda e: e.kind == "activation" and (include_input or not e.is_input),
            reduce,
        )

    def mean_weight_bits(self):
        """Mean weight bitwidth, weighted by parameter count (float at 32)."""
        pairs = [(e.count, b) for e, b in zip(self.entries, self.bits) if e.kind == "weight"]
        total = sum(c for c, _ in pairs)
        if not total:
            return tf.constant(0.0)
        return tf.add_n([c * b for c, b in pairs]) / float(total)

    def logs(self):
        """``weight_kb``, ``act_kb_sum``, ``act_kb_max``, ``mean_bits`` (tensors)."""
        logs = {"weight_kb": self.weight_kb(), "mean_bits": self.mean_weight_bits()}
        if any(e.kind == "activation" for e in self.entries):
            logs["act_kb_sum"] = self.activation_kb("sum")
            logs["act_kb_max"] = self.activation_kb("max")
        return logs


def weight_kb(model, entries=None):
    """Total weight memory (8a) in kB, differentiable."""
    return Sizes(model, entries).weight_kb()


def activation_kb(model, reduce="sum", include_input=False, entries=None):
    """Activation memory in kB: ``"sum"`` (8b) or ``"max"`` (8c), differentiable.

    The quantizer on the model's input image is left out unless
    ``include_input`` (the paper counts only feature maps the network makes).
    """
    return Sizes(model, entries).activation_kb(reduce, include_input)


def mean_weight_bits(entries):
    """Mean weight bitwidth, weighted by parameter count (float at 32)."""
    return Sizes(entries=entries).mean_weight_bits()


def size_logs(model, entries=None):
    """``weight_kb``, ``act_kb_sum``, ``act_kb_max``, ``mean_bits`` (tensors)."""
    return Sizes(model, entries).logs()


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
