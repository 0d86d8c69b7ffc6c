"""Pure quantizer math: forward formulas and straight-through gradients.

Everything here is a function of tensors; nothing owns a variable. The
quantizer objects in :mod:`tfdq.quantizers` derive their step size ``d``,
range ``q_max`` (or ``q_min``) and bitwidth ``b`` from their learned
parameters with the helpers below and then call :func:`uniform_quantize` or
:func:`pow2_quantize`.

Notation follows Uhlich et al., "Mixed Precision DNNs: All you need is a good
parametrization", ICLR 2020 (sections 2-3 of the paper, sections 1-3 of
docs/method.md).
"""

import math

import numpy as np
import tensorflow as tf

from tfdq import config, kernels

LN2 = math.log(2.0)

# The largest float32 below 1/2. ``floor(a + _BELOW_HALF)`` is round-half-up
# of ``a >= 0``, exact for every float32 (see round_half_away).
_BELOW_HALF = float(np.float32(0.5) - np.float32(2.0**-25))

# Elementwise quantizer passes (forward, and backward with its reductions)
# run fused: the uniform quantizer on float32 CPU tensors through tfdq's own
# multi-threaded kernel (tfdq.kernels, compiled on first use; one pass
# forward, one backward), everything else as XLA-compiled functions, each
# one fused loop instead of a dozen TensorFlow kernels. TFDQ_FUSED=0 runs the
# same formulas as plain TensorFlow ops (identical values; the parameter
# gradients may differ in summation order); TFDQ_CUSTOM_KERNELS=0 keeps XLA.
# Both are read through tfdq.config when a step is traced
# (``with tfdq.config.settings(fused=False): ...`` scopes them).


def _kernel(fn):
    """``fn`` as one XLA-compiled function (a fused loop); plain ops where ``fused`` is off.

    The choice is made when a model's step is traced (``tfdq.config``), so
    ``with tfdq.config.settings(fused=False)`` around the first call of a
    model gives plain ops for that model (benchmarks compare both).
    """
    fused = tf.function(fn, jit_compile=True, autograph=False, reduce_retracing=True)

    def call(*args):
        return (fused if config.get("fused") else fn)(*args)

    call.__name__ = fn.__name__
    call.__doc__ = fn.__doc__
    return call


# Float32 bit layout: 1 sign bit, 8 exponent bits, 23 mantissa bits.
_EXPONENT_MASK = 0x7F800000
_MANTISSA_MASK = 0x007FFFFF
_ONE_EXPONENT = 1 << 23
# Mantissa bits of the largest float32 below sqrt(2): a mantissa above it
# rounds up in the log domain (log2(m) >= 1/2).
_SQRT2_MANTISSA = 0x3504F3


def round_half_away(x):
    """Round to the nearest integer, ties away from zero.

    ``sign(x) * floor(|x| + 1/2)``, as docs/method.md writes the quantizer
    (``tf.round`` rounds ties to even, which this is not).

    ``|x| + 1/2`` is not exact in float32 (0.49999997 + 0.5 rounds to 1.0,
    2^23 + 1 + 0.5 to 2^23 + 2). For float32 this adds ``h = 1/2 - 2^-25``
    instead: a fraction below 1/2 is at least one ulp of ``|x|`` below it,
    and the sum's ulp is at most twice that, so it never rounds up to the
    next integer; a fraction of 1/2 or more gives a sum within ``2^-25`` of
    it, which rounds up to it (ties to even included: 1 - 2^-25 -> 1.0).
    Other float types use ``|x| - floor(|x|) >= 1/2``, exact as well; so do
    NumPy arrays and Python numbers (the export's float64 planning), which
    come back as NumPy float64.
    """
    if not tf.is_tensor(x):
        a = np.abs(np.asarray(x, np.float64))
        whole = np.floor(a)
        return np.sign(x) * (whole + (a - whole >= 0.5))
    a = tf.abs(x)
    if x.dtype == tf.float32:
        return tf.sign(x) * tf.floor(a + _BELOW_HALF)
    whole = tf.floor(a)
    up = tf.cast(a - whole >= 0.5, x.dtype)
    return tf.sign(x) * (whole + up)


