"""ResNet-20 on the MNIST subset at the paper's budgets (``benchmarks.resnet20_mnist``).

The configuration is checked against analytic counts (the 32x32 input made
of the padded 28x28 digits, the 70 kB / 8 kB budgets from the layer shapes);
a tiny-schedule run checks that the learned run ends inside both budgets,
with the achieved sizes recomputed from the learned bits.
"""

import json

import numpy as np
import pytest

from benchmarks import mnist_runs, resnet20_mnist

BITS_PER_KB = 8192


def resnet20_weight_count(in_channels=1, classes=10):
    """Kernels (no conv bias) + the Dense layer of the paper's ResNet-20, by hand."""
    n = 3 * 3 * in_channels * 16  # stem
    channels = 16
    for filters in (16, 32, 64):
        for _ in range(3):
            n += 3 * 3 * channels * filters + 3 * 3 * filters * filters
            channels = filters
    return n + 64 * classes + classes


def test_resnet20_input_is_the_padded_digit():
    (xt, yt), (xv, _) = mnist_runs.load_data(n_train=16, n_test=4, model="resnet20")
    (xt28, yt28), _ = mnist_runs.load_data(n_train=16, n_test=4)
    assert xt.shape == (16, 32, 32, 1) and xv.shape == (4, 32, 32, 1) and xt28.shape == (16, 28, 28, 1)
    np.testing.assert_array_equal(xt[:, 2:30, 2:30], xt28)  # the digit, centred
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert not np.any(xt[:, border])  # 2 zero pixels on every side
    np.testing.assert_array_equal(yt, yt28)
    assert mnist_runs.build_model("resnet20").input_shape == (None, 32, 32, 1)
    with pytest.raises(ValueError, match="resnet20"):
        mnist_runs.build_model("resnet18")


def test_resnet20_budgets_are_the_papers_70_and_8_kb():
    counts = mnist_runs.feature_counts("resnet20")
    n = sum(counts["weights"].values())
    assert n == resnet20_weight_count() == 268058
    assert max(counts["activations"].values()) == 32 * 32 * 16  # the stem's feature map
    weight_kb, act_kb, kind = mnist_runs.budget_targets(resnet20_mnist.config("learned (8a)+(8c)"), counts)
    assert kind == "max"
    assert weight_kb == pytest.approx(1.07 * 2 * n / BITS_PER_KB) and abs(weight_kb - 70.0) < 0.05
    assert act_kb == 8.0


def test_resnet20_configurations():
    learned = resnet20_mnist.config("learned (8a)+(8c)")
    assert (
        learned["weight"] == learned["activation"] == "U3" and "lam" not in learned
    )  # automatic multipliers
    assert learned["activation_budget"] == ("max", 4)
    for row, kind, bits in (
        ("fixed 2/4", "fixed", 2),
        ("TQT 2/4", "tqt", 2),
        ("fixed 4/4", "fixed", 4),
        ("TQT 4/4", "tqt", 4),
    ):
        c = resnet20_mnist.config(row)
        assert (c["weight"], c["weight_bits"], c["activation"], c["activation_bits"]) == (kind, bits, kind, 4)
        assert "weight_budget_bits" not in c
    with pytest.raises(ValueError, match="Unknown row"):
        resnet20_mnist.config("learned (8a)")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("resnet20")
    report = resnet20_mnist.run(
        seeds=(0,),
        float_epochs=0,
        quant_epochs=1,
        finish_epochs=1,
        rows=("learned (8a)+(8c)",),
        n_train=64,
        n_test=64,
        out_dir=str(out),
        name="r20",
    )
    return report, out


