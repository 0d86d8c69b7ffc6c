"""Checks of user arguments shared by ``quantize_model`` and the export.

Each raises ``ValueError`` (or ``TypeError``) before any work, with a
message that says what is wrong and what to pass instead.
"""

import keras
import numpy as np
import tensorflow as tf

__all__ = ["bit_bounds", "calibration_inputs", "init_bits", "refuse_mixed_precision", "refuse_quantized"]


def refuse_mixed_precision(model, action):
    """tfdq's quantizers, bit counts and integer export compute in float32:
    refuse a float16/bfloat16 global policy or model layers."""
    policy = keras.mixed_precision.global_policy()
    layers = [
        layer.name
        for layer in getattr(model, "_flatten_layers", lambda **_: [])(include_self=False, recursive=True)
        if getattr(getattr(layer, "dtype_policy", None), "compute_dtype", "float32") not in ("float32", None)
    ]
    if policy.compute_dtype != "float32" or layers:
        where = (
            f"the global policy is {policy.name!r}"
            if policy.compute_dtype != "float32"
            else (
                "layers " + ", ".join(layers[:5]) + (" ..." if len(layers) > 5 else "") + " compute in "
                "reduced precision"
            )
        )
        raise ValueError(
            f"tfdq cannot {action} under mixed precision ({where}): its quantizers, bit counts and "
            "integer export compute in float32. Call "
            "keras.mixed_precision.set_global_policy('float32') before building and quantizing the "
            "model (a float model trained in mixed_float16 can be rebuilt in float32 and given its "
            "weights with set_weights)."
        )


def refuse_quantized(model):
    """Refuse a model that already holds tfdq quantizers."""
    from tfdq import layers as qlayers  # noqa: PLC0415

    if qlayers.weight_quantized_layers(model) or qlayers.activation_quantizer_layers(model):
        raise ValueError(
            f"Model {model.name!r} is already quantized by tfdq (it holds tfdq quantizers). Train, "
            "constrain (tfdq.constrain) or export it as it is, or quantize the float model it was "
            "made from."
        )


def init_bits(bits):
    """The starting bitwidth: 2 to 32 (a signed 1-bit grid holds only 0)."""
    try:
        value = float(bits)
    except (TypeError, ValueError):
        raise TypeError(f"init_bits must be a number of bits, got {bits!r}.") from None
    if not (np.isfinite(value) and value == int(value) and 2 <= value <= 32):
        raise ValueError(
            f"init_bits={bits!r}: use an integer from 2 to 32 (the paper starts at 4; a signed "
            "weight grid needs at least 2 bits: -1, 0, 1)."
        )
    return value


def bit_bounds(name, bounds):
    """``(min_bits, max_bits)`` as integers with ``1 <= min_bits <= max_bits <= 32``."""
    if bounds is None:
        return None
    try:
        lo, hi = bounds
        lo_f, hi_f = float(lo), float(hi)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (min_bits, max_bits), got {bounds!r}.") from None
    if not (lo_f == int(lo_f) and hi_f == int(hi_f) and 1 <= lo_f <= hi_f <= 32):
        raise ValueError(
            f"{name}={tuple(bounds)!r}: give integers in [1, 32] with min_bits <= max_bits, e.g. "
            f"{(2, 8) if name.startswith('weight') else (1, 8)} (signed weights use at least 2 bits)."
        )
    return bounds


def _num_examples(array):
    shape = np.shape(array)
    return shape[0] if shape else 0


def calibration_inputs(model, data, argument="calibration_data"):
    """``data`` as the model's inputs: an array (one input) or a list of
    arrays (several inputs, given as a list or a tuple), or a
    ``tf.data.Dataset``. An ``(x, y)`` tuple gives its ``x``. Empty data is
    refused. None passes."""
    if data is None:
        return None
    n_inputs = len(getattr(model, "inputs", None) or [None])
    if isinstance(data, tf.data.Dataset):
        if next(iter(data.take(1)), None) is None:
            raise ValueError(f"{argument} is an empty dataset: give at least one batch of inputs.")
        return data
    if isinstance(data, dict):
        return data
    if isinstance(data, (list, tuple)):
        items = list(data)
        if n_inputs > 1:
            if len(items) in (2, 3) and isinstance(items[0], (list, tuple)):
                data = [np.asarray(a) for a in items[0]]  # (x, y): the inputs
            elif len(items) == n_inputs:
                data = [np.asarray(a) for a in items]
            else:
                raise ValueError(
                    f"{argument}: the model has {n_inputs} inputs; pass a list or tuple of "
                    f"{n_inputs} arrays (one per input), got {len(items)} items."
                )
        elif isinstance(data, tuple) and len(items) in (2, 3) and np.ndim(items[0]) > 1:
            data = np.asarray(items[0])  # (x, y): the inputs
        else:
            data = np.asarray(items)
    elif n_inputs == 1:
        data = np.asarray(data)
    first = data[0] if isinstance(data, list) else data
    if _num_examples(first) == 0:
        raise ValueError(
            f"{argument} holds no examples (shape {np.shape(first)}): give at least one input "
            "example (a few hundred training inputs are best), or None."
        )
    return data