def _round_nonneg(a):
    """:func:`round_half_away` of ``a >= 0`` (no sign to restore)."""
    if a.dtype == tf.float32:
        return tf.floor(a + _BELOW_HALF)
    return round_half_away(a)


@tf.custom_gradient
def ste_round(x):
    """``round_half_away(x)`` forward; identity gradient (straight-through)."""
    return round_half_away(x), lambda dy: dy


@tf.custom_gradient
def ste_ceil(x):
    """``ceil(x)`` forward; identity gradient (straight-through)."""
    return tf.math.ceil(x), lambda dy: dy


def ste_clip(x, lo, hi):
    """``clip(x, lo, hi)`` forward; identity gradient to ``x`` only.

    Used for the parameter bounds of docs/method.md section 3: the forward pass
    always sees a valid parameter and the gradient still reaches the float
    variable (which the optimizer step then projects back into its box).
    The forward value is exactly the clipped value (``x + (clipped - x)``
    is not: it loses ``clipped`` when ``|x|`` is large, and is NaN for an
    infinite ``x``).
    """
    x = tf.convert_to_tensor(x)
    lo = tf.stop_gradient(tf.cast(lo, x.dtype))
    hi = tf.stop_gradient(tf.cast(hi, x.dtype))
    return _ste_clip(x, lo, hi)


@tf.custom_gradient
def _ste_clip(x, lo, hi):
    clipped = tf.minimum(tf.maximum(x, lo), hi)
    return clipped, lambda dy: (dy, tf.zeros_like(lo), tf.zeros_like(hi))


def ratio_clip(q, s, lo, hi):
    """Keep ``lo <= q/s <= hi`` (the bit bounds of U3 and P3), differentiably.

    Returns ``(q', s')``: ``q' = clip(q, lo s, hi s)`` and ``s' = s``; use
    ``s'`` (not ``s``) for everything the step feeds downstream, so that its
    gradient is normalised where a bound binds.

    Where no bound binds, the gradients pass unchanged. Where ``q/s`` is
    clipped to ``f = hi`` (or ``lo``), the range is ``q' = f s``: it moves
    with the step, so the step must see the range's gradient (a plain clip
    hides it, and a task that wants a finer step, as the MSE gradient of
    ``d`` always does, then drags the range down an octave at a time). The
    chain rule would hand the step ``g_s + f g_q`` (``f = 127`` for 8-bit U3,
    ``2^126`` for 8-bit P3, which overflows float32); the step gets that
    divided by ``f`` instead::

        dL/ds = g_s / f + g_q        (g_s: the step's own gradient through s',
                                      g_q: the gradient of q')

    the chain rule's direction and fixed point, at a size bounded
    independently of the bitwidth: for U3, with ``|dQ/dd| <= 1/2`` and
    ``|dQ/dq_max| <= 1`` per element, ``|dL/dd| <= 1/(2f) + 1`` per element
    (the paper's argument for U3). The range variable ``q`` receives ``g_q``
    straight through in either case. A unit factor (``g_s + g_q``, also
    bounded) has another fixed point: it ended the Gaussian experiment's U3
    at MSE 0.020 against 0.0126 (benchmarks.gaussian).
    """
    q = tf.convert_to_tensor(q)
    s = tf.cast(s, q.dtype)
    return _ratio_clip(q, s, tf.constant(lo, q.dtype), tf.constant(hi, q.dtype))


@tf.custom_gradient
def _ratio_clip(q, s, lo, hi):
    low, high = lo * s, hi * s
    out = tf.minimum(tf.maximum(q, low), high)
    at_high = q >= high
    bound = tf.logical_or(at_high, q <= low)
    factor = tf.where(at_high, hi, tf.where(bound, lo, tf.ones_like(hi)))

    def grad(dy_q, dy_s):
        # an output the loss does not use may come back as None
        dy_q = tf.zeros_like(q) if dy_q is None else dy_q
        dy_s = tf.zeros_like(s) if dy_s is None else dy_s
        g_s = dy_s / factor + tf.where(bound, dy_q, tf.zeros_like(dy_q))
        return dy_q, g_s, tf.zeros_like(lo), tf.zeros_like(hi)

    return (out, tf.identity(s)), grad