@pytest.mark.slow  # trains a budgeted ResNet-20 (minutes on 2 cores)
def test_resnet20_learned_run_ends_inside_both_budgets(tiny_run):
    report, out = tiny_run
    with open(out / "r20.json") as f:
        assert json.load(f)["complete"]
    s = report["settings"]
    assert s["input_shape"] == [32, 32, 1] and s["n_train"] == 64 and s["n_test"] == 64
    (run,) = report["runs"]
    assert "failed" not in run and not run["diverged"] and run["multipliers"] != "fixed"
    assert run["constraints_met"] == {"weight": True, "activation": True}
    assert report["learned_feasible"] == [
        {"seed": 0, "constraints_met": {"weight": True, "activation": True}, "failed": None}
    ]
    # the achieved sizes again, from the learned bits and the analytic counts
    counts = mnist_runs.feature_counts("resnet20")
    weight_kb = sum(run["weight_bits"][k] * n for k, n in counts["weights"].items()) / BITS_PER_KB
    act_max_kb = max(run["activation_bits"][k] * n for k, n in counts["activations"].items()) / BITS_PER_KB
    assert weight_kb == pytest.approx(run["weight_kb"]) and weight_kb <= s["budget_weight_kb"] + 1e-9
    assert act_max_kb == pytest.approx(run["activation_kb_max"]) and act_max_kb <= 8.0
    assert 0.0 <= run["error"] <= 1.0


@pytest.mark.slow  # trains a budgeted ResNet-20 (minutes on 2 cores)
def test_resnet20_merge_of_per_seed_results(tiny_run):
    report, out = tiny_run
    merged = resnet20_mnist.merge(["r20"], out_dir=str(out), name="merged")
    assert merged["complete"] and merged["settings"]["seeds"] == [0]
    assert merged["summary"] == report["summary"] and merged["runs"] == report["runs"]


def _record(name, seed, err, weight_kb, met=None):
    r = {
        "name": name,
        "seed": seed,
        "error": err,
        "weight_kb": weight_kb,
        "mean_weight_bits": 8192 * weight_kb / 268058,
    }
    r.update(activation_kb_sum=92.0, activation_kb_max=8.0, diverged=False)
    if met is not None:
        r.update(targets={"weight_kb": 70.02, "activation_kb": 8.0}, constraints_met=met)
    return r


def test_resnet20_table_from_per_seed_records():
    ok, over = {"weight": True, "activation": True}, {"weight": True, "activation": False}
    errors = {"learned (8a)+(8c)": (0.02, 0.03, 0.025), "fixed 2/4": (0.04, 0.05, 0.09)}
    records = [
        _record("learned (8a)+(8c)", s, e, 69.9, ok if s else over)
        for s, e in enumerate(errors["learned (8a)+(8c)"])
    ]
    records += [_record("fixed 2/4", s, e, 65.44) for s, e in enumerate(errors["fixed 2/4"])]
    settings = {
        "configurations": ["learned (8a)+(8c)", "fixed 2/4"],
        "input_shape": [32, 32, 1],
        "n_train": 4000,
    }
    settings.update(n_test=1000, seeds=[0, 1, 2], budget_weight_kb=70.02, budget_activation_kb_max=8.0)
    sizes = {
        "weight_kb": 1047.1,
        "activation_kb_max": 64.0,
        "activation_kb_sum": 736.0,
        "mean_weight_bits": 32.0,
    }
    report = resnet20_mnist.build_payload(settings, sizes, [], records, 1.0)
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
        for line in resnet20_mnist.markdown_table(report).splitlines()[2:]
    }
    for name, errs in errors.items():
        e = 100 * np.asarray(errs)
        want = f"{e.mean():.2f} +- {e.std():.2f} [{e.min():.2f}, {e.max():.2f}]"
        assert rows[name][1:3] == ["3", want]
    assert rows["learned (8a)+(8c)"][3:] == ["69.90", "8.00", f"{8192 * 69.9 / 268058:.2f}", "2/3"]
    assert rows["fixed 2/4"][-1] == "-" and "float" not in rows
    text = resnet20_mnist.format_report(report)
    assert "learned seed 0: constraints met {'weight': True, 'activation': False}" in text


def test_resnet20_float_model_has_batchnorm_statistics_of_the_data():
    # momentum 0.99 does not settle in a short run: train_float re-estimates them
    import keras

    data = mnist_runs.load_data(n_train=16, n_test=8, model="resnet20")
    model, err, _ = mnist_runs.train_float(0, data, epochs=0, model="resnet20")
    conv = keras.Model(model.input, model.get_layer("stem_conv").output)
    z = np.asarray(conv(data[0][0]), np.float64).reshape(-1, 16)
    bn = model.get_layer("stem_bn")
    np.testing.assert_allclose(np.asarray(bn.moving_mean), z.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.moving_variance), z.var(0), rtol=1e-3)
    assert 0.0 <= err <= 1.0
