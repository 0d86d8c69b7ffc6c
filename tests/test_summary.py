"""tfdq.summary and the size accounting on hand-computed models."""

import keras
import numpy as np
import pytest

import tfdq


def _model():
    inp = keras.Input((8, 8, 3), name="img")
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inp)  # 4*(3*9+1) = 112 weights
    x = keras.layers.ReLU(name="r1")(x)  # 8*8*4 = 256 values
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)  # 4*9 + 4 = 40 weights
    x = keras.layers.ReLU(name="r2")(x)  # 256 values
    x = keras.layers.Flatten(name="flat")(x)
    out = keras.layers.Dense(5, name="fc")(x)  # 5*(256+1) = 1285 weights
    return keras.Model(inp, out)


def test_summary_rows_match_hand_computed_sizes(capsys):
    q = tfdq.quantize_model(_model(), calibration_data=np.random.default_rng(0).uniform(size=(4, 8, 8, 3)))
    rows = tfdq.summary(q)
    printed = capsys.readouterr().out
    assert "conv" in printed and "weights: 1437 params" in printed
    by_name = {r["name"]: r for r in rows if r["kind"] != "total"}
    assert by_name["conv"]["count"] == 112
    assert by_name["dw"]["count"] == 40
    assert by_name["fc"]["count"] == 1285
    assert by_name["r1_aq"]["count"] == 256 and by_name["r2_aq"]["count"] == 256
    assert by_name["img_aq"]["input"] and by_name["img_aq"]["count"] == 192
    for r in by_name.values():
        assert r["bits"] == 4
        assert r["kb"] == pytest.approx(r["count"] * 4 / 8 / 1024)
    total = rows[-1]
    assert total["weight_count"] == 1437
    assert total["weight_kb"] == pytest.approx(1437 * 4 / 8192)
    # the input image is reported but not counted in (8b)/(8c)
    assert total["activation_kb_sum"] == pytest.approx(512 * 4 / 8192)
    assert total["activation_kb_max"] == pytest.approx(256 * 4 / 8192)
    # bitwidths follow the quantizers: move one layer to 2 bits
    fc = q.get_layer("fc").kernel_quantizer
    d = fc.describe()["d"]
    fc.param("q_max").assign(d)  # q_max = d -> b = 2
    total = tfdq.summary(q, print_fn=None)[-1]
    assert total["weight_kb"] == pytest.approx((152 * 4 + 1285 * 2) / 8192)


def test_unquantized_layers_count_at_32_bits():
    inp = keras.Input((10, 4))
    x = keras.layers.Conv1D(3, 3, name="c1d")(inp)  # 3*(4*3) + 3 = 39 float weights
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(2, name="fc")(x)  # 2*(24+1) = 50
    with pytest.warns(UserWarning):
        q = tfdq.quantize_model(keras.Model(inp, out))
    total = tfdq.summary(q, print_fn=None)[-1]
    assert total["weight_kb"] == pytest.approx((39 * 32 + 50 * 4) / 8192)