def exact_exp2(n):
    """``2**n`` for integer-valued float32 ``n``, exact, built from the bits.

    ``tf.pow(2., n)`` may go through ``exp(n log 2)`` and miss by an ulp;
    quantization grids must be exact powers of two. ``n`` is clamped to the
    normal float32 exponent range [-126, 127].
    """
    n = tf.clip_by_value(tf.cast(n, tf.int32), -126, 127)
    return tf.bitcast((n + 127) * _ONE_EXPONENT, tf.float32)


@tf.custom_gradient
def exp2_int(n):
    """``2**n`` (exact for integer ``n``) with gradient ``2**n ln 2``."""
    y = exact_exp2(n)
    return y, lambda dy: dy * y * LN2


def _finite(g):
    return tf.clip_by_value(g, -g.dtype.max, g.dtype.max)


@tf.custom_gradient
def times_exp2(v, n):
    """``v * 2**n`` for integer-valued ``n``, with gradients kept finite.

    ``d/dv = 2^n`` and ``d/dn = v 2^n ln 2``, saturated at the largest float
    instead of overflowing to inf (P2's ``q_max = q_min 2^(2^(b-1) - 1)``
    has ``2^127`` in its chain rule at 8 bits).
    """
    p = exact_exp2(n)
    # (dy v) p: zero where dy is, even where v 2^n overflowed (the caller clipped it)
    return v * p, lambda dy: (_finite(dy * p), _finite(dy * v * p * LN2))


def exact_log2_int(v):
    """``log2(v)`` for ``v`` an exact positive power of two, as float32."""
    bits = tf.bitcast(tf.cast(v, tf.float32), tf.int32)
    return tf.cast(tf.bitwise.right_shift(bits, 23) - 127, tf.float32)


def pow2_round_magnitude(a):
    """``2**floor(1/2 + log2(a))`` for ``a > 0``, exact, elementwise.

    Rounding in the log domain: a value whose mantissa ``m`` (in [1, 2))
    exceeds sqrt(2) goes up one octave. Computed on the float32 bits, so it
    matches a float64 ``np.floor(0.5 + np.log2(a))`` reference exactly.
    Zero maps to zero.
    """
    bits = tf.bitcast(tf.cast(a, tf.float32), tf.int32)
    exponent = tf.bitwise.bitwise_and(bits, _EXPONENT_MASK)
    mantissa = tf.bitwise.bitwise_and(bits, _MANTISSA_MASK)
    up = tf.cast(mantissa > _SQRT2_MANTISSA, tf.int32) * _ONE_EXPONENT
    return tf.bitcast(exponent + up, tf.float32)


@tf.custom_gradient
def ste_pow2(v):
    """Round a positive parameter to a power of two: ``2**round(log2 v)``.

    Forward is the hardware constraint of docs/method.md section 3; the backward
    pass hands the gradient to the float parameter unchanged (STE).
    """
    return pow2_round_magnitude(v), lambda dy: dy


# ---------------------------------------------------------------------------
# Uniform quantizer
# ---------------------------------------------------------------------------


def uniform_levels(bits, signed):
    """Largest integer of a b-bit grid: ``2^(b-1) - 1`` signed, ``2^b - 1`` not.

    ``bits`` must be integer valued; the result is differentiable in ``bits``
    (``d/db = 2^(b-1) ln 2``, resp. ``2^b ln 2``) through :func:`exp2_int`.
    """
    return exp2_int(bits - 1.0 if signed else bits) - 1.0


