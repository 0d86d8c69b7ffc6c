"""Requantizing int8 RELUs (output scale != input scale) rewritten to round once, as the Keras quantizer
does (tfdq.export.relus): all 256 levels in LiteRT, and a model whose ReLU reads a sum on a finer grid."""

import keras
import numpy as np
import pytest

import tfdq
import tfdq.export as E
import tfdq.export.convert as convert
from tfdq.export.relus import chain_model, reference, relus_round_once, run_levels


@pytest.mark.parametrize("kind", ["RELU", "RELU6"])
def test_every_int8_level_rounds_once_after_the_rewrite(kind):
    """A lone RELU from scale 2^-6 onto 2^-6 * 2^n: LiteRT's kernel rounds twice for n >= 2 (k + 3/8
    steps -> k + 1 at n = 3); the rewritten file gives the float64 single rounding (half away) on all
    256 inputs, with and without the XNNPACK delegate, and leaves an already exact RELU as it is."""
    s_in = 2.0**-6
    rewritten_any = False
    for n in range(1, 7):
        for z_in, z_out in ((0, -128), (-5, 3), (-128, -128), (20, -100)):
            s_out = s_in * 2**n
            want = reference(kind, s_in, z_in, s_out, z_out)
            original = chain_model((s_in, z_in), [(kind, s_out, z_out)])
            wrong = int(np.sum(run_levels(original, xnnpack=False) != want))
            assert (wrong > 0) == (n >= 2), (n, z_in, z_out, wrong)
            rewritten, entries = relus_round_once(original)
            assert len(entries) == 1 and entries[0]["ratio"] == 2.0**-n
            assert entries[0]["form"] == ("RELU + QUANTIZE" if n >= 2 else "kept"), entries
            rewritten_any |= rewritten != original
            for xnnpack in (False, True):
                np.testing.assert_array_equal(run_levels(rewritten, xnnpack), want)
    assert rewritten_any


def _finer_sum_model():
    """Xception's pattern: a sum read by a ReLU (a coarser grid) and by the next sum."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inp)
    r = keras.layers.Conv2D(8, 1, use_bias=False)(inp)
    s = keras.layers.Add()([h, r])
    a = keras.layers.Activation("relu", name="relu")(s)
    t = keras.layers.Add()([keras.layers.Conv2D(8, 1, use_bias=False)(a), s])
    return keras.Model(inp, [a, t])


def _relu_integers(tflite, x, xnnpack=True):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType  # noqa: PLC0415

    kwargs = (
        {} if xnnpack else {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    )
    it = Interpreter(model_content=tflite, **kwargs)
    inp = it.get_input_details()[0]
    it.resize_tensor_input(inp["index"], list(x.shape))
    it.allocate_tensors()
    s, zp = inp["quantization"]
    it.set_tensor(inp["index"], np.clip(np.floor(x / s + 0.5) + zp, -128, 127).astype(np.int8))  # x >= 0
    it.invoke()
    (out,) = [o for o in it.get_output_details() if o["name"] == "Relu"]
    scale, zero_point = out["quantization"]
    return np.array(it.get_tensor(out["index"])).astype(np.int64) - zero_point, scale


def test_relu_reading_a_finer_sum_gives_keras_integers(monkeypatch):
    """The ReLU's map is on 1/8 (its learned step 2^-3) of the sum's grid (2^-6): the file's int8 map
    equals Keras' integers on every element in LiteRT as the project runs it (XNNPACK); without the
    rewrite it does not (the RELU's double rounding). (LiteRT's builtin CONV_2D kernel alone already
    differs from XNNPACK on the convolutions here, so only the delegated run is compared.)"""
    x = np.random.default_rng(0).uniform(0, 1, (64, 8, 8, 3)).astype("float32")
    qmodel = tfdq.quantize_model(_finer_sum_model(), calibration_data=x)
    step = 2.0**-3
    for v in qmodel.get_layer("relu_aq").weights:  # an 8-bit unsigned map on a step of 2^-3
        v.assign(step if v.path.endswith("/d") else 255 * step)
    assert qmodel.get_layer("relu_aq").quantizer.describe()["d"] == step
    keras_map = np.asarray(qmodel.predict(x, verbose=0)[0], np.float64) / step
    np.testing.assert_array_equal(keras_map, np.round(keras_map))  # on the grid
    tflite, report = E.to_tflite(qmodel, x, return_report=True)
    assert report["calibrated"] == []
    assert [(r["op"], r["ratio"], r["form"]) for r in report["relus"]] == [("RELU", 0.125, "RELU + QUANTIZE")]
    got, scale = _relu_integers(tflite, x, xnnpack=True)
    assert scale == step
    np.testing.assert_array_equal(got, keras_map)
    monkeypatch.setattr(convert, "relus_round_once", lambda b: (b, []))
    got, _ = _relu_integers(E.to_tflite(qmodel, x), x, xnnpack=True)
    assert np.sum(got != keras_map) > 0 and np.max(np.abs(got - keras_map)) == 1
