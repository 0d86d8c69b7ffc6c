"""tfdq.plot_bitwidths draws what tfdq.summary computes, with the budgets as lines."""

import keras
import numpy as np
import pytest

import tfdq
from tfdq import plot as plot_lib


def _model():
    inp = keras.Input((8, 8, 3), name="img")
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inp)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = keras.layers.ReLU(name="r2")(x)
    x = keras.layers.Flatten(name="flat")(x)
    return keras.Model(inp, keras.layers.Dense(5, name="fc")(x))


@pytest.fixture
def qmodel():
    q = tfdq.quantize_model(_model(), calibration_data=np.random.default_rng(0).uniform(size=(4, 8, 8, 3)))
    fc = q.get_layer("fc").kernel_quantizer
    fc.param("q_max").assign(fc.describe()["d"])  # fc at 2 bits, the others at 4: the bars must differ
    return tfdq.constrain(q, weight_kb=0.9, activation_kb=0.2, activation="max")


def test_bars_and_budget_lines_equal_the_summary(qmodel, monkeypatch):
    figures = []
    monkeypatch.setattr(plot_lib, "save_figure", lambda fig, path: figures.append(fig) or path)
    assert tfdq.plot_bitwidths(qmodel, "unused.png") == "unused.png"
    (fig,) = figures
    rows = tfdq.summary(qmodel, print_fn=None)[:-1]
    weights = [r for r in rows if r["kind"] == "weight"]
    acts = [r for r in rows if r["kind"] == "activation"]
    w_bits, w_kb, a_bits, a_kb = fig.axes[:4]

    def bars(ax):
        return [p.get_height() for p in ax.patches]

    assert bars(w_bits) == pytest.approx([r["bits"] for r in weights])
    assert bars(w_bits) == pytest.approx([4, 4, 2])
    assert bars(w_kb) == pytest.approx([r["kb"] for r in weights])
    assert bars(a_bits) == pytest.approx([r["bits"] for r in acts])
    assert bars(a_kb) == pytest.approx([r["kb"] for r in acts])
    # twin axes hold the running totals; the (8a) target is a horizontal line on the weight total's axis
    twins = fig.axes[4:]
    hlines = {
        round(line.get_ydata()[0], 6)
        for ax in twins + [a_kb]
        for line in ax.get_lines()
        if len(set(np.ravel(line.get_ydata()))) == 1 and line.get_linestyle() == "--"
    }
    assert 0.9 in hlines  # (8a), against the running weight total
    assert 0.2 in hlines  # (8c), against each activation bar
    w_total = twins[0].get_lines()[0].get_ydata()
    assert w_total[-1] == pytest.approx(sum(r["kb"] for r in weights))
    # the input image's quantizer is drawn but not added to the activation total (as in the budgets)
    a_total = twins[1].get_lines()[0].get_ydata()
    assert a_total[-1] == pytest.approx(sum(r["kb"] for r in acts if not r["input"]))


def test_writes_a_png_and_refuses_a_float_model(qmodel, tmp_path):
    path = tmp_path / "sub" / "bits.png"
    assert tfdq.plot_bitwidths(qmodel, str(path)) == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["bits.png"]  # no temporary left behind
    inp = keras.Input((3,))
    with pytest.raises(ValueError, match="quantize_model"):
        tfdq.plot_bitwidths(keras.Model(inp, keras.layers.ReLU()(inp)), str(tmp_path / "f.png"))
