"""Gaussian toy experiment (Fig. 3 of the paper): reduced run of benchmarks.gaussian."""

import json

import pytest

from benchmarks import gaussian

RTOL = 0.02  # "not worse than the best other parametrization" within 2 %
OSC_ATOL = 1e-6


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gaussian")
    report = gaussian.run(**gaussian.QUICK, out_dir=str(out_dir), verbose=False)
    return report, out_dir


def test_report_has_expected_keys(quick_report):
    report, out_dir = quick_report
    with open(out_dir / "gaussian.json") as f:
        saved = json.load(f)
    assert (out_dir / "gaussian.png").stat().st_size > 10_000
    assert saved["checks"] == report["checks"]
    assert {"experiment", "config", "results", "checks", "versions", "seconds"} <= set(saved)
    assert {"steps", "lr", "seeds", "n_samples", "max_bits", "init_bits"} <= set(saved["config"])
    assert set(saved["results"]) == set(gaussian.NAMES)
    steps = saved["config"]["steps"]
    for name, r in saved["results"].items():
        assert {
            "final_mse",
            "oscillation",
            "min_mse",
            "final_bits",
            "max_bits_seen",
            "final_params",
            "init_params",
            "mse",
            "per_seed",
        } <= set(r), name
        assert len(r["mse"]) == steps + 1
        assert r["final_mse"] == pytest.approx(r["mse"][-1])
        assert {"bits", "q_max"} <= set(r["final_params"])
        # Same bit budget for everyone: the comparison is about parametrization.
        assert r["max_bits_seen"] <= saved["config"]["max_bits"], name
    assert {"uniform", "pow2", "paper_ordering_holds", "failures"} <= set(saved["checks"])


def test_paper_ordering(quick_report):
    report, _ = quick_report
    res = report["results"]
    for mine, others in (("U3", ("U1", "U2")), ("P3", ("P1", "P2"))):
        best = min(res[o]["final_mse"] for o in others)
        assert res[mine]["final_mse"] <= best * (1 + RTOL), (
            mine,
            {n: res[n]["final_mse"] for n in (mine, *others)},
        )
        calmest = min(res[o]["oscillation"] for o in others)
        assert res[mine]["oscillation"] <= calmest + OSC_ATOL, (
            mine,
            {n: res[n]["oscillation"] for n in (mine, *others)},
        )


def _summary(mse, osc):
    return {"final_mse": mse, "oscillation": osc}


def test_check_ordering_accepts_and_rejects():
    good = {
        "U1": _summary(0.024, 3e-3),
        "U2": _summary(0.023, 1e-3),
        "U3": _summary(0.0211, 0.0),
        "P1": _summary(0.0410, 0.0),
        "P2": _summary(0.0414, 6e-3),
        "P3": _summary(0.0412, 0.0),
    }
    assert gaussian.check_ordering(good) == []
    worse_mse = dict(good, U3=_summary(0.9, 0.0))
    assert any("U3 final MSE" in f for f in gaussian.check_ordering(worse_mse))
    oscillating = dict(good, P3=_summary(0.0410, 1e-3))
    assert any("P3 oscillation" in f for f in gaussian.check_ordering(oscillating))
