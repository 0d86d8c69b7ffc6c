"""tfdq.kernels: the fused CPU uniform quantizer against float64 NumPy and tfdq.ops.

The forward pass must be bit-identical to the TensorFlow formulas of
``tfdq.ops`` (``tfdq.config.settings(fused=False)``) and equal in value to float64 NumPy
round-half-away references; ``gx`` must be exact, ``gd`` and ``gq`` within
1e-6 (relative) of float64 NumPy sums.

Notes on float32 inputs: TensorFlow on CPU flushes subnormal float32 numbers
to zero (FTZ/DAZ), and so do the kernels; the NumPy references flush them
too (``_flush``). The XLA path of ``tfdq.ops`` returns -0.0 where the plain
TensorFlow formulas (``tf.sign(-0.0) = +0``) and the kernels return +0.0,
so against XLA the values are compared, not the bits.

The fused ops (the residual junction, a BatchNorm's output pass with the
quantizer after it, and both together) are checked against the separate ops
they replace and against float64 NumPy: values and the feature-map gradients
bit for bit, sums within 1e-6.

The first test to need the library compiles it (about 15-30 s on two cores)
into the cache (``~/.cache/tfdq/kernels`` or ``$TFDQ_KERNEL_CACHE``); later
runs load the cached build.
"""

import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import tfdq
from tfdq import kernels, ops

TINY32 = float(np.finfo(np.float32).tiny)
RTOL = 1e-6
SHAPE_LARGE = (128, 32, 32, 16)  # 2,097,152 elements: the multi-threaded path

# (d, q_max): powers of two, steps that are not, and a coarse wide grid.
GRIDS = [
    (0.25, 31.75),
    (2.0**-4, 127 * 2.0**-4),
    (3.0, 381.0),  # (k + 1/2) d is exact: true ties
    (0.75, 95.25),
    (0.1, float(np.float32(127) * np.float32(0.1))),
    (1.0 / 3.0, float(np.float32(127) * np.float32(1.0 / 3.0))),
    (0.3, 38.1),
    (1.0, 2.0**24),  # ties and odd integers near 2^22 .. 2^23
]


@pytest.fixture(autouse=True)
def _seed():
    """Overrides the conftest fixture: these tests use no Keras state."""
    yield


@pytest.fixture(scope="module")
def lib():
    if not kernels._enabled():
        pytest.skip(f"tfdq's custom kernels are disabled ({kernels.ENV_ENABLE}=0)")
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None and not os.path.exists(kernels.library_path()):
        pytest.skip(f"no C++ compiler ({compiler!r}) to build tfdq's custom CPU kernels")
    module = kernels.load()
    assert module is not None, "kernels.load() failed although a compiler exists (see the log)"
    return module


@pytest.fixture
def plain_ops():
    """``tfdq.ops`` with its plain TensorFlow formulas (restored after the test)."""
    with tfdq.config.settings(fused=False):
        yield ops


# ---------------------------------------------------------------------------
# float64 references
# ---------------------------------------------------------------------------


def _flush(x):
    """Subnormal float32 values as the signed zero TensorFlow's CPU sees."""
    x = np.asarray(x, np.float32)
    return np.where(np.abs(x) < TINY32, np.copysign(np.float32(0), x), x).astype(np.float32)


def _lo(q_max, signed):
    return -np.float64(np.float32(q_max)) if signed else 0.0


def ref_forward(x, d, q_max, signed):
    """``d * round_half_away(clip(x) / d)``, the rounding exact in float64."""
    x = _flush(x).astype(np.float64)
    d = np.float64(np.float32(d))
    q_max = np.float64(np.float32(q_max))
    c = np.minimum(np.maximum(x, _lo(q_max, signed)), q_max)
    # float64 quotient rounded to float32 = the float32 quotient (no double
    # rounding issue for division); |v| + 1/2 is exact in float64
    v = (c / d).astype(np.float32).astype(np.float64)
    r = np.sign(v) * np.floor(np.abs(v) + 0.5)
    return (d * r).astype(np.float32)  # d * r is exact in float64: one rounding


def ref_backward(dy, x, q, d, q_max, signed):
    x = _flush(x).astype(np.float64)
    dy = np.asarray(dy, np.float32).astype(np.float64)
    q = np.asarray(q, np.float32).astype(np.float64)
    d = np.float64(np.float32(d))
    q_max = np.float64(np.float32(q_max))
    lo = _lo(q_max, signed)
    c = np.minimum(np.maximum(x, lo), q_max)
    inside = (x >= lo) & (x <= q_max)
    gx = np.where(inside, dy, 0.0).astype(np.float32)
    gd = np.sum(dy * (q - c)) / d
    gq = np.sum(dy[x > q_max]) - (np.sum(dy[x < lo]) if signed else 0.0)
    return gx, gd, gq


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


def _assert_bits_equal(actual, expected):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan)
    bad = (_bits(actual) != _bits(expected)) & ~nan
    assert not bad.any(), (
        f"{bad.sum()} of {bad.size} differ, e.g. got {actual[bad][:5]} "
        f"({_bits(actual)[bad][:5]}), want {expected[bad][:5]} ({_bits(expected)[bad][:5]})"
    )


def _test_values(d, q_max, signed):
    """Ties, the floats either side of them, the range ends, values outside, random."""
    with np.errstate(over="ignore"):
        return _values(d, q_max, signed)


def _values(d, q_max, signed):
    d32, q32 = np.float32(d), np.float32(q_max)
    levels = min(int(q32 / d32), 2000)
    k = np.arange(-levels - 1, levels + 1, dtype=np.float64)
    tie_v = (k + 0.5).astype(np.float32)
    v = np.concatenate(
        [
            tie_v,
            np.nextafter(tie_v, np.float32(0)),
            np.nextafter(tie_v, np.float32(np.inf) * np.sign(tie_v)),
            np.float32([0.49999997, -0.49999997, 0.5, -0.5, 1.5, 2.5, -2.5]),
        ]
    )
    x = [v * d32]  # exact ties where d is a power of two (or 3, 0.75)
    big = np.float32([2.0**22 + 0.5, 2.0**23 - 0.5, 2.0**23 + 1.0, 2.0**23 - 1.5, 2.0**22 + 1.5])
    x.append(np.concatenate([big, -big]) * d32)
    ends = np.float32([q32, -q32, 0.0, -0.0, d32, -d32, d32 / 2, -d32 / 2])
    x.append(ends)
    x.append(np.nextafter(ends, np.float32(np.inf)))
    x.append(np.nextafter(ends, np.float32(-np.inf)))
    x.append(np.float32([1.5, -1.5, 3.0, -3.0, 1e30, -1e30, np.inf, -np.inf]) * q32)
    rng = np.random.default_rng(int(1000 * d) + signed)
    x.append((rng.normal(size=4000) * q32 * 0.6).astype(np.float32))
    x.append((rng.uniform(-1.2, 1.2, size=4000) * q32).astype(np.float32))
    return np.concatenate(x).astype(np.float32)