def uniform_bits(d, q_max, signed, rtol=0.0):
    """Bitwidth that the uniform grid of step ``d`` and range ``q_max`` needs.

    ``b = ceil(log2(q_max/d + 1) + 1)`` signed, ``ceil(log2(q_max/d + 1))``
    unsigned (docs/method.md, U3). The ceiling is straight-through, so the result
    is differentiable in ``d`` and ``q_max``; its value is corrected to the
    exact smallest ``b`` with ``2^(b-1) - 1 >= q_max/d`` (a float ``log2`` of
    an exact power of two may miss by an ulp and push ``ceil`` one too high);
    ``rtol`` lets a ratio within that relative tolerance of a level count
    as that level.
    """
    ratio = q_max / d
    offset = 1.0 if signed else 0.0
    raw = tf.math.log(ratio + 1.0) / LN2 + offset
    b = tf.math.ceil(raw)
    # Exact correction with integer-valued powers of two. The ratio is exact
    # for a power-of-two d; for a float step pass rtol (q_max = 7 d computed
    # in float32 can give q_max/d = 7 (1 + ulp), which should count as 7).
    ratio = ratio * (1.0 - rtol)
    too_big = (exact_exp2(b - 1.0 - offset) - 1.0) >= ratio
    too_small = (exact_exp2(b - offset) - 1.0) < ratio
    b = b - tf.cast(too_big, b.dtype) + tf.cast(too_small, b.dtype)
    return raw + tf.stop_gradient(b - raw)


def uniform_quantize(x, d, q_max, signed=True):
    """Uniform quantization with straight-through gradients.

    Forward (docs/method.md section 1, clip first, then round)::

        Q(x) = d * round(clip(x, -q_max, q_max) / d)      signed
        Q(x) = d * round(clip(x, 0, q_max) / d)           unsigned

    with ``round`` half away from zero. ``d`` and ``q_max`` are scalars (the
    already-derived forward values). Backward, with ``c = clip(x)``::

        dQ/dx     = 1 inside (|x| <= q_max; unsigned 0 <= x <= q_max), else 0
        dQ/dd     = (Q - c) / d        [= (Q - x)/d inside,
                                         (Q - sign(x) q_max)/d outside]
        dQ/dq_max = sign(x) where |x| > q_max, else 0

    which is STE applied to the forward expression, as in the reference code.
    Parameter gradients are summed over the tensor.
    """
    x = tf.convert_to_tensor(x)
    d = tf.cast(d, x.dtype)
    q_max = tf.cast(q_max, x.dtype)
    if config.get("fused") and d.shape.rank == 0 and q_max.shape.rank == 0 and kernels.usable(x):
        if not signed:
            # relu(Q_a(a) + b) -> Q: a residual junction, one fused op (same values and gradients)
            fused = kernels.fused_relu_quantize(x, d, q_max)
            if fused is not None:
                return fused
        # x * scale + offset per channel (a BatchNormalization's output) -> Q: one fused op
        fused = kernels.fused_affine_quantize(x, d, q_max, signed)
        if fused is not None:
            return fused
        return kernels.uniform_quantize(x, d, q_max, signed)

    @tf.custom_gradient
    def _quantize(x, d, q_max):
        q = _uniform_forward(x, d, q_max, signed)
        return q, lambda dy: _uniform_backward(dy, x, q, d, q_max, signed)

    return _quantize(x, d, q_max)


@_kernel
def _uniform_forward(x, d, q_max, signed):
    if signed:
        return d * round_half_away(tf.clip_by_value(x, -q_max, q_max) / d)
    return d * _round_nonneg(tf.clip_by_value(x, tf.zeros_like(q_max), q_max) / d)


def negative_ties_up(x, q, d, q_max):
    """What moves ``q = uniform_quantize(x, d, q_max)`` to round ties up.

    The uniform quantizer rounds half away from zero. LiteRT's XNNPACK ADD
    (and SUB) requantizes its sum with an arithmetic right shift after adding
    half a unit, which rounds half up (towards +inf): at an exact negative
    tie, ``clip(x) = (k - 1/2) d`` with ``k <= 0``, it gives ``k d`` where
    the quantizer gives ``(k - 1) d``. Returns ``d`` there and 0 elsewhere,
    so ``q + negative_ties_up(...)`` rounds ties up; positive ties and
    every other value are unchanged. The test is exact in floating point:
    ``clip(x) - q`` is computed without error (Sterbenz) and equals ``d / 2``
    only at a negative tie.
    """
    x = tf.convert_to_tensor(x)
    d = tf.cast(d, x.dtype)
    q_max = tf.cast(q_max, x.dtype)
    return _negative_ties_up(x, q, d, q_max)


