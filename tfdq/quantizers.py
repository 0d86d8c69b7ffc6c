"""Learned quantizers: U1, U2, U3 (uniform) and P1, P2, P3 (power of two).

A quantizer is a small Keras layer that owns two learned scalars (the
parametrization) and quantizes whatever tensor it is called on. Quantized
layers hold one for their kernel (and bias); :class:`tfdq.layers.ActivationQuantizer`
holds one for a feature map. Because the parameters are Keras weights they
train, checkpoint and save with the model.

=====  ==============  ==========================================================
name   learned         derived (signed; unsigned reads 2^b - 1 for 2^(b-1) - 1)
=====  ==============  ==========================================================
U1     b, d            q_max = (2^(b-1) - 1) d
U2     b, q_max        d = 2^round(log2(q_max / (2^(b-1) - 1)))
U3     d, q_max        b = ceil(log2(q_max/d + 1) + 1)
P1     b, q_max        q_min = q_max / 2^(2^(b-1) - 1)
P2     b, q_min        q_max = q_min 2^(2^(b-1) - 1)
P3     q_min, q_max    b = ceil(log2(log2(q_max/q_min) + 1) + 1)
=====  ==============  ==========================================================

Forward pass (hardware constraints, docs/method.md section 3): b is rounded to an
integer, d, q_min and q_max of the power-of-two quantizers, and d of the
uniform ones, are rounded to powers of two; every parameter is clipped into
its bounds. All of these are straight-through: the gradient reaches the float
variable unchanged. After every optimizer step Keras applies each variable's
``constraint``, which projects the float parameters back into their bounds
(``d <= q_max`` and the bit bounds included), so training needs no callback.

Reference: Uhlich et al., ICLR 2020, sections 2-3.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfdq import ops

_PACKAGE = "tfdq"

# Bounds of the reference code (docs/method.md section 3), by role.
DEFAULT_BOUNDS = {
    "weight": {
        "bits": (2.0, 8.0),
        "d": (2.0**-8, 1.0),
        "q_max": (2.0**-8, 127.0),
        "q_min": (2.0**-120, 2.0**7),
    },
    "activation": {
        "bits": (1.0, 8.0),
        "d": (2.0**-8, 1.0),
        "q_max": (2.0**-8, 255.0),
        "q_min": (2.0**-120, 2.0**8),
    },
}
DEFAULT_INIT_BITS = 4.0
DEFAULT_INIT_D = 2.0**-3  # docs/method.md section 4, random initialization

# The four quantities a parametrization learns or derives, in config order.
QUANTITIES = ("bits", "d", "q_max", "q_min")


def _levels(bits, signed):
    """Largest integer of a b-bit uniform grid (Python float)."""
    return 2.0 ** (bits - 1) - 1 if signed else 2.0**bits - 1


def min_bits(family: str | None, signed: bool, with_zero: bool = False) -> float:
    """Fewest bits a grid of ``family`` can have (docs/method.md section 8).

    Uniform: 2 signed (``{-d, 0, d}``), 1 unsigned (``{0, d}``). Power of
    two: one exponent bit, plus one for the sign and one for an exact zero
    (``1 + signed + with_zero``). Any other family: 1. This is the one place
    the rule is written; quantizers, templates and budgets read it here.
    """
    if family == "pow2":
        return 1.0 + ops.pow2_extra_bits(signed, with_zero)
    if family == "uniform" and signed:
        return 2.0
    return 1.0


def _grid_name(family, signed, with_zero):
    if family == "pow2":
        return f"A power-of-two quantizer with signed={signed}, with_zero={with_zero}"
    return f"A {'signed' if signed else 'unsigned'} {family or 'custom'} quantizer"


def _check_pair(name, lo, hi):
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo <= 0 or hi <= 0:
        raise ValueError(
            f"Bounds for {name} must be positive and finite, got [{lo}, {hi}]. "
            f"Pass min_{name}/max_{name} > 0."
        )
    if lo > hi:
        raise ValueError(f"min_{name}={lo} is larger than max_{name}={hi}. Swap them or widen the range.")


def _check_init(name, value):
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"init_{name} must be finite, got {value}.")
    if name == "bits" and not (1 <= value <= 32):
        raise ValueError(f"init_bits must lie in [1, 32], got {value}.")
    if name != "bits" and value <= 0:
        raise ValueError(
            f"init_{name} must be positive, got {value}: a step size or "
            "range of zero or less quantizes everything to nothing."
        )
    return value


@dataclasses.dataclass(frozen=True)
class QuantizerSpec:
    """What a quantizer is, checked once: sign, role, bounds, initial values, learned parameters.

    :meth:`create` builds it from the quantizer's constructor arguments and
    is the one place they are validated (each error says what to change);
    :meth:`config` gives them back as the keys of ``get_config``, so a
    config round trip rebuilds the same spec. Immutable: the Keras layer
    (:class:`Quantizer`) holds the variables and its current initial values,
    which :meth:`Quantizer.initialize_from` moves.

    Attributes:
        family: ``"uniform"``, ``"pow2"`` or None (the class's ``FAMILY``).
        signed, role: as passed (``role`` chose the default bounds).
        bounds: ``{"bits", "d", "q_max", "q_min"} -> (lo, hi)`` floats, the
            bit bounds raised to the grid's minimum (:func:`min_bits`) where
            ``min_bits`` was not given.
        init: ``{"bits", "d", "q_max", "q_min"} -> float or None``, as passed.
        learn: the names of the learned parameters.
        with_zero: power of two only: one code spent on an exact zero.
        round_step: uniform only: the forward step is a power of two.
        full_grid: uniform only: ``q_max`` snapped to the full grid of its
            bitwidth in the forward pass (:class:`UniformQuantizer`).
    """

    family: str | None
    signed: bool
    role: str
    bounds: Mapping[str, tuple[float, float]]
    init: Mapping[str, float | None]
    learn: tuple[str, ...]
    with_zero: bool = False
    round_step: bool = True
    full_grid: bool = False

    @classmethod
    def create(
        cls,
        quantizer_class: type[Quantizer],
        *,
        signed: bool = True,
        role: str = "weight",
        bounds: Mapping[str, tuple[float | None, float | None]] | None = None,
        init: Mapping[str, float | None] | None = None,
        learn: Iterable[str] | None = None,
        with_zero: bool | None = None,
        round_step: bool = True,
        full_grid: bool = False,
    ) -> QuantizerSpec:
        """Validate a quantizer's arguments and complete them with the defaults.

        ``bounds`` maps a quantity to ``(min, max)`` (None: the role's
        default); ``init`` a quantity to its initial value or None;
        ``with_zero=None`` means on for activations (power of two).
        """
        if role not in DEFAULT_BOUNDS:
            raise ValueError(f"Unknown quantizer role {role!r}: use 'weight' or 'activation'.")
        signed = bool(signed)
        family = quantizer_class.FAMILY
        with_zero = family == "pow2" and bool(role == "activation" if with_zero is None else with_zero)
        given = dict(bounds or {})
        full = {}
        for name in QUANTITIES:
            lo, hi = given.get(name, (None, None))
            default_lo, default_hi = DEFAULT_BOUNDS[role][name]
            full[name] = (default_lo if lo is None else float(lo), default_hi if hi is None else float(hi))
        lo_b, hi_b = full["bits"]
        if lo_b > hi_b:
            raise ValueError(f"min_bits={lo_b} is larger than max_bits={hi_b}: pass min_bits <= max_bits.")
        if not (1 <= lo_b and hi_b <= 32) or lo_b != int(lo_b) or hi_b != int(hi_b):
            raise ValueError(f"Bit bounds must be integers in [1, 32], got [{lo_b}, {hi_b}].")
        need = min_bits(family, signed, with_zero)
        if lo_b < need:
            if given.get("bits", (None, None))[0] is not None:
                hint = "".join(
                    f" or {a}=False" for a, on in (("signed", signed), ("with_zero", with_zero)) if on
                )
                raise ValueError(
                    f"{_grid_name(family, signed, with_zero)} needs at least {need:g} bits; "
                    f"got min_bits={lo_b}: use min_bits={need:g}{hint}."
                )
            full["bits"] = (need, max(hi_b, need))
        for name in ("d", "q_max", "q_min"):
            _check_pair(name, *full[name])
        params = quantizer_class.PARAMS
        learn = params if learn is None else tuple(learn)
        unknown = [p for p in learn if p not in params]
        if unknown:
            raise ValueError(f"{quantizer_class.__name__} learns {params}; cannot learn {unknown}.")
        init = dict(init or {})
        values = {
            name: None if init.get(name) is None else _check_init(name, init[name]) for name in QUANTITIES
        }
        if values["d"] is not None and values["q_max"] is not None and values["q_max"] < values["d"]:
            raise ValueError(
                f"init_q_max={values['q_max']} is smaller than init_d={values['d']}; the range must "
                "hold at least one step (q_max >= d)."
            )
        if full_grid and family != "uniform":
            raise ValueError(
                f"full_grid applies to uniform quantizers only ({quantizer_class.__name__} is {family}): "
                "a power-of-two grid is charged the octaves it spans already."
            )
        return cls(family, signed, role, full, values, learn, with_zero, bool(round_step), bool(full_grid))

    @property
    def min_bits(self) -> float:
        """The fewest bits this grid can have (:func:`min_bits`)."""
        return min_bits(self.family, self.signed, self.with_zero)

    def config(self, init: Mapping[str, float | None] | None = None) -> dict[str, Any]:
        """The spec as ``get_config`` keys (``init``: current initial values, default the spec's)."""
        config: dict[str, Any] = {"signed": self.signed, "role": self.role, "learn": list(self.learn)}
        for name, (lo, hi) in self.bounds.items():
            config[f"min_{name}"] = lo
            config[f"max_{name}"] = hi
        for name, value in (self.init if init is None else init).items():
            config[f"init_{name}"] = value
        if self.family == "uniform":
            config["round_step"] = self.round_step
            if self.full_grid:  # written only when on: configs from before the option stay as they were
                config["full_grid"] = True
        elif self.family == "pow2":
            config["with_zero"] = self.with_zero
        return config


_SHARED = threading.local()


@contextlib.contextmanager
def shared_forward_params() -> Iterator[None]:
    """Within this context every quantizer computes its forward parameters
    once per graph: the layer that quantizes with it, the memory sizes and
    the gradient-clip bounds of one training step read the same tensors
    (``QuantizedModel.train_step`` enters it). Outside, every
    ``forward_params`` call builds its own."""
    outer = getattr(_SHARED, "cache", None)
    _SHARED.cache = {} if outer is None else outer
    try:
        yield
    finally:
        _SHARED.cache = outer


def _shared(forward_params):
    @functools.wraps(forward_params)
    def wrapper(self):
        cache = getattr(_SHARED, "cache", None)
        if cache is None or tf.executing_eagerly():
            return forward_params(self)
        key = (id(self), id(tf.compat.v1.get_default_graph()))
        hit = cache.get(key)
        if hit is None or hit[0] is not self:
            hit = (self, forward_params(self))
            cache[key] = hit
        return hit[1]

    return wrapper


class Quantizer(keras.layers.Layer):
    """Base class: a Keras layer owning the two learned scalars of one parametrization.

    The arguments are validated once, into an immutable :class:`QuantizerSpec`
    (``self.spec``; ``signed``, ``role``, ``bounds`` and ``learn`` read it).
    The layer holds the variables, the forward pass, the projection into the
    bounds and (de)serialization. Subclasses set ``PARAMS`` (the two learned
    quantities, in order) and ``FAMILY``, and implement
    :meth:`forward_params` (the forward values, with STE), :meth:`project`,
    :meth:`quantize_tensor` and the initial values.

    Args:
        signed: ``True`` for weights and signed activations; ``False`` for
            activations that are non-negative (after ReLU/ReLU6).
        role: ``"weight"`` or ``"activation"``: selects the default bounds.
        min_bits, max_bits, min_d, max_d, min_q_max, max_q_max, min_q_min,
            max_q_min: override the default bounds.
        init_bits, init_d, init_q_max, init_q_min: initial values; any not
            given follows from the others (``init_bits`` defaults to 4 and
            ``init_d`` to 2^-3, docs/method.md section 4). :meth:`initialize_from`
            sets them from a tensor.
        learn: names of the parameters to learn (default: both of the
            parametrization). The others stay fixed, e.g. ``U2(learn=("q_max",),
            init_bits=2)`` is TQT and ``learn=()`` a fixed quantizer.
    """

    PARAMS: tuple[str, ...] = ()
    FAMILY: str | None = None
    # Keyword arguments of a family (UniformQuantizer, Pow2Quantizer) that the spec holds.
    _OPTIONS: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "forward_params" in cls.__dict__:
            cls.forward_params = _shared(cls.__dict__["forward_params"])

    def __init__(
        self,
        signed: bool = True,
        role: str = "weight",
        min_bits: float | None = None,
        max_bits: float | None = None,
        min_d: float | None = None,
        max_d: float | None = None,
        min_q_max: float | None = None,
        max_q_max: float | None = None,
        min_q_min: float | None = None,
        max_q_min: float | None = None,
        init_bits: float | None = None,
        init_d: float | None = None,
        init_q_max: float | None = None,
        init_q_min: float | None = None,
        learn: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        options = {name: kwargs.pop(name) for name in self._OPTIONS if name in kwargs}
        super().__init__(**kwargs)
        self.spec = QuantizerSpec.create(
            type(self),
            signed=signed,
            role=role,
            bounds={
                "bits": (min_bits, max_bits),
                "d": (min_d, max_d),
                "q_max": (min_q_max, max_q_max),
                "q_min": (min_q_min, max_q_min),
            },
            init={"bits": init_bits, "d": init_d, "q_max": init_q_max, "q_min": init_q_min},
            learn=learn,
            **options,
        )
        # Current initial values: initialize_from moves them; get_config saves them.
        self.init = dict(self.spec.init)
        self._param_vars = {}

    @property
    def signed(self) -> bool:
        return self.spec.signed

    @property
    def role(self) -> str:
        return self.spec.role

    @property
    def bounds(self) -> Mapping[str, tuple[float, float]]:
        """``{"bits", "d", "q_max", "q_min"} -> (lo, hi)``: the bounds in force."""
        return self.spec.bounds

    @property
    def learn(self) -> tuple[str, ...]:
        return self.spec.learn

    # -- initial values -------------------------------------------------

    def _initial_values(self):
        """Complete the initial values of every quantity from those given."""
        raise NotImplementedError

    def initialize_from(self, values: Any, bits: float = DEFAULT_INIT_BITS) -> None:
        """Set the initial parameters from the tensor they will quantize.

        docs/method.md section 4: ``b = bits``; uniform ``d = 2^floor(log2(max|W| /
        (2^(b-1) - 1)))`` and ``q_max = (2^(b-1) - 1) d`` so that the inferred
        bitwidth is ``b``; power of two ``q_max = 2^round(log2 max|W|)`` and
        ``q_min = q_max / 2^(2^(b-1) - 1)``. Works before and after ``build``.
        """
        max_abs = float(np.max(np.abs(np.asarray(values, dtype=np.float64))))
        if not np.isfinite(max_abs):
            raise ValueError(
                f"{self.name}: cannot initialize from non-finite values "
                "(NaN or Inf). Check the float model's weights or the "
                "calibration data."
            )
        self.init.update(self._values_for(max_abs, float(bits)))
        if self._param_vars:
            self._assign_initial()

    def _values_for(self, max_abs, bits):
        raise NotImplementedError

    def _assign_initial(self):
        values = self._initial_values()
        for name, var in self._param_vars.items():
            var.assign(values[name])

    # -- variables -------------------------------------------------------

    def build(self, input_shape: Any = None) -> None:
        values = self._initial_values()
        for name in self.PARAMS:
            self._param_vars[name] = self.add_weight(
                name=name,
                shape=(),
                initializer=keras.initializers.Constant(values[name]),
                trainable=name in self.learn,
                constraint=_Projection(self, name),
            )
        self.built = True

    def param(self, name: str) -> keras.Variable:
        """The float variable of a learned quantity (``"d"``, ``"q_max"``...)."""
        return self._param_vars[name]

    def project(self) -> dict[str, tf.Tensor]:
        """Projected values of all parameters: each clipped into its bounds.

        Returns a dict ``name -> tensor``. Joint bounds (``d <= q_max``, the
        bit bounds for inferred bitwidths) are applied here too, which makes
        the constraint of each variable consistent with its sibling.
        """
        raise NotImplementedError

    def forward_params(self) -> dict[str, tf.Tensor]:
        """Forward values ``{"bits", "d"/"q_min", "q_max"}``, differentiable."""
        raise NotImplementedError

    def quantize_tensor(self, x: Any, params: Mapping[str, tf.Tensor] | None = None) -> tf.Tensor:
        """Quantize ``x`` with this quantizer's current parameters."""
        raise NotImplementedError

    def _bits_forward(self, bits_var):
        """The learned bitwidth in the forward pass: clipped into its bounds, rounded (STE)."""
        return ops.ste_round(ops.ste_clip(bits_var, *self.bounds["bits"]))

    def call(self, inputs):
        return self.quantize_tensor(inputs)

    def compute_output_shape(self, input_shape):
        return input_shape

    def bits(self) -> float:
        """Current (integer) bitwidth as a Python float."""
        return float(self.forward_params()["bits"])

    def set_bits(self, bits: float, kernel: Any = None) -> None:
        """Move the parameters so that the stored grid has ``bits`` bits.

        Used to fix an allocation inside a memory budget
        (:func:`tfdq.constraints.enforce_budget`). Quantizers that learn
        ``b`` set it; U3 changes its step (keeping its range) and P3 its
        q_min (keeping q_max). ``kernel``: the weights this quantizer
        stores (their largest magnitude is the range in use). The caller
        checks the charged bits afterwards (bounds may stop the move).
        """
        if "bits" not in self._param_vars:
            raise NotImplementedError(f"{type(self).__name__} cannot set its bitwidth.")
        self._param_vars["bits"].assign(float(bits))

    def gradient_clip_bound(self, params: Mapping[str, tf.Tensor] | None = None) -> tf.Tensor:
        """``d`` (uniform) or ``q_min`` (power of two): the [-d, d] clip bound
        that constrained training uses for the gradients of these parameters
        (docs/method.md section 3)."""
        p = self.forward_params() if params is None else params
        return p["d"] if "d" in p else p["q_min"]

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(self.spec.config(self.init))
        return config

    def describe(self) -> dict[str, float]:
        """Current forward values as Python floats, for reports."""
        return {k: float(v) for k, v in self.forward_params().items()}


class _Projection:
    """Variable constraint: the quantizer's joint projection for one name.

    A NaN (which no bound can clip) is replaced by the parameter's initial
    value, so one poisoned update cannot keep the quantizer NaN for good
    (``QuantizedModel.fit`` skips non-finite steps before they get here;
    this covers custom loops). +-Inf is clipped to the bound like any value.
    """

    def __init__(self, quantizer, name):
        self.quantizer = quantizer
        self.name = name

    def __call__(self, value):
        projected = tf.cast(self.quantizer.project()[self.name], value.dtype)
        initial = tf.cast(self.quantizer._initial_values()[self.name], value.dtype)
        return tf.where(tf.math.is_nan(projected), initial, projected)


def _clip(v, bounds):
    return tf.clip_by_value(tf.convert_to_tensor(v, tf.float32), *bounds)


def _pow2_float(v):
    """Nearest power of two in the log domain, as a Python float."""
    return float(2.0 ** math.floor(0.5 + math.log2(v)))


# ---------------------------------------------------------------------------
# Uniform
# ---------------------------------------------------------------------------


class UniformQuantizer(Quantizer):
    """Uniform quantization ``Q(x) = d round(clip(x, -q_max, q_max) / d)``.

    Forward, with ``round`` half away from zero (unsigned: clip to
    ``[0, q_max]``)::

        Q(x) = d * round(clip(x, -q_max, q_max) / d)

    Backward (STE)::

        dQ/dx     = 1 if |x| <= q_max else 0
        dQ/dd     = (Q - x)/d inside, (Q - sign(x) q_max)/d outside
        dQ/dq_max = 0 inside, sign(x) outside

    and the parametrization's chain rule for b (see U1, U2). Outputs lie on
    ``{k d : |k| <= 2^(b-1) - 1}`` for the reported bitwidth b.

    ``full_grid=True`` (default off; docs/method.md section 8, "Bits charged
    = bits stored") snaps the forward range to the full grid of the
    bitwidth, ``q_max = (2^(b-1) - 1) d`` (unsigned ``(2^b - 1) d``), with
    the range's gradient passed straight through to the ``q_max`` variable;
    the budget then charges ``b`` (the paper's formula) and the grid stores
    every level it is charged for. Off, the range is the learned one and
    the budget charges the integer range actually used
    (:func:`tfdq.memory.stored_bits`). U1's range is the full grid either way.
    """

    FAMILY = "uniform"
    _OPTIONS = ("round_step", "full_grid")

    def __init__(self, *args: Any, round_step: bool = True, full_grid: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, round_step=round_step, full_grid=full_grid, **kwargs)

    @property
    def full_grid(self) -> bool:
        """Whether the forward ``q_max`` is snapped to the full grid of its bitwidth."""
        return self.spec.full_grid

    def _forward(self, bits, d, q_max):
        """The forward values; with ``full_grid``, ``q_max`` is ``n(b) d`` exactly
        in value and ``q_max`` in gradient (straight through)."""
        if self.full_grid:
            full = tf.stop_gradient(self._levels_tensor(bits) * d)
            q_max = full + (q_max - tf.stop_gradient(q_max))
        return {"bits": bits, "d": d, "q_max": q_max}

    @property
    def round_step(self) -> bool:
        """Whether the forward step is rounded to a power of two."""
        return self.spec.round_step

    def _step(self, d):
        """Forward step: a power of two (docs/method.md section 3) unless
        ``round_step=False`` (a float step, for studies such as the paper's
        Gaussian experiment; such a model cannot be exported exactly)."""
        return ops.ste_pow2(d) if self.round_step else d

    def _levels_tensor(self, bits):
        return ops.uniform_levels(bits, self.signed)

    def _values_for(self, max_abs, bits):
        n = _levels(bits, self.signed)
        lo, hi = self.bounds["d"]
        if max_abs > 0:
            d = 2.0 ** math.floor(math.log2(max_abs / n))
        else:
            d = DEFAULT_INIT_D
        d = min(max(d, lo), hi)
        return {"bits": bits, "d": d, "q_max": n * d}

    def _initial_values(self):
        init = dict(self.init)
        bits = init["bits"] if init["bits"] is not None else DEFAULT_INIT_BITS
        n = _levels(bits, self.signed)
        d, q_max = init["d"], init["q_max"]
        if d is None and q_max is None:
            d = DEFAULT_INIT_D
        if d is None:
            d = _pow2_float(q_max / n)
        if q_max is None:
            q_max = n * d
        if init["bits"] is None and init["q_max"] is not None:
            bits = float(
                ops.uniform_bits(tf.constant(d, tf.float32), tf.constant(q_max, tf.float32), self.signed)
            )
        return self._forward(bits, d, q_max)

    def _ratio_bounds(self):
        """Allowed q_max/d so that min_bits <= b(d, q_max) <= max_bits."""
        lo_b, hi_b = self.bounds["bits"]
        below = _levels(lo_b - 1, self.signed) if lo_b - 1 >= (1 if self.signed else 0) else 0.0
        lo = max(1.0, below + 0.5) if below > 0 else 1.0
        return lo, _levels(hi_b, self.signed)

    def quantize_tensor(self, x, params=None):
        params = params or self.forward_params()
        return ops.uniform_quantize(x, params["d"], params["q_max"], self.signed)


@keras.saving.register_keras_serializable(_PACKAGE)
class U1(UniformQuantizer):
    """Uniform quantizer learning bitwidth ``b`` and step ``d``.

    ``q_max = (2^(b-1) - 1) d``. Gradients: inside ``dQ/db = 0``,
    ``dQ/dd = (Q - x)/d``; outside ``dQ/db = 2^(b-1) ln2 d sign(x)``,
    ``dQ/dd = (2^(b-1) - 1) sign(x)``.
    """

    PARAMS = ("bits", "d")

    def forward_params(self):
        bits = self._bits_forward(self._param_vars["bits"])
        d = self._step(ops.ste_clip(self._param_vars["d"], *self.bounds["d"]))
        q_max = self._levels_tensor(bits) * d
        return self._forward(bits, d, q_max)

    def project(self):
        return {
            "bits": _clip(self._param_vars["bits"], self.bounds["bits"]),
            "d": _clip(self._param_vars["d"], self.bounds["d"]),
        }


@keras.saving.register_keras_serializable(_PACKAGE)
class U2(UniformQuantizer):
    """Uniform quantizer learning bitwidth ``b`` and range ``q_max``.

    ``d = 2^round(log2(q_max / (2^(b-1) - 1)))``; the forward range is
    ``min(q_max, (2^(b-1) - 1) d)`` so that the grid never needs more than b
    bits after d is rounded to a power of two. Gradients: inside
    ``dQ/db = -(2^(b-1) ln2 / (2^(b-1) - 1)) (Q - x)``,
    ``dQ/dq_max = (Q - x)/q_max``; outside ``dQ/db = 0``,
    ``dQ/dq_max = sign(x)``.
    """

    PARAMS = ("bits", "q_max")

    def forward_params(self):
        bits = self._bits_forward(self._param_vars["bits"])
        n = self._levels_tensor(bits)
        q_max = ops.ste_clip(self._param_vars["q_max"], *self.bounds["q_max"])
        d = self._step(ops.ste_clip(q_max / n, *self.bounds["d"]))
        q_max = ops.ste_clip(q_max, d, n * d)
        return self._forward(bits, d, q_max)

    def project(self):
        return {
            "bits": _clip(self._param_vars["bits"], self.bounds["bits"]),
            "q_max": _clip(self._param_vars["q_max"], self.bounds["q_max"]),
        }


@keras.saving.register_keras_serializable(_PACKAGE)
class U3(UniformQuantizer):
    """Uniform quantizer learning step ``d`` and range ``q_max`` (the paper's choice).

    ``b = ceil(log2(q_max/d + 1) + 1)`` (unsigned ``ceil(log2(q_max/d + 1))``)
    is inferred, never learned. Gradients: inside ``dQ/dd = (Q - x)/d``,
    ``dQ/dq_max = 0``; outside ``dQ/dd = (Q - sign(x) q_max)/d``,
    ``dQ/dq_max = sign(x)``: bounded and decoupled. Where a bit bound clips
    the range to ``q_max = n d``, the step gets ``(dQ/dd)/n + dQ/dq_max``
    (the chain rule divided by n, :func:`tfdq.ops.ratio_clip`), still
    bounded.
    """

    PARAMS = ("d", "q_max")

    def forward_params(self):
        d = self._step(ops.ste_clip(self._param_vars["d"], *self.bounds["d"]))
        q_max = ops.ste_clip(self._param_vars["q_max"], *self.bounds["q_max"])
        lo, hi = self._ratio_bounds()
        q_max, d = ops.ratio_clip(q_max, d, lo, hi)
        bits = ops.uniform_bits(d, q_max, self.signed, rtol=0.0 if self.round_step else 2.0**-20)
        return self._forward(bits, d, q_max)

    def project(self):
        d = _clip(self._param_vars["d"], self.bounds["d"])
        d_fwd = ops.pow2_round_magnitude(d) if self.round_step else d
        lo, hi = self._ratio_bounds()
        q_max = _clip(self._param_vars["q_max"], self.bounds["q_max"])
        # Only the lower ratio bound (d <= q_max) moves q_max. Above the bit
        # bound q_max is left alone: the forward pass caps it (ops.ratio_clip),
        # and clipping the variable would shrink the range for good each time
        # d drops an octave.
        q_max = tf.maximum(q_max, lo * d_fwd)
        del hi
        return {"d": d, "q_max": q_max}

    def set_bits(self, bits, kernel=None):
        """New step ``d`` so that the largest stored integer needs ``bits``
        bits: ``d = 2^ceil(log2(r / (2^(b-1) - 1)))`` for the range ``r`` in
        use (``min(q_max, max|W|)`` for weights), so ``r/d`` lies in
        ``((2^(b-1) - 1)/2, 2^(b-1) - 1]``; then ``q_max`` is capped at
        ``(2^(b-1) - 1) d``, so that no later weight can need more bits.
        (Unsigned: ``2^b - 1``.)"""
        p = self.forward_params()
        q_max, d = float(p["q_max"]), float(p["d"])
        top = q_max if kernel is None else min(q_max, float(np.max(np.abs(np.asarray(kernel)))))
        top = max(top, d)
        n = _levels(bits, self.signed)
        need = math.ceil(math.log2(math.floor(top / d + 0.5) + 1)) + (1 if self.signed else 0)
        if max(need, self.bounds["bits"][0]) != bits:
            d = top / n
            if self.round_step:
                d = 2.0 ** math.ceil(math.log2(d) - 1e-12)
            d = min(max(d, self.bounds["d"][0]), self.bounds["d"][1])
        self._param_vars["d"].assign(d)
        self._param_vars["q_max"].assign(max(min(q_max, n * d), d))


# ---------------------------------------------------------------------------
# Power of two
# ---------------------------------------------------------------------------


class Pow2Quantizer(Quantizer):
    """Power-of-two quantization (docs/method.md section 2).

    Forward::

        Q(x) = sign(x) q_min                      if |x| <= q_min
               sign(x) 2^floor(1/2 + log2|x|)     if q_min < |x| <= q_max
               sign(x) q_max                      if |x| > q_max

    ``q_max = 2^(2^(b-1) - 1) q_min``. Backward (STE):
    ``dQ/dx = 2^floor(1/2 + log2|x|)/|x|`` in the middle region, 0 elsewhere;
    ``dQ/dq_min = sign(x)`` where ``|x| <= q_min``; ``dQ/dq_max = sign(x)``
    where ``|x| > q_max``; and the parametrization's chain rule for b.

    ``with_zero`` (default: on for activations) spends one bit on an exact
    zero: ``|x| < q_min/sqrt(2)`` becomes 0, as in the reference code.
    """

    FAMILY = "pow2"
    _OPTIONS = ("with_zero",)

    def __init__(self, *args: Any, with_zero: bool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, with_zero=with_zero, **kwargs)

    @property
    def with_zero(self) -> bool:
        """Whether one code is spent on an exact zero (default: on for activations)."""
        return self.spec.with_zero

    @property
    def _extra(self):
        return ops.pow2_extra_bits(self.signed, self.with_zero)

    def _pow2_bounds(self, name):
        """The powers of two inside the bounds of ``name`` (``q_min`` or
        ``q_max``): ``[2^ceil(log2 lo), 2^floor(log2 hi)]``, so that the
        rounded forward values never leave the bounds (127 gives 64)."""
        lo, hi = self.bounds[name]
        return 2.0 ** math.ceil(math.log2(lo)), 2.0 ** math.floor(math.log2(hi))

    def _ratio_exponent(self, bits):
        """Python float ``log2(q_max/q_min)`` of a b-bit grid."""
        return 2.0 ** (bits - self._extra) - 1

    def _exponent_bounds(self):
        """Allowed ``log2(q_max/q_min)`` for min_bits <= b <= max_bits.

        Capped at 126: the q_min and q_max bounds never allow a larger ratio,
        and float32 cannot hold ``2^127`` times a q_min.
        """
        lo_b, hi_b = self.bounds["bits"]
        lo = 2.0 ** (lo_b - self._extra - 1) if lo_b - self._extra >= 1 else 0.0
        return min(lo, 126.0), min(self._ratio_exponent(hi_b), 126.0)

    def _values_for(self, max_abs, bits):
        q_max = _pow2_float(max_abs) if max_abs > 0 else 1.0
        lo, hi = self._pow2_bounds("q_max")
        q_max = min(max(q_max, lo), hi)
        return {"bits": bits, "q_max": q_max, "q_min": q_max / 2.0 ** self._ratio_exponent(bits)}

    def _initial_values(self):
        init = dict(self.init)
        bits = init["bits"] if init["bits"] is not None else DEFAULT_INIT_BITS
        m = self._ratio_exponent(bits)
        q_min, q_max = init["q_min"], init["q_max"]
        if q_min is None and q_max is None:
            q_max = 1.0
        if q_min is None:
            q_min = q_max / 2.0**m
        if q_max is None:
            q_max = q_min * 2.0**m
        if init["bits"] is None and init["q_min"] is not None and init["q_max"] is not None:
            ratio = math.log2(_pow2_float(q_max) / _pow2_float(q_min))
            bits = math.ceil(math.log2(ratio + 1)) + self._extra
        return {"bits": bits, "q_min": q_min, "q_max": q_max}

    def quantize_tensor(self, x, params=None):
        params = params or self.forward_params()
        return ops.pow2_quantize(x, params["q_min"], params["q_max"], self.signed, self.with_zero)


@keras.saving.register_keras_serializable(_PACKAGE)
class P1(Pow2Quantizer):
    """Power-of-two quantizer learning bitwidth ``b`` and range ``q_max``.

    ``q_min = q_max / 2^(2^(b-1) - 1)`` (clipped, straight through, to the
    lower q_min bound); by the chain rule
    ``dQ/dq_max = sign(x)`` outside and ``sign(x) q_min/q_max`` where
    ``|x| <= q_min``; ``dQ/db = -sign(x) q_min 2^(b-1) (ln 2)^2`` where
    ``|x| <= q_min``, 0 elsewhere.
    """

    PARAMS = ("bits", "q_max")

    def forward_params(self):
        bits = self._bits_forward(self._param_vars["bits"])
        q_max = ops.ste_pow2(ops.ste_clip(self._param_vars["q_max"], *self.bounds["q_max"]))
        q_max = ops.ste_clip(q_max, *self._pow2_bounds("q_max"))
        m = ops.pow2_ratio_exponent(bits, self.signed, self.with_zero)
        # q_max 2^-m, with 2^-m as 2^(1-m) / 2: exp2_int stops at 2^-126 and
        # m reaches 127 at 8 bits. Clipped (straight-through) to the lower
        # q_min bound so that q_min never underflows to a subnormal or zero.
        q_min = q_max * ops.exp2_int(1.0 - m) * 0.5
        q_min = ops.ste_clip(q_min, self._pow2_bounds("q_min")[0], q_max)
        return {"bits": bits, "q_min": q_min, "q_max": q_max}

    def project(self):
        return {
            "bits": _clip(self._param_vars["bits"], self.bounds["bits"]),
            "q_max": _clip(self._param_vars["q_max"], self.bounds["q_max"]),
        }


@keras.saving.register_keras_serializable(_PACKAGE)
class P2(Pow2Quantizer):
    """Power-of-two quantizer learning bitwidth ``b`` and ``q_min``.

    ``q_max = q_min 2^(2^(b-1) - 1)`` (clipped to the q_max bounds); by the
    chain rule ``dQ/dq_min = sign(x)`` where ``|x| <= q_min`` and
    ``sign(x) q_max/q_min`` outside; ``dQ/db = sign(x) q_max 2^(b-1) (ln 2)^2``
    outside, 0 elsewhere. Where the clip of q_max binds, the outside terms
    are 0 (q_max is then a constant).
    """

    PARAMS = ("bits", "q_min")

    def forward_params(self):
        bits = self._bits_forward(self._param_vars["bits"])
        q_min = ops.ste_pow2(ops.ste_clip(self._param_vars["q_min"], *self.bounds["q_min"]))
        m = ops.pow2_ratio_exponent(bits, self.signed, self.with_zero)
        lo, hi = self._pow2_bounds("q_max")
        # q_min inside [lo 2^-m, hi 2^-m] (straight through), so that the
        # derived q_max = q_min 2^m never leaves its bounds (the lower bound
        # kept when lo 2^-m underflows).
        lo_min, hi_min = self._pow2_bounds("q_min")
        floor = ops.exact_exp2(tf.stop_gradient(math.log2(lo) - m))
        ceiling = ops.exact_exp2(tf.stop_gradient(math.log2(hi) - m))
        q_min = ops.ste_clip(
            q_min, tf.maximum(floor, lo_min), tf.maximum(tf.minimum(ceiling, hi_min), lo_min)
        )
        # A plain (not straight-through) clip: where it binds, q_max does not
        # depend on q_min or b. Straight through, the 2^m of the chain rule
        # (2^127 at 8 bits) overflows the q_min and b gradients to inf, and
        # no projection of q_min or b would repair the derived q_max.
        raw = ops.times_exp2(q_min, m)
        # tf.where, not tf.minimum: at a tie tf.minimum still sends the
        # gradient through the 2^m factor, which overflows at 8 bits.
        q_max = tf.where(raw >= hi, tf.constant(hi, raw.dtype), raw)
        return {"bits": bits, "q_min": q_min, "q_max": q_max}

    def project(self):
        return {
            "bits": _clip(self._param_vars["bits"], self.bounds["bits"]),
            "q_min": _clip(self._param_vars["q_min"], self.bounds["q_min"]),
        }


@keras.saving.register_keras_serializable(_PACKAGE)
class P3(Pow2Quantizer):
    """Power-of-two quantizer learning ``q_min`` and ``q_max`` (the paper's choice).

    ``b = ceil(log2(log2(q_max/q_min) + 1) + 1)`` is inferred. Gradients:
    ``dQ/dq_min = sign(x)`` where ``|x| <= q_min``, ``dQ/dq_max = sign(x)``
    where ``|x| > q_max``, both 0 in the middle.
    """

    PARAMS = ("q_min", "q_max")

    def forward_params(self):
        q_min = ops.ste_pow2(ops.ste_clip(self._param_vars["q_min"], *self.bounds["q_min"]))
        q_max = ops.ste_pow2(ops.ste_clip(self._param_vars["q_max"], *self.bounds["q_max"]))
        q_max = ops.ste_clip(q_max, *self._pow2_bounds("q_max"))
        lo, hi = self._exponent_bounds()
        # The range wins (as in project()): q_min lies in
        # [q_max 2^-hi, q_max 2^-lo] (straight through), so the ratio bounds
        # never push q_max out of its own bounds.
        q_min = ops.ste_clip(q_min, q_max * 2.0**-hi, q_max * 2.0**-lo)
        q_max, q_min = ops.ratio_clip(q_max, q_min, 2.0**lo, 2.0**hi)
        bits = ops.pow2_bits(q_min, q_max, self.signed, self.with_zero)
        return {"bits": bits, "q_min": q_min, "q_max": q_max}

    def project(self):
        lo, hi = self._exponent_bounds()
        q_max = _clip(self._param_vars["q_max"], self.bounds["q_max"])
        q_min = _clip(self._param_vars["q_min"], self.bounds["q_min"])
        # At the bit bound the range wins: q_min may not drop to an octave
        # where 2^hi q_min would cut q_max's octave (the levels are octaves, so
        # a step of q_min below that halves the range at once); it is raised
        # back to q_max / 2^hi instead. q_max itself only moves for the lower
        # bound.
        floor = ops.pow2_round_magnitude(q_max) * 2.0**-hi
        q_min = tf.where(ops.pow2_round_magnitude(q_min) < floor, floor, q_min)
        q_min = _clip(q_min, self.bounds["q_min"])
        q_max = tf.maximum(q_max, ops.pow2_round_magnitude(q_min) * 2.0**lo)
        return {"q_min": q_min, "q_max": q_max}

    def set_bits(self, bits, kernel=None):
        """New ``q_min = q_max / 2^(2^(b - extra) - 1)`` (q_max kept), so the
        grid spans exactly the octaves of ``bits`` bits."""
        del kernel
        q_max = float(self.forward_params()["q_max"])
        q_min = q_max / 2.0 ** self._ratio_exponent(bits)
        self._param_vars["q_min"].assign(min(max(q_min, self.bounds["q_min"][0]), self.bounds["q_min"][1]))


PARAMETRIZATIONS = {"U1": U1, "U2": U2, "U3": U3, "P1": P1, "P2": P2, "P3": P3}


def get(identifier: str | dict | Quantizer, **kwargs: Any) -> Quantizer:
    """Resolve a quantizer from a name (``"U3"``), a config dict or an object.

    Names are case-insensitive; keyword arguments go to the constructor when
    a name is given (``get("U3", signed=False, role="activation")``).
    """
    if isinstance(identifier, Quantizer):
        return identifier
    if isinstance(identifier, dict):
        return keras.saving.deserialize_keras_object(identifier)
    if isinstance(identifier, str):
        key = identifier.upper()
        if key not in PARAMETRIZATIONS:
            raise ValueError(
                f"Unknown parametrization {identifier!r}. Choose one of "
                f"{sorted(PARAMETRIZATIONS)} (U3 and P3 are the paper's "
                "recommendation)."
            )
        return PARAMETRIZATIONS[key](**kwargs)
    raise TypeError(
        f"Cannot make a quantizer from {identifier!r}: pass a name such as "
        "'U3', a tfdq quantizer object or its config dict."
    )


def clip_gradients(
    grads_and_vars: Iterable[tuple[Any, Any]],
    quantizers: Iterable[Quantizer],
    params: Mapping[int, Mapping[str, tf.Tensor]] | None = None,
) -> list[tuple[Any, Any]]:
    """Clip the gradients of the quantizers' step/range parameters to [-d, d].

    docs/method.md section 3: while a memory constraint is active the reference
    training clips the gradients of d and q_max (q_min and q_max for power of
    two) to ``[-d, d]`` (``[-q_min, q_min]``). Other gradients pass unchanged.
    ``params``: ``{id(quantizer): forward values}`` already computed this
    step (:class:`tfdq.memory.Sizes`), so the bounds reuse them.
    Returns a new list of ``(grad, var)`` pairs.
    """
    params = params or {}
    bounds = {}
    for q in quantizers:
        bound = None
        for name, var in q._param_vars.items():
            if name == "bits" or not var.trainable:
                continue
            if bound is None:
                bound = tf.stop_gradient(q.gradient_clip_bound(params.get(id(q))))
            bounds[id(var)] = bound
    out = []
    for g, v in grads_and_vars:
        b = bounds.get(id(v))
        if g is not None and b is not None:
            g = tf.clip_by_value(g, -b, b)
        out.append((g, v))
    return out
