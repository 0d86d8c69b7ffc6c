"""The README's demo on real data: learned U3 quantization keeps float accuracy."""

import pytest

from tfdq.train import demo


# Slow (22 s of CPU; fewer epochs save little: 4 + 1 cost 20 s). The default run checks the same claim
# on the same network, data and quantize_model call (U3 weights and activations, with a weight
# budget on top): test_export.py::test_trained_mnist_cnn_fidelity_short.
@pytest.mark.slow
def test_mnist_u3_weights_and_activations_within_one_point_of_float():
    r = demo.run(float_epochs=6, quant_epochs=2, verbose=0)
    # held-out accuracy on 1,000 real MNIST digits
    assert r["float_accuracy"] > 0.85
    assert r["quantized_accuracy"] >= r["float_accuracy"] - 0.01, r
    bits = [row["bits"] for row in r["summary"] if row["kind"] != "total"]
    assert all(1 <= b <= 8 for b in bits)