@_kernel
def _negative_ties_up(x, q, d, q_max):
    c = tf.clip_by_value(x, -q_max, q_max)
    return tf.cast(tf.equal(c - q, 0.5 * d), x.dtype) * d


def ties_to_even(x, q, d, q_max):
    """What moves ``q = uniform_quantize(x, d, q_max)`` to round ties to the even level.

    LiteRT's XNNPACK MUL requantizes its product in float32 and converts it
    with round-to-nearest-even; the uniform quantizer rounds half away from
    zero. At an exact tie (``|clip(x) - q| = d / 2``, exact in floating point
    as in :func:`negative_ties_up`) on an odd level ``q / d`` this returns
    ``2 (clip(x) - q)`` (the even neighbour towards zero), elsewhere 0.
    """
    x = tf.convert_to_tensor(x)
    d = tf.cast(d, x.dtype)
    q_max = tf.cast(q_max, x.dtype)
    return _ties_to_even(x, q, d, q_max)


@_kernel
def _ties_to_even(x, q, d, q_max):
    r = tf.clip_by_value(x, -q_max, q_max) - q
    odd = tf.equal(tf.math.floormod(tf.round(q / d), 2.0), 1.0)
    return tf.cast(tf.logical_and(tf.equal(tf.abs(r), 0.5 * d), odd), x.dtype) * (2.0 * r)


@_kernel
def _uniform_backward(dy, x, q, d, q_max, signed):
    zero = tf.zeros([], dy.dtype)
    lo = -q_max if signed else tf.zeros_like(q_max)
    c = tf.clip_by_value(x, lo, q_max)
    inside = tf.logical_and(x >= lo, x <= q_max)
    gx = tf.where(inside, dy, zero)
    gd = tf.reduce_sum(dy * (q - c)) / d
    gq = tf.reduce_sum(tf.where(x > q_max, dy, zero))
    if signed:
        gq -= tf.reduce_sum(tf.where(x < lo, dy, zero))
    return gx, gd, gq


# ---------------------------------------------------------------------------
# Power-of-two quantizer
# ---------------------------------------------------------------------------


def pow2_extra_bits(signed, with_zero):
    """Bits that are not exponent bits: one for the sign, one for a zero."""
    return (1.0 if signed else 0.0) + (1.0 if with_zero else 0.0)


def pow2_ratio_exponent(bits, signed, with_zero):
    """``log2(q_max/q_min) = 2^(b - extra) - 1`` for a b-bit pow-2 grid.

    For signed weights without zero (and unsigned activations with zero)
    ``extra = 1``, giving docs/method.md's ``q_max = 2^(2^(b-1) - 1) q_min``.
    Differentiable in ``bits`` through :func:`exp2_int`.
    """
    return exp2_int(bits - pow2_extra_bits(signed, with_zero)) - 1.0


def pow2_bits(q_min, q_max, signed, with_zero):
    """Bitwidth of the pow-2 grid from ``q_min`` to ``q_max`` (both powers of 2).

    ``b = ceil(log2(log2(q_max/q_min) + 1)) + extra`` (docs/method.md, P3:
    ``ceil(log2(log2(q_max/q_min) + 1) + 1)`` for ``extra = 1``). The ratio
    exponent is read exactly from the float bits; the gradient is the STE
    derivative of the float formula.
    """
    extra = pow2_extra_bits(signed, with_zero)
    # log(q_max) - log(q_min), not log(q_max / q_min): the ratio overflows
    # float32 from 2^128 on (and the STE sum below would be inf - inf).
    m_float = (tf.math.log(q_max) - tf.math.log(q_min)) / LN2
    raw = tf.math.log(m_float + 1.0) / LN2 + extra
    m = exact_log2_int(q_max) - exact_log2_int(q_min)
    b = tf.math.ceil(tf.math.log(m + 1.0) / LN2) + extra
    too_big = (exact_exp2(b - 1.0 - extra) - 1.0) >= m
    too_small = (exact_exp2(b - extra) - 1.0) < m
    b = b - tf.cast(too_big, b.dtype) + tf.cast(too_small, b.dtype)
    return raw + tf.stop_gradient(b - raw)