def _edge_values():
    """Values only the TensorFlow comparison can take: NaN and subnormals."""
    return np.float32([np.nan, -np.nan, 1e-40, -1e-40, 1e-45, -1e-45, 0.0, -0.0, np.inf, -np.inf])


def _kernel_grads(x, d, q_max, signed, dy):
    x, d, q_max = tf.constant(x), tf.constant(d, tf.float32), tf.constant(q_max, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch([x, d, q_max])
        q = kernels.uniform_quantize(x, d, q_max, signed)
    dy = tf.constant(np.asarray(dy, np.float32))
    gx, gd, gq = tape.gradient(q, [x, d, q_max], output_gradients=dy)
    return q.numpy(), gx.numpy(), float(gd), float(gq)


# ---------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("d,q_max", GRIDS)
def test_forward_matches_numpy_and_plain_tf(lib, plain_ops, d, q_max, signed):
    x = _test_values(d, q_max, signed)
    q = lib.tfdq_uniform_quantize(x, d, q_max, signed=signed).numpy()
    np.testing.assert_array_equal(q, ref_forward(x, d, q_max, signed))
    plain = plain_ops._uniform_forward(
        tf.constant(x), tf.constant(d, tf.float32), tf.constant(q_max, tf.float32), signed
    )
    _assert_bits_equal(q, plain.numpy())
    edges = _edge_values()
    q_edges = lib.tfdq_uniform_quantize(edges, d, q_max, signed=signed).numpy()
    plain_edges = plain_ops._uniform_forward(
        tf.constant(edges), tf.constant(d, tf.float32), tf.constant(q_max, tf.float32), signed
    )
    _assert_bits_equal(q_edges, plain_edges.numpy())


def test_ties_are_exact_ties():
    """The tie inputs above are ties in float32: x / d == k + 1/2 exactly."""
    for d in (0.25, 3.0, 0.75):
        x = _test_values(d, 100 * d, True)[:100]
        v = x.astype(np.float64) / np.float64(d)
        np.testing.assert_array_equal(v - np.floor(v), 0.5)


def test_round_half_away_cases(lib):
    x = np.float32([0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.49999997, -0.49999997, 2.0**23 + 1])
    q = lib.tfdq_uniform_quantize(x, 1.0, 2.0**24, signed=True).numpy()
    np.testing.assert_array_equal(q, [1, -1, 2, -2, 3, -3, 0, 0, 2.0**23 + 1])
    q = lib.tfdq_uniform_quantize(np.abs(x), 1.0, 2.0**24, signed=False).numpy()
    np.testing.assert_array_equal(q, [1, 1, 2, 2, 3, 3, 0, 0, 2.0**23 + 1])


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_forward_matches_xla_path(lib, signed):
    d, q_max = 0.1, float(np.float32(127) * np.float32(0.1))
    x = _test_values(d, q_max, signed)
    with tfdq.config.settings(fused=True):
        xla = ops._uniform_forward(
            tf.constant(x), tf.constant(d, tf.float32), tf.constant(q_max, tf.float32), signed
        )
    q = kernels.uniform_quantize(x, d, q_max, signed).numpy()
    np.testing.assert_array_equal(q, xla.numpy())  # values: XLA gives -0.0 for +0.0


# ---------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("d,q_max", [GRIDS[1], GRIDS[2], GRIDS[4], GRIDS[5]])
def test_gradients_match_numpy_and_plain_tf(lib, plain_ops, d, q_max, signed):
    x = _test_values(d, q_max, signed)
    dy = np.random.default_rng(7).normal(size=x.shape).astype(np.float32)
    q, gx, gd, gq = _kernel_grads(x, d, q_max, signed, dy)
    ref_gx, ref_gd, ref_gq = ref_backward(dy, x, q, d, q_max, signed)
    _assert_bits_equal(gx, ref_gx)
    np.testing.assert_allclose(gd, ref_gd, rtol=RTOL)
    np.testing.assert_allclose(gq, ref_gq, rtol=RTOL)
    plain_gx, _, _ = plain_ops._uniform_backward(
        tf.constant(dy),
        tf.constant(x),
        tf.constant(q),
        tf.constant(d, tf.float32),
        tf.constant(q_max, tf.float32),
        signed,
    )
    _assert_bits_equal(gx, plain_gx.numpy())


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_gradients_of_edge_values_match_plain_tf(lib, plain_ops, signed):
    x = _edge_values()
    x = x[~np.isnan(x)]  # a NaN x makes gd NaN, checked below
    dy = np.arange(1, x.size + 1, dtype=np.float32)
    q, gx, gd, gq = _kernel_grads(x, 0.25, 2.0, signed, dy)
    args = [tf.constant(v) for v in (dy, x, q)] + [tf.constant(0.25), tf.constant(2.0)]
    plain_gx, plain_gd, plain_gq = plain_ops._uniform_backward(*args, signed)
    _assert_bits_equal(gx, plain_gx.numpy())
    np.testing.assert_allclose([gd, gq], [float(plain_gd), float(plain_gq)], rtol=RTOL)
    _, _, gd_nan, gq_nan = _kernel_grads(np.float32([np.nan, 1.0]), 0.25, 2.0, signed, [1, 1])
    assert np.isnan(gd_nan) and gq_nan == 0.0


def test_large_tensor_multithreaded(lib, plain_ops):
    """2M elements: many blocks over the worker threads, eager and in a tf.function."""
    rng = np.random.default_rng(3)
    d, q_max = 0.1, float(np.float32(31) * np.float32(0.1))
    x = (rng.normal(size=SHAPE_LARGE) * 2.5).astype(np.float32)
    dy = rng.normal(size=SHAPE_LARGE).astype(np.float32)
    for signed in (True, False):
        q, gx, gd, gq = _kernel_grads(x, d, q_max, signed, dy)
        np.testing.assert_array_equal(q, ref_forward(x, d, q_max, signed))
        plain = plain_ops._uniform_forward(
            tf.constant(x), tf.constant(d, tf.float32), tf.constant(q_max, tf.float32), signed
        )
        _assert_bits_equal(q, plain.numpy())
        ref_gx, ref_gd, ref_gq = ref_backward(dy, x, q, d, q_max, signed)
        _assert_bits_equal(gx, ref_gx)
        np.testing.assert_allclose(gd, ref_gd, rtol=RTOL)
        np.testing.assert_allclose(gq, ref_gq, rtol=RTOL)
        # the same sums again (the block sums are added in a fixed order)
        _, _, gd2, gq2 = _kernel_grads(x, d, q_max, signed, dy)
        assert (gd2, gq2) == (gd, gq)

        # In a graph the ops may write into their input buffers (x * 1.0 and
        # the upstream gradient are temporaries); the results stay the same.
        @tf.function
        def step(x, w, signed=signed):
            with tf.GradientTape() as tape:
                tape.watch(x)
                q = kernels.uniform_quantize(x * 1.0, d, q_max, signed)
                loss = tf.reduce_sum(q * w)
            return q, tape.gradient(loss, x)

        q_graph, gx_graph = step(tf.constant(x), tf.constant(dy))
        _assert_bits_equal(q_graph.numpy(), q)
        _assert_bits_equal(gx_graph.numpy(), gx)


# ---------------------------------------------------------------------------
# the residual junction Q(relu(Q_a(a) + b)) as one op
# ---------------------------------------------------------------------------


def _junction_inputs(d_a, q_max_a, signed_a, d, q_max, n_random):
    """a and b with sums that are exactly 0 (+0 and -0), ties of Q, values beyond both
    ranges, NaN-free; plus random values."""
    qa_levels = np.arange(-4, 5, dtype=np.float32) * np.float32(d_a)
    if not signed_a:
        qa_levels = np.abs(qa_levels)
    a = [qa_levels, qa_levels, qa_levels, np.float32([3, -3, 1e6, -1e6]) * np.float32(q_max_a)]
    b = [-qa_levels, (np.arange(9, dtype=np.float32) - 4.5) * np.float32(d), -qa_levels + np.float32(d) / 2]
    b.append(np.float32([-1.0, 1.0, 0.5, -0.5]) * np.float32(q_max))
    b[0][4] = -0.0  # 0 + -0 = +0; a = -0 below
    a[0][4] = -0.0
    rng = np.random.default_rng(7)
    a.append((rng.normal(size=n_random) * q_max_a * 0.7).astype(np.float32))
    b.append((rng.normal(size=n_random) * q_max * 0.7).astype(np.float32))
    a, b = np.concatenate(a), np.concatenate(b)
    dy = rng.normal(size=a.shape).astype(np.float32)
    dy[::7] *= -1.0
    return a, b, dy


def _ref_junction(dy, a, b, d_a, q_max_a, signed_a, d, q_max):
    """Float64 NumPy: Q(relu(Q_a(a) + b)) and its straight-through gradients
    (gs = dy where 0 < s <= q_max, as ReluGrad after Q's backward gives)."""
    qa = ref_forward(a, d_a, q_max_a, signed_a)
    s = (qa.astype(np.float32) + _flush(b)).astype(np.float32)  # one float32 rounding, as AddV2
    r = np.maximum(s, np.float32(0))
    q = ref_forward(r, d, q_max, False)
    dy64 = dy.astype(np.float64)
    s64, r64 = s.astype(np.float64), r.astype(np.float64)
    qm = np.float64(np.float32(q_max))
    gs = np.where((s64 > 0) & (s64 <= qm), dy64, 0.0)
    gd = np.sum(dy64 * (q.astype(np.float64) - np.minimum(r64, qm))) / np.float64(np.float32(d))
    gq = np.sum(dy64[r64 > qm])
    ga, gd_a, gq_a = ref_backward(gs.astype(np.float32), a, qa, d_a, q_max_a, signed_a)
    return q, ga, gs.astype(np.float32), gd_a, gq_a, gd, gq


def _separate_ops(lib, dy, a, b, d_a, q_max_a, signed_a, d, q_max):
    """The four ops the junction replaces, forward and backward, as the tape chains them."""
    qa = lib.tfdq_uniform_quantize(a, d_a, q_max_a, signed=signed_a)
    s = qa + b
    r = tf.nn.relu(s)
    q = lib.tfdq_uniform_quantize(r, d, q_max, signed=False)
    gr, gd, gq = lib.tfdq_uniform_quantize_grad(dy, r, q, d, q_max, signed=False)
    gs = tf.raw_ops.ReluGrad(gradients=gr, features=s)
    ga, gd_a, gq_a = lib.tfdq_uniform_quantize_grad(gs, a, qa, d_a, q_max_a, signed=signed_a)
    return [t.numpy() for t in (q, ga, gs, gd_a, gq_a, gd, gq)]


@pytest.mark.parametrize("signed_a", [True, False])
@pytest.mark.parametrize(
    "d_a, q_max_a, d, q_max",
    [(2.0**-5, 3.0, 2.0**-4, 2.5), (0.25, 31.75, 0.125, 8.0), (0.1, 12.7, 0.3, 38.1)],
)
@pytest.mark.parametrize("n_random", [1001, SHAPE_LARGE[0] * 8192 + 5])
def test_add_relu_quantize_equals_separate_ops_and_numpy(lib, signed_a, d_a, q_max_a, d, q_max, n_random):
    """The fused junction gives the separate ops' values and gradients bit for bit
    (forward, ga, gb), its parameter gradients equal theirs and float64 NumPy's sums."""
    a, b, dy = _junction_inputs(d_a, q_max_a, signed_a, d, q_max, n_random)
    q = lib.tfdq_add_relu_quantize(a, b, d_a, q_max_a, d, q_max, signed_a=signed_a).numpy()
    ga, gb, gd_a, gq_a, gd, gq = (
        t.numpy()
        for t in lib.tfdq_add_relu_quantize_grad(dy, a, b, d_a, q_max_a, d, q_max, signed_a=signed_a)
    )
    sep = _separate_ops(lib, dy, a, b, d_a, q_max_a, signed_a, d, q_max)
    _assert_bits_equal(q, sep[0])
    _assert_bits_equal(ga, sep[1])
    _assert_bits_equal(gb, sep[2])
    for got, want in zip((gd_a, gq_a, gd, gq), sep[3:]):
        np.testing.assert_allclose(got, want, rtol=RTOL)
    ref = _ref_junction(dy, a, b, d_a, q_max_a, signed_a, d, q_max)
    _assert_bits_equal(q, ref[0])
    np.testing.assert_array_equal(ga, ref[1])  # values: ReluGrad's -0 is 0 here
    np.testing.assert_array_equal(gb, ref[2])
    for got, want in zip((gd_a, gq_a, gd, gq), ref[3:]):
        np.testing.assert_allclose(got, want, rtol=RTOL)
    if np.log2(d).is_integer():  # the exported grids: every output k d with 0 <= k d <= q_max
        k = q.astype(np.float64) / d
        np.testing.assert_array_equal(k, np.round(k))
        assert q.min() >= 0 and q.max() <= np.float32(q_max)
    assert np.any(gb == 0) and np.any(gb != 0)


def _residual_model():
    import keras  # noqa: PLC0415

    inputs = keras.Input((8, 8, 4))
    x = keras.layers.ReLU()(keras.layers.Conv2D(4, 3, padding="same")(inputs))
    y = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(x))
    x = keras.layers.ReLU()(keras.layers.Add()([y, x]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


def test_training_step_fuses_residual_junctions(lib):
    """In a traced training step the junction (Add operand quantizer, Add, ReLU,
    quantizer) is one op; outputs, loss and every gradient are those of the separate ops."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, 8, 8, 4)).astype(np.float32)
    y = rng.normal(size=(16, 3)).astype(np.float32)
    qmodel = tfdq.quantize_model(_residual_model(), calibration_data=x)
    variables = qmodel.trainable_variables

    def traced():
        @tf.function
        def step(x, y):
            with tf.GradientTape() as tape:
                out = qmodel(x, training=True)
                loss = tf.reduce_mean((out - y) ** 2)
            return out, loss, tape.gradient(loss, variables)

        return step.get_concrete_function(x, y)

    # the junction on its own: the BatchNorm before it stays separate ops (its fused
    # form has a test of its own below)
    kernels.FUSE_AFFINE = False
    try:
        fused = traced()
        kernels.FUSE_JUNCTIONS = False
        separate = traced()
    finally:
        kernels.FUSE_JUNCTIONS = True
        kernels.FUSE_AFFINE = True
    types = [op.type for op in fused.graph.get_operations()]
    assert types.count("TfdqAddReluQuantize") == 1 and types.count("TfdqAddReluQuantizeGrad") == 1
    assert "ReluGrad" not in types or types.count("ReluGrad") == 1  # the first ReLU's, absorbed or not
    assert "TfdqAddReluQuantize" not in [op.type for op in separate.graph.get_operations()]
    out_f, loss_f, grads_f = fused(x, y)
    out_s, loss_s, grads_s = separate(x, y)
    _assert_bits_equal(out_f.numpy(), out_s.numpy())
    assert float(loss_f) == float(loss_s)
    for v, gf, gs in zip(variables, grads_f, grads_s):
        np.testing.assert_allclose(gf.numpy(), gs.numpy(), rtol=RTOL, atol=1e-7, err_msg=v.path)
    # inference graphs hold no tfdq op (no tape): the model computes the same
    np.testing.assert_array_equal(qmodel(x, training=False).numpy(), qmodel(x, training=False).numpy())


def test_junction_fusion_only_for_same_shapes(lib):
    """A sum that broadcasts (a bias, a map with batch 1) stays separate ops; a sum of
    two maps of one shape becomes the fused op, with the same values."""
    x = tf.constant(np.random.default_rng(5).normal(size=(4, 8)).astype(np.float32))

    def traced(other):
        @tf.function
        def f(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                q_a = kernels.uniform_quantize(x, 0.25, 2.0, True)
                q = ops.uniform_quantize(tf.nn.relu(q_a + other), 0.125, 1.5, signed=False)
            return q, tape.gradient(tf.reduce_sum(q), x)

        return f.get_concrete_function(x)

    for other, fused in (
        (tf.constant(0.3, shape=[8]), False),
        (tf.constant(0.3, shape=[1, 8]), False),
        (tf.constant(0.3, shape=[4, 8]), True),
    ):
        f = traced(other)
        types = [op.type for op in f.graph.get_operations()]
        assert ("TfdqAddReluQuantize" in types) == fused
        q, gx = f(x)
        want = ops.uniform_quantize(tf.nn.relu(ops.uniform_quantize(x, 0.25, 2.0) + other), 0.125, 1.5, False)
        _assert_bits_equal(q.numpy(), want.numpy())


def test_junction_registry_does_not_keep_graphs_alive(lib):
    """The record of quantized tensors that junction fusion reads holds names, not tensors:
    a traced graph is freed with its last reference."""
    import gc  # noqa: PLC0415
    import weakref  # noqa: PLC0415

    graph = tf.Graph()
    with graph.as_default():
        x = tf.zeros([4, 2])
        q = tf.identity(x)
        kernels._remember(q, (x, tf.constant(0.5), tf.constant(2.0), True))
        found = kernels._quantized_operand(q)
        assert found[0] is x and found[3] is True
    assert graph in kernels._produced
    ref = weakref.ref(graph)
    del graph, x, q, found
    gc.collect()
    assert ref() is None


# ---------------------------------------------------------------------------
# a BatchNorm's output pass and the quantizer after it: Q(x * scale + offset)
# ---------------------------------------------------------------------------


def _affine_inputs(d, q_max, signed, rows, channels):
    """x, scale, offset, dy: channel 0 with scale 1 and offset 0 takes the quantizer's
    edge values (ties, range ends, values outside), the others random scales (some
    negative) and offsets."""
    rng = np.random.default_rng(11 + channels)
    x = (rng.normal(size=(rows, channels)) * 2.0).astype(np.float32)
    edges = _test_values(d, q_max, signed)
    edges = edges[np.isfinite(edges) & (np.abs(edges) < 1e30)][:rows]
    x[: len(edges), 0] = edges
    scale = (rng.uniform(0.2, 2.0, size=channels) * np.where(np.arange(channels) % 5 == 3, -1, 1)).astype(
        np.float32
    )
    offset = (rng.normal(size=channels) * q_max * 0.3).astype(np.float32)
    scale[0], offset[0] = 1.0, 0.0
    dy = rng.normal(size=x.shape).astype(np.float32)
    return x, scale, offset, dy


def _ref_affine(dy, x, scale, offset, d, q_max, signed):
    """Float64 NumPy: Q(x * scale + offset) (product and sum each rounded to float32,
    as Mul and AddV2) and its straight-through gradients, the sums in float64."""
    y = ((x * scale).astype(np.float32) + offset).astype(np.float32)
    q = ref_forward(y, d, q_max, signed)
    gy, gd, gq = ref_backward(dy, y, q, d, q_max, signed)
    gy64 = gy.astype(np.float64)
    axes = tuple(range(x.ndim - 1))
    gx = (gy * scale).astype(np.float32)
    return q, gx, np.sum(gy64 * x.astype(np.float64), axis=axes), np.sum(gy64, axis=axes), gd, gq


def _affine_separate_ops(lib, dy, x, scale, offset, d, q_max, signed):
    """Mul, AddV2 and the quantizer, forward and backward, as the tape chains them."""
    y = tf.constant(x) * scale + offset
    q = lib.tfdq_uniform_quantize(y, d, q_max, signed=signed)
    gy, gd, gq = lib.tfdq_uniform_quantize_grad(dy, y, q, d, q_max, signed=signed)
    axes = list(range(x.ndim - 1))
    gscale = tf.reduce_sum(gy * x, axes)
    goffset = tf.reduce_sum(gy, axes)
    return [t.numpy() for t in (q, gy * scale, gscale, goffset, gd, gq)]


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("d,q_max", [(2.0**-4, 127 * 2.0**-4), (0.25, 1.75), (0.3, 38.1)])
@pytest.mark.parametrize("rows,channels", [(8192, 16), (4099, 3), (SHAPE_LARGE[0] * 64, 32)])
def test_affine_quantize_equals_separate_ops_and_numpy(lib, signed, d, q_max, rows, channels):
    """Q(x * scale + offset) in one op: values and gx bit for bit those of the separate
    ops (Mul, AddV2, the quantizer) and of float64 NumPy; gd and gq equal theirs, the
    per-channel sums float64 NumPy's (within 1e-6) and TensorFlow's float32 sums' (within
    their rounding)."""
    x, scale, offset, dy = _affine_inputs(d, q_max, signed, rows, channels)
    q = lib.tfdq_affine_quantize(x, scale, offset, d, q_max, signed=signed).numpy()
    gx, gscale, goffset, gd, gq = (
        t.numpy() for t in lib.tfdq_affine_quantize_grad(dy, x, scale, offset, d, q_max, signed=signed)
    )
    sep = _affine_separate_ops(lib, dy, x, scale, offset, d, q_max, signed)
    _assert_bits_equal(q, sep[0])
    _assert_bits_equal(gx, sep[1])
    ref = _ref_affine(dy, x, scale, offset, d, q_max, signed)
    _assert_bits_equal(q, ref[0])
    np.testing.assert_array_equal(gx, ref[1])
    np.testing.assert_allclose(gscale, ref[2], rtol=RTOL, atol=1e-6 * np.abs(ref[2]).max())
    np.testing.assert_allclose(goffset, ref[3], rtol=RTOL, atol=1e-6 * np.abs(ref[3]).max())
    for got, want in zip((gd, gq), ref[4:]):
        np.testing.assert_allclose(got, want, rtol=RTOL)
    for got, want in zip((gd, gq), sep[4:]):
        np.testing.assert_allclose(got, want, rtol=RTOL)
    # TensorFlow's float32 sums of rows * channels terms: within their own rounding
    for got, want in zip((gscale, goffset), sep[2:4]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    if np.log2(d).is_integer():  # outputs on the grid, inside the range
        k = q.astype(np.float64) / d
        np.testing.assert_array_equal(k, np.round(k))
        assert q.max() <= np.float32(q_max) and q.min() >= (-np.float32(q_max) if signed else 0)
    assert np.any(gx == 0) and np.any(gx != 0)  # both sides of the range were hit


@pytest.mark.parametrize("signed_a", [True, False])
@pytest.mark.parametrize("d_a, q_max_a, d, q_max", [(2.0**-5, 3.0, 2.0**-4, 2.5), (0.1, 12.7, 0.3, 38.1)])
@pytest.mark.parametrize("rows,channels", [(999, 16), (SHAPE_LARGE[0] * 64, 32)])
def test_affine_junction_equals_separate_ops_and_numpy(lib, signed_a, d_a, q_max_a, d, q_max, rows, channels):
    """Q(relu(Q_a(x * scale + offset) + b)) in one op: values, gx and gb bit for bit those
    of the separate ops (Mul, AddV2, the fused junction); the per-channel sums float64
    NumPy's within 1e-6, the quantizer parameters' gradients the junction op's."""
    edge_a, edge_b, _ = _junction_inputs(d_a, q_max_a, signed_a, d, q_max, 1)
    rng = np.random.default_rng(13 + channels)
    x = (rng.normal(size=(rows, channels)) * q_max_a * 0.5).astype(np.float32)
    b = (rng.normal(size=(rows, channels)) * q_max * 0.5).astype(np.float32)
    k = min(len(edge_a), rows)
    x[:k, 0], b[:k, 0] = edge_a[:k], edge_b[:k]  # channel 0: scale 1, offset 0, the junction's edge cases
    scale = rng.uniform(0.3, 1.5, size=channels).astype(np.float32) * np.where(
        np.arange(channels) % 4 == 3, -1, 1
    )
    offset = (rng.normal(size=channels) * q_max_a * 0.2).astype(np.float32)
    scale, offset = scale.astype(np.float32), offset.astype(np.float32)
    scale[0], offset[0] = 1.0, 0.0
    dy = rng.normal(size=x.shape).astype(np.float32)
    q = lib.tfdq_affine_add_relu_quantize(x, scale, offset, b, d_a, q_max_a, d, q_max, signed_a=signed_a)
    gx, gscale, goffset, gb, gd_a, gq_a, gd, gq = (
        t.numpy()
        for t in lib.tfdq_affine_add_relu_quantize_grad(
            dy, x, scale, offset, b, d_a, q_max_a, d, q_max, signed_a=signed_a
        )
    )
    a = (tf.constant(x) * scale + offset).numpy()
    np.testing.assert_array_equal(a, ((x * scale).astype(np.float32) + offset).astype(np.float32))
    sep_q = lib.tfdq_add_relu_quantize(a, b, d_a, q_max_a, d, q_max, signed_a=signed_a)
    ga, sep_gb, *sep_scalars = (
        t.numpy()
        for t in lib.tfdq_add_relu_quantize_grad(dy, a, b, d_a, q_max_a, d, q_max, signed_a=signed_a)
    )
    _assert_bits_equal(q.numpy(), sep_q.numpy())
    _assert_bits_equal(gx, (tf.constant(ga) * scale).numpy())
    _assert_bits_equal(gb, sep_gb)
    for got, want in zip((gd_a, gq_a, gd, gq), sep_scalars):
        np.testing.assert_allclose(got, want, rtol=RTOL)
    ref = _ref_junction(dy.ravel(), a.ravel(), b.ravel(), d_a, q_max_a, signed_a, d, q_max)
    _assert_bits_equal(q.numpy().ravel(), ref[0])
    ga64 = ref[1].reshape(x.shape).astype(np.float64)
    want_scale, want_offset = np.sum(ga64 * x.astype(np.float64), axis=0), np.sum(ga64, axis=0)
    np.testing.assert_allclose(gscale, want_scale, rtol=RTOL, atol=1e-6 * np.abs(want_scale).max())
    np.testing.assert_allclose(goffset, want_offset, rtol=RTOL, atol=1e-6 * np.abs(want_offset).max())
    for got, want in zip((gd_a, gq_a, gd, gq), ref[3:]):
        np.testing.assert_allclose(got, want, rtol=RTOL)
    assert np.any(gb == 0) and np.any(gb != 0)


def _batchnorm_model():
    import keras  # noqa: PLC0415

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    y = keras.layers.BatchNormalization()(keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(x))
    x = keras.layers.ReLU()(keras.layers.Add()([y, x]))
    x = keras.layers.BatchNormalization()(
        keras.layers.Conv2D(5, 1, use_bias=False)(x)
    )  # signed quantizer after
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


def test_training_step_fuses_batchnorm_and_quantizer(lib):
    """In a traced training step a BatchNorm's output pass and the quantizer after it are
    one op (on a residual branch, one op with the junction); outputs and loss are bit for bit those of the separate ops, every
    gradient theirs within the summation order of the per-channel sums (1e-3 of the
    largest element)."""
    import keras  # noqa: PLC0415

    keras.utils.set_random_seed(1)  # the same model whatever ran before
    rng = np.random.default_rng(4)
    x = rng.normal(size=(16, 8, 8, 3)).astype(np.float32)
    y = rng.normal(size=(16, 3)).astype(np.float32)
    qmodel = tfdq.quantize_model(_batchnorm_model(), calibration_data=x)
    variables = qmodel.trainable_variables

    def traced():
        @tf.function
        def step(x, y):
            with tf.GradientTape() as tape:
                out = qmodel(x, training=True)
                loss = tf.reduce_mean((out - y) ** 2)
            return out, loss, tape.gradient(loss, variables)

        return step.get_concrete_function(x, y)

    fused = traced()
    kernels.FUSE_AFFINE = False
    try:
        separate = traced()
    finally:
        kernels.FUSE_AFFINE = True
    types = [op.type for op in fused.graph.get_operations()]
    # the first BatchNorm (unsigned, ReLU absorbed) and the last (signed); the middle one
    # is on the residual branch: its output pass is part of the junction's op
    assert types.count("TfdqAffineQuantizeGrad") == 2
    assert types.count("TfdqAffineAddReluQuantizeGrad") == 1 and "TfdqAddReluQuantize" not in types
    assert "TfdqAffineQuantize" not in [op.type for op in separate.graph.get_operations()]
    out_f, loss_f, grads_f = fused(x, y)
    out_s, loss_s, grads_s = separate(x, y)
    _assert_bits_equal(out_f.numpy(), out_s.numpy())
    assert float(loss_f) == float(loss_s)
    for v, gf, gs in zip(variables, grads_f, grads_s):
        gs = gs.numpy()
        # the per-channel sums are added in another order (double against float32) and
        # BatchNorm's backward pass subtracts nearly equal terms: the gradients differ
        # by up to 2e-4 of their largest element (seeds 0-5); a wrong term would be O(1)
        np.testing.assert_allclose(
            gf.numpy(), gs, rtol=1e-3, atol=1e-3 * np.abs(gs).max() + 1e-9, err_msg=v.path
        )


def test_affine_fusion_only_for_per_channel_scales(lib):
    """x * s + o with s or o a whole map (a gate, a second feature map) stays separate
    ops; per-channel s and o (shape [C] or [1, 1, C]) become the fused op, same values."""
    rng = np.random.default_rng(6)
    x = tf.constant(rng.normal(size=(4, 5, 8)).astype(np.float32))

    def traced(scale, offset):
        @tf.function
        def f(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                q = ops.uniform_quantize(x * scale + offset, 0.125, 1.5, signed=True)
            return q, tape.gradient(tf.reduce_sum(q), x)

        return f.get_concrete_function(x)

    vec = tf.constant(rng.uniform(0.5, 1.5, size=8).astype(np.float32))
    full = tf.constant(rng.uniform(0.5, 1.5, size=(4, 5, 8)).astype(np.float32))
    for scale, offset, fused in (
        (vec, vec, True),
        (tf.reshape(vec, [1, 1, 8]), -vec, True),
        (full, vec, False),
        (vec, full, False),
        (tf.constant(0.7), vec, False),  # one scale for all: not a per-channel map
    ):
        f = traced(scale, offset)
        types = [op.type for op in f.graph.get_operations()]
        assert ("TfdqAffineQuantize" in types) == fused
        q, gx = f(x)
        want = ops.uniform_quantize(x * scale + offset, 0.125, 1.5, signed=True)
        _assert_bits_equal(q.numpy(), want.numpy())


def test_affine_quantize_errors(lib):
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        lib.tfdq_affine_quantize(tf.zeros([4, 3]), tf.ones([4]), tf.zeros([3]), 0.5, 2.0)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        lib.tfdq_affine_quantize_grad(
            tf.zeros([4, 3]), tf.zeros([4, 2]), tf.ones([3]), tf.zeros([3]), 0.5, 2.0
        )
    q = lib.tfdq_affine_quantize(tf.zeros([0, 3]), tf.ones([3]), tf.zeros([3]), 0.5, 2.0)
    assert q.shape == (0, 3)
    gx, gs, go, gd, gq = lib.tfdq_affine_quantize_grad(
        tf.zeros([0, 3]), tf.zeros([0, 3]), tf.ones([3]), tf.zeros([3]), 0.5, 2.0
    )
    assert gx.shape == (0, 3) and gs.numpy().tolist() == [0.0] * 3 and float(gd) == 0.0


# ---------------------------------------------------------------------------
# shapes, dtypes, errors, XLA
# ---------------------------------------------------------------------------


def test_shape_functions(lib):
    @tf.function(input_signature=[tf.TensorSpec([None, 5], tf.float32)])
    def f(x):
        q = lib.tfdq_uniform_quantize(x, 0.5, 2.0, signed=True)
        gx, gd, gq = lib.tfdq_uniform_quantize_grad(x, x, q, 0.5, 2.0, signed=True)
        assert q.shape.as_list() == [None, 5] and gx.shape.as_list() == [None, 5]
        assert gd.shape.rank == 0 and gq.shape.rank == 0
        return q

    assert f(tf.zeros([3, 5])).shape == (3, 5)
    assert lib.tfdq_uniform_quantize(tf.zeros([0, 4]), 0.5, 2.0).shape == (0, 4)
    gx, gd, gq = lib.tfdq_uniform_quantize_grad(tf.zeros([0]), tf.zeros([0]), tf.zeros([0]), 0.5, 2.0)
    assert gx.shape == (0,) and float(gd) == 0.0 and float(gq) == 0.0


def test_errors(lib):
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        lib.tfdq_uniform_quantize(tf.zeros([4]), tf.constant([0.5, 0.5]), 2.0)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        lib.tfdq_uniform_quantize_grad(tf.zeros([4]), tf.zeros([3]), tf.zeros([4]), 0.5, 2.0)
    with pytest.raises(TypeError):
        kernels.uniform_quantize(tf.zeros([4], tf.float64), 0.5, 2.0)


def test_usable_only_for_float32_outside_xla_under_a_tape(lib):
    assert kernels.available()
    assert not kernels.usable(tf.zeros([2]))  # no tape: an inference graph
    with tf.GradientTape():
        assert kernels.usable(tf.zeros([2]))
        assert not kernels.usable(tf.zeros([2], tf.float64))
    seen = []

    @tf.function(jit_compile=True)
    def f(x):
        with tf.GradientTape():
            seen.append(kernels.usable(x))
        with pytest.raises(RuntimeError, match="XLA"):
            kernels.uniform_quantize(x, 0.5, 2.0)
        return x

    f(tf.zeros([2]))
    assert seen == [False]


# ---------------------------------------------------------------------------
# build, cache, fallback
# ---------------------------------------------------------------------------


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(kernels.ENV_ENABLE, "0")
    assert kernels.load() is None
    assert not kernels.available()
    assert not kernels.usable(tf.zeros([2]))
    with pytest.raises(RuntimeError, match="not available"):
        kernels.uniform_quantize(tf.zeros([2]), 0.5, 2.0)


def test_settings_scope_the_switches(monkeypatch):
    """tfdq.config: a settings block overrides the environment and is undone on exit."""
    monkeypatch.delenv(kernels.ENV_ENABLE, raising=False)
    assert tfdq.config.get("custom_kernels") and tfdq.config.get("fused")
    with tfdq.config.settings(custom_kernels=False):
        assert not kernels.usable(tf.zeros([2]))
        with tfdq.config.settings(fused=False, custom_kernels=True):
            assert not tfdq.config.get("fused") and tfdq.config.get("custom_kernels")
        assert not tfdq.config.get("custom_kernels") and tfdq.config.get("fused")
    assert tfdq.config.get("custom_kernels")
    monkeypatch.setenv("TFDQ_FUSED", "0")
    assert not tfdq.config.get("fused")
    with pytest.raises(ValueError, match="unknown tfdq setting"):
        tfdq.config.get("fast")
    with pytest.raises(TypeError, match="True or False"):
        with tfdq.config.settings(fused="no"):
            pass


def test_not_available_with_a_gpu(monkeypatch):
    real = tf.config.list_physical_devices
    monkeypatch.setitem(kernels._state, "gpu", None)
    monkeypatch.setattr(
        tf.config,
        "list_physical_devices",
        lambda kind=None: ["/physical_device:GPU:0"] if kind == "GPU" else real(kind),
    )
    assert not kernels.available()
    assert not kernels.usable(tf.zeros([2]))


def test_cache_location_and_key(monkeypatch, tmp_path):
    monkeypatch.setenv(kernels.ENV_CACHE, str(tmp_path))
    path = kernels.library_path()
    assert os.path.dirname(os.path.dirname(path)) == str(tmp_path)
    key = os.path.basename(os.path.dirname(path))
    assert key.startswith(f"tf{tf.__version__}-") and len(key.rsplit("-", 1)[1]) == 16
    monkeypatch.delenv(kernels.ENV_CACHE)
    default = os.path.join(os.path.expanduser("~"), ".cache", "tfdq", "kernels", key)
    assert os.path.dirname(kernels.library_path()) == default


def test_cached_library_is_not_rebuilt(lib):
    path = kernels.library_path()
    before = os.stat(path).st_mtime_ns
    assert kernels.build() == path
    assert os.stat(path).st_mtime_ns == before


def test_missing_compiler_warns_once_and_falls_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv(kernels.ENV_CACHE, str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setitem(kernels._state, "tried", False)
    monkeypatch.setitem(kernels._state, "module", None)
    with caplog.at_level(logging.WARNING, logger="tfdq"):
        assert kernels.load() is None
        assert kernels.load() is None
        assert not kernels.available()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0].getMessage()


def test_compile_error_is_reported_and_leaves_no_files(monkeypatch, tmp_path):
    if shutil.which(os.environ.get("CXX") or "g++") is None:
        pytest.skip("no C++ compiler")
    broken = tmp_path / "broken.cc"
    broken.write_text('#error "deliberately broken"\n')
    monkeypatch.setattr(kernels, "SOURCE", str(broken))
    target = tmp_path / "out" / "lib.so"
    with pytest.raises(kernels.KernelBuildError, match="deliberately broken"):
        kernels.build(str(target))
    assert sorted(os.listdir(target.parent)) == [".lock"]


_CONCURRENT_BUILD = """
import sys
from tfdq import kernels
module = kernels.load()
assert module is not None
print(module.tfdq_uniform_quantize([0.5, -1.25], 0.5, 1.0).numpy().tolist())
"""


@pytest.mark.slow
def test_concurrent_first_builds(tmp_path):
    """Two processes building into an empty cache: one compiles, both load it."""
    env = dict(os.environ, TFDQ_KERNEL_CACHE=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="2")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONCURRENT_BUILD],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert out.strip().splitlines()[-1] == "[0.5, -1.0]"
    (key,) = os.listdir(tmp_path)
    assert sorted(os.listdir(tmp_path / key)) == [
        ".lock",
        kernels.LIBRARY_NAME,
        kernels.LIBRARY_NAME + kernels.SIDECAR_SUFFIX,
    ]


# ---------------------------------------------------------------------------
# damaged caches (each test in a temporary TFDQ_KERNEL_CACHE)
# ---------------------------------------------------------------------------

_LOAD_AND_RUN = """
from tfdq import kernels
module = kernels.load()
assert module is not None
print(module.tfdq_uniform_quantize([0.5, -1.25], 0.5, 1.0).numpy().tolist())
"""


def _load_in_subprocess(cache):
    env = dict(os.environ, TFDQ_KERNEL_CACHE=str(cache), TF_CPP_MIN_LOG_LEVEL="2")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run(
        [sys.executable, "-c", _LOAD_AND_RUN], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )


def _copy_built_library(lib, cache, monkeypatch):
    """This build's library and sidecar, copied into the temporary cache ``cache``."""
    source = kernels.library_path()
    monkeypatch.setenv(kernels.ENV_CACHE, str(cache))
    target = kernels.library_path()
    os.makedirs(os.path.dirname(target))
    shutil.copy2(source, target)
    shutil.copy2(source + kernels.SIDECAR_SUFFIX, target + kernels.SIDECAR_SUFFIX)
    assert kernels.verified(target)
    return target


def test_sidecar_records_size_and_hash(lib, tmp_path, monkeypatch):
    path = _copy_built_library(lib, tmp_path, monkeypatch)
    size, digest = open(path + kernels.SIDECAR_SUFFIX).read().split()
    assert int(size) == os.path.getsize(path) and len(digest) == 64
    with open(path, "r+b") as f:  # same size, one byte changed
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert not kernels.verified(path)
    os.remove(path + kernels.SIDECAR_SUFFIX)
    assert not kernels.verified(path)


@pytest.mark.slow
def test_truncated_cached_library_is_rebuilt_not_loaded(lib, tmp_path, monkeypatch):
    """A library cut to 4 kB (a kill or a full disk mid-write) would make
    tf.load_op_library die with SIGBUS in every later process; it fails its
    sidecar check and is rebuilt, and stale build temporaries are removed."""
    path = _copy_built_library(lib, tmp_path, monkeypatch)
    with open(path, "r+b") as f:
        f.truncate(4096)
    stale = os.path.join(os.path.dirname(path), ".tfdq_kernels.abc123.so.tmp")
    open(stale, "wb").close()  # left by a build killed before its rename
    proc = _load_in_subprocess(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[0.5, -1.0]"
    assert "rebuilding" in proc.stderr
    assert kernels.verified(path) and os.path.getsize(path) > 4096
    assert not os.path.exists(stale)


@pytest.mark.slow
def test_another_valid_library_at_the_path_is_rebuilt(lib, tmp_path, monkeypatch):
    """A different, valid ELF library under the cached name (no ops of ours)
    is replaced by a real build instead of failing at the first op."""
    path = _copy_built_library(lib, tmp_path, monkeypatch)
    import ctypes.util

    other = ctypes.util.find_library("m") or "libm.so.6"
    for folder in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64"):
        if os.path.exists(os.path.join(folder, other)):
            shutil.copy(os.path.join(folder, other), path)
            break
    else:
        pytest.skip("no libm found to stand in as another library")
    proc = _load_in_subprocess(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[0.5, -1.0]"
    assert kernels.verified(path)


def test_inference_graphs_hold_no_tfdq_op(lib):
    """A concrete function of a tfdq model's forward pass uses no tfdq op (it
    runs with plain TensorFlow); under a tape the training step uses them."""
    import keras

    import tfdq

    inputs = keras.Input((6,))
    model = tfdq.quantize_model(keras.Model(inputs, keras.layers.Dense(3)(inputs)), "U3")
    x = tf.constant(np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32))

    def op_types(fn):
        graph = fn.get_concrete_function(tf.TensorSpec((None, 6), tf.float32)).graph
        found = set()
        for f in [graph, *graph._functions.values()]:
            g = getattr(f, "graph", f)
            found |= {op.type for op in g.get_operations()}
        for f in graph.as_graph_def().library.function:
            found |= {n.op for n in f.node_def}
        return found

    infer = op_types(tf.function(lambda t: model(t, training=False)))
    assert not {t for t in infer if t.startswith("Tfdq")}

    def train(t):
        with tf.GradientTape() as tape:
            y = model(t, training=True)
        return tape.gradient(y, model.trainable_variables)

    assert {"TfdqUniformQuantize", "TfdqUniformQuantizeGrad"} <= op_types(tf.function(train))
    np.testing.assert_array_equal(tf.function(lambda t: model(t))(x).numpy(), model(x).numpy())
