import numpy as np
import tensorflow as tf

from tfdq import ops


def test_uniform_forward_matches_float64_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=2000).astype(np.float32) * 2
    d, q_max = 0.125, 0.9
    got = ops.uniform_quantize(tf.constant(x), d, q_max).numpy()
    c = np.clip(x.astype(np.float64), -q_max, q_max)
    want = d * np.sign(c) * np.floor(np.abs(c) / d + 0.5)
    np.testing.assert_array_equal(got, want.astype(np.float32))