def pow2_quantize(x, q_min, q_max, signed=True, with_zero=False):
    """Power-of-two quantization with straight-through gradients.

    Forward (docs/method.md section 2), ``q_min`` and ``q_max`` powers of two::

        Q(x) = sign(x) * q_min                     if |x| <= q_min
               sign(x) * 2^floor(1/2 + log2|x|)    if q_min < |x| <= q_max
               sign(x) * q_max                     if |x| > q_max

    ``with_zero`` spends a level on an exact zero: ``|x| < q_min / sqrt(2)``
    gives 0. Unsigned quantizers map ``x <= 0`` to 0.

    Backward::

        dQ/dx     = 2^floor(1/2 + log2|x|) / |x|   if q_min < |x| <= q_max, else 0
        dQ/dq_min = sign(x)   where |x| <= q_min (and not rounded to zero)
        dQ/dq_max = sign(x)   where |x| > q_max
    """
    x = tf.convert_to_tensor(x)
    q_min = tf.cast(q_min, x.dtype)
    q_max = tf.cast(q_max, x.dtype)

    @tf.custom_gradient
    def _quantize(x, q_min, q_max):
        q = _pow2_forward(x, q_min, q_max, signed, with_zero)
        return q, lambda dy: _pow2_backward(dy, x, q_min, q_max, signed, with_zero)

    return _quantize(x, q_min, q_max)


def _pow2_magnitude(x, signed):
    """``(s, a)``: the sign (0/1 for unsigned) and magnitude the pow-2 grid sees."""
    if signed:
        return tf.sign(x), tf.abs(x)
    return tf.cast(x > 0, x.dtype), tf.maximum(x, tf.zeros_like(x))


@_kernel
def _pow2_forward(x, q_min, q_max, signed, with_zero):
    s, a = _pow2_magnitude(x, signed)
    q = s * pow2_round_magnitude(tf.minimum(tf.maximum(a, q_min), q_max))
    if with_zero:
        q = tf.where(pow2_round_magnitude(a) < q_min, tf.zeros_like(q), q)
    return q


@_kernel
def _pow2_backward(dy, x, q_min, q_max, signed, with_zero):
    s, a = _pow2_magnitude(x, signed)
    sdy = s * dy
    zeros = tf.zeros_like(dy)
    low = a <= q_min
    if with_zero:
        low = tf.logical_and(low, tf.logical_not(pow2_round_magnitude(a) < q_min))
    high = a > q_max
    middle = tf.logical_not(tf.logical_or(a <= q_min, high))
    safe_a = tf.where(middle, a, tf.ones_like(a))
    gx = tf.where(middle, dy * pow2_round_magnitude(safe_a) / safe_a, zeros)
    g_min = tf.reduce_sum(tf.where(low, sdy, zeros))
    g_max = tf.reduce_sum(tf.where(high, sdy, zeros))
    return gx, g_min, g_max


# ---------------------------------------------------------------------------
# LiteRT's int8 HARD_SWISH
# ---------------------------------------------------------------------------

HARD_SWISH_TABLE_LOW = -256  # the lowest input value (int8 level minus zero point) in the table


def _int16_multiplier(real):
    """``(m, e)`` for a positive float32 multiplier as TFLite stores it for HARD_SWISH: ``real`` is
    ``q 2^e`` with ``q`` in [1/2, 1); ``q`` is written with 31 fraction bits (exact: a float32 has
    24 significant bits), then rounded half up to 15 (``m`` at most 2^15 - 1). Integer bit fields
    of the float32, so no log or power can be off by one."""
    bits = tf.bitcast(tf.cast(real, tf.float32), tf.int32)
    exponent = tf.bitwise.right_shift(bits, 23) - 126
    significand = tf.bitwise.bitwise_and(bits, _MANTISSA_MASK) + _ONE_EXPONENT  # q 2^24
    return tf.minimum(tf.bitwise.right_shift(significand + 256, 9), 32767), exponent


def _high_mul_rounded(a, b):
    """High half of ``2 a b`` for int16 ``a``, ``b >= 0``: nearest, ties away from zero."""
    ab = a * b
    return tf.truncatediv(ab + tf.where(ab >= 0, 1 << 14, 1 - (1 << 14)), 1 << 15)


def _saturate16(x):
    return tf.clip_by_value(x, -32768, 32767)


def _shift_right_rounded(x, shift):
    """``x / 2^shift`` rounded to nearest, ties away from zero (``shift`` a scalar in [0, 30])."""
    mask = tf.bitwise.left_shift(1, shift) - 1
    threshold = tf.bitwise.right_shift(mask, 1) + tf.cast(x < 0, tf.int32)
    up = tf.cast(tf.bitwise.bitwise_and(x, mask) > threshold, tf.int32)
    return tf.bitwise.right_shift(x, shift) + up


def hard_swish_int8_table(input_scale, output_scale):
    """The output of LiteRT's int8 HARD_SWISH for each input value -256 ... 255, as int32 levels.

    An input value is the int8 level minus the input zero point; the result is the output level
    before the output zero point is added and int8 saturation (a learned quantizer's range lies
    inside it). The kernel derives two int16 fixed-point multipliers from the scales, in float32:
    ``s_in / 128 / s_out`` (the output) and ``s_in / 128 / (3 / 32768)`` (the gate, which maps
    [-3, 3] onto [-1, 1] in 15 fraction bits), and computes, per element, in 16-bit integers:
    the input times 128 on the output scale (a rounding doubling high multiply), the gate (shifted
    left with saturation or right with rounding, then to [0, 1]), their product (a truncating
    doubling high multiply) and a rounding right shift onto the output scale. Few of its results
    differ from ``x relu6(x + 3) / 6`` rounded onto the output grid, by one step (0.02% of a
    trained MobileNetV3's stem). The table is the same computation on the 512 possible inputs.

    ``input_scale``, ``output_scale``: float32 scalars (a learned quantizer's steps). A pair with
    ``s_in > 128 s_out`` is refused by the kernel; here its output shift is taken as 0.
    """
    v = tf.range(HARD_SWISH_TABLE_LOW, -HARD_SWISH_TABLE_LOW, dtype=tf.int32)
    hires = tf.cast(input_scale, tf.float32) * (1.0 / 128.0)
    out_m, out_e = _int16_multiplier(hires / tf.cast(output_scale, tf.float32))
    gate_m, gate_e = _int16_multiplier(hires / np.float32(3.0 / 32768.0))
    x = v * 128
    x_out = _high_mul_rounded(x, out_m)
    left = tf.bitwise.left_shift(1, tf.clip_by_value(gate_e - 1, 0, 16))
    gate = tf.where(gate_e > 0, _saturate16(x * left), x)
    gate = _high_mul_rounded(gate, gate_m)
    gate = tf.where(
        gate_e > 0, _saturate16(gate * 2), _shift_right_rounded(gate, tf.clip_by_value(-gate_e, 0, 30))
    )
    gate = tf.bitwise.right_shift(gate + 32768, 1)  # [-1, 1] -> [0, 1]
    y = tf.truncatediv(gate * x_out, 1 << 15)
    return _shift_right_rounded(y, tf.clip_by_value(-out_e, 0, 30))


@_kernel
def hard_swish_int8_forward(x, y, table, d_in, d_out):
    """The hard-swish ``y`` of ``x`` (on its grid of step ``d_in``) moved onto the HARD_SWISH
    kernel's output levels (``table``: :func:`hard_swish_int8_table`, as float32) on the grid of
    step ``d_out``, for the learned quantizer of that step to take next.

    The value is ``L d_out + r``: ``L`` the kernel's level for the input's level, ``r`` the
    float function's own rounding residual ``y - d_out round(y / d_out)`` clipped to 0.49 steps,
    so that the quantizer rounds it to ``L`` exactly and its step still learns from the float
    function's residual. The gradient with respect to ``y`` is 1 (straight-through).
    """
    index = tf.cast(tf.round(x / d_in), tf.int32) - HARD_SWISH_TABLE_LOW
    levels = tf.gather(table, tf.clip_by_value(index, 0, -2 * HARD_SWISH_TABLE_LOW - 1))
    residual = y - round_half_away(y / d_out) * d_out
    bound = 0.49 * d_out
    target = levels * d_out + tf.clip_by_value(residual, -bound, bound)
    return y + tf.stop_gradient(target - y)
