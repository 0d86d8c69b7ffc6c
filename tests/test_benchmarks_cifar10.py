"""The paper's ResNet-20 CIFAR-10 runs (benchmarks.cifar10_recipes): the command
table, and its ``--quick`` mode in-process (mock runs and a tiny timing).

The quick run trains on ``tfds.testing.mock_data``; the checks are about what
the runs did (stages, bitwidths, budgets, export, timings), never accuracy.
It is marked slow: four ResNet-20 runs, three of them quantized with export,
plus four timing runs cost about 150 s of CPU on 2 cores (most of it tracing;
the budgeted U3 run alone about 45 s), over 4 minutes on a busy machine. Run
it with ``pytest -m slow tests/test_benchmarks_cifar10.py``.
"""

import json
import shlex

import pytest
from absl import flags

from benchmarks import cifar10_recipes as bench
from tfdq.train import config as cfg

RESNET20_WEIGHTS = 268_346


def parse_command(text):
    """``tfdq-train ...`` parsed by absl flags defined as tfdq.train.train defines them:
    (all values, names given on the command line)."""
    argv = shlex.split(text)
    assert argv[0] == "tfdq-train"
    fv = flags.FlagValues()
    for name, (default, help_text) in cfg.FIELDS.items():
        kind = cfg.TYPES.get(name, type(default))
        define = {bool: flags.DEFINE_boolean, int: flags.DEFINE_integer, float: flags.DEFINE_float}.get(
            kind, flags.DEFINE_string
        )
        define(name, default, help_text, flag_values=fv)
    fv(["train"] + argv[1:])
    return {n: fv[n].value for n in cfg.FIELDS}, {n for n in cfg.FIELDS if fv[n].present}


def test_commands_parse_back_to_the_table_and_pass_validation(tmp_path):
    assert [r["name"] for r in bench.RUNS] == ["float", "fixed24", "tqt24", "learned8a8c"]
    assert [r["paper_error"] for r in bench.RUNS] == [7.29, 11.30, 9.62, 8.58]
    text = bench.commands_text()
    for run in bench.RUNS:
        cmd = bench.command(run)
        assert cmd in text.splitlines()
        values, given = parse_command(cmd)
        assert given == set(run["flags"])
        for key, want in run["flags"].items():
            assert values[key] == want and type(values[key]) is type(want), key
        config = cfg.resolve({k: values[k] for k in given})
        # the paper's schedule comes from the cifar10 recipe
        assert (config["batch_size"], config["optimizer"], config["weight_decay"]) == (128, "sgd", 2e-4)
        assert (config["float_epochs"], config["quant_epochs"], config["lr_decay_at"]) == (
            160,
            160,
            "0.5,0.75",
        )
        if run["name"] == "float":
            assert values["stages"] == "float" and not values["init_checkpoint"]
        else:
            assert values["stages"] == "quant,export"
            assert (
                values["init_checkpoint"]
                == bench.run_by_name("float")["flags"]["model_dir"] + "/float/best.keras"
            )
            ckpt = tmp_path / "final.keras"
            ckpt.write_bytes(b"")
            config["init_checkpoint"] = str(ckpt)
        assert cfg.validate(config) == bench.stage_names(run)
    fixed, tqt, learned = (bench.run_by_name(n)["flags"] for n in ("fixed24", "tqt24", "learned8a8c"))
    for f, kind in ((fixed, "fixed"), (tqt, "tqt")):
        assert (f["weight_quantizer"], f["activation_quantizer"], f["weight_bits"], f["activation_bits"]) == (
            kind,
            kind,
            2,
            4,
        )
        assert f["target_weight_kb"] == f["target_activation_kb"] == 0
    assert (
        learned["target_weight_kb"],
        learned["target_activation_kb"],
        learned["activation_constraint"],
    ) == (70.1, 8.1, "max")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("cifar10_recipes")
    bench.run(
        ("mock", "time"),
        bench.QUICK["mock"],
        bench.QUICK["time"],
        out_dir=str(out),
        command_line="python -m benchmarks.cifar10_recipes --quick",
    )
    with open(out / "cifar10_recipes.json") as f:
        report = json.load(f)
    assert report["command"] == "python -m benchmarks.cifar10_recipes --quick"
    assert report["machine"] and report["date"]
    return report, out


@pytest.mark.slow
def test_quick_mock_runs(quick):
    report, _ = quick
    mock = report["mock"]
    assert "never a CIFAR-10 result" in mock["data"]
    runs = {r["name"]: r for r in mock["runs"]}
    assert list(runs) == [r["name"] for r in bench.RUNS]
    for run in bench.RUNS:
        r = runs[run["name"]]
        assert "failed" not in r, r.get("failed")
        assert r["finished_stages"] == bench.stage_names(run) == r["stages"]
        # the script ran with the table's flags (paths and the small schedule aside)
        for key, want in run["flags"].items():
            if key not in ("model_dir", "init_checkpoint"):
                assert r["flags_json"][key] == want, key
        assert r["flags_json"]["steps_per_epoch"] == bench.QUICK["mock"]["steps"]
        assert 0.0 <= r["mock_data_numbers"]["float_accuracy"] <= 1.0
        assert r["mock_data_numbers"]["selection"] == "paper" and r["mock_data_numbers"]["paper_rule"]
        if "export" in r["stages"]:
            assert r["tflite_written"] and r["tflite_bytes"] > 10_000 and not r["export_error"]
            q = r["quantized_model"]
            assert q["weight_count"] == RESNET20_WEIGHTS
            assert len(q["weight_bits"]) == 20 and len(q["activation_bits"]) == 19  # 19 ReLU outputs
    for name in ("fixed24", "tqt24"):
        q = runs[name]["quantized_model"]
        assert set(q["weight_bits"].values()) == {2.0}
        # the image stays float, as in the reference code
        assert set(q["activation_bits"].values()) == {4.0} and q["input_bits"] == {}
        assert q["budget"] is None
        n = runs[name]["mock_data_numbers"]
        # 2-bit weights and 4-bit activations: the paper's 65.5 kB / 8 kB max / 92 kB sum
        assert n["weight_kb"] == pytest.approx(RESNET20_WEIGHTS * 2 / 8192)
        assert (n["activation_kb_max"], n["activation_kb_sum"]) == (8.0, 92.0)
        assert n["constraints_met"] == {}
    learned = runs["learned8a8c"]
    assert learned["quantized_model"]["budget"]["weight_kb"] == 70.1
    assert learned["quantized_model"]["budget"]["activation_kb"] == 8.1
    assert learned["quantized_model"]["budget"]["activation"] == "max"
    n = learned["mock_data_numbers"]
    assert (n["target_weight_kb"], n["target_activation_kb"], n["activation_constraint"]) == (
        70.1,
        8.1,
        "max",
    )
    assert set(n["constraints_met"]) == {"weight", "activation"}
    assert learned["quantized_model"]["weight_quantizers"] == ["U3"]
    assert all(2.0 <= b <= 8.0 for b in learned["quantized_model"]["weight_bits"].values())


@pytest.mark.slow
def test_quick_timing(quick):
    report, out = quick
    t = report["timing"]
    q = bench.QUICK["time"]
    assert [r["name"] for r in t["runs"]] == list(q["runs"])
    assert [(r["name"], r["pipeline"]) for r in t["before"]] == [("float", "before")]
    assert t["settings"]["epoch_steps"] == 391
    assert t["settings"]["pass_boundary_steps"] == [4]  # 16 examples, batches of 4: step 5 starts pass 2
    for r in t["runs"] + t["before"]:
        assert (
            r["steps"] == q["steps"]
            and len(r["step_wall_seconds"]) == len(r["step_cpu_seconds"]) == q["steps"]
        )
        assert 0 < r["stage_seconds"] <= r["run_wall_seconds"] and r["run_cpu_seconds"] > 0
        values, _ = parse_command(r["command"])
        assert values["stages"] == r["stage"] and values["batch_size"] == q["batch_size"]
        assert r["validation_seconds_per_epoch"] > 0
        # the derived numbers follow from the measured steps of the same run
        steady = r["step_wall_seconds"][1:]
        assert r["seconds_per_step"] == pytest.approx(sum(steady) / len(steady), rel=1e-3)
        assert r["seconds_per_step"] > 0 and r["cpu_seconds_per_step"] > 0
        assert r["fixed_seconds"] == pytest.approx(r["stage_seconds"] - sum(steady), abs=1e-3)
        assert list(r["pass_boundary_stall_seconds"]) == ["4"]
        per_step, val = r["seconds_per_step"], r["validation_seconds_per_epoch"]
        assert r["epoch_train_seconds"] == pytest.approx(391 * per_step)
        assert r["epoch_seconds"] == pytest.approx(r["fixed_seconds"] + 391 * per_step + val)
        assert r["epoch_seconds_kind"].startswith("extrapolated")  # 5 steps, not a real epoch
        assert r["paper_epochs"] == 160
        assert r["full_schedule_hours"] * 3600 == pytest.approx(
            r["fixed_seconds"] + 160 * (391 * per_step + val)
        )
    assert t["runs"][0]["step_over_float"] == 1.0
    assert (out / "cifar10_recipes.png").stat().st_size > 5_000


def test_pass_boundary_steps_are_the_batches_that_start_a_new_pass():
    # CIFAR-10, batch 128: batch 390 (0-based) holds examples 49,920-50,047, the first 48 of pass 2
    assert bench.pass_boundary_steps(391, 128, 50_000) == [390]
    assert bench.pass_boundary_steps(390, 128, 50_000) == []
    assert bench.pass_boundary_steps(782, 128, 50_000) == [390, 781]
    # passes that end exactly at a batch: the first batch of each later pass
    assert bench.pass_boundary_steps(9, 4, 16) == [4, 8]
    # against a direct count: the pass of each batch's first and last example
    for steps, batch, n in ((50, 7, 30), (20, 5, 11), (12, 16, 16)):
        want = [
            k
            for k in range(1, steps)
            if ((k + 1) * batch - 1) // n != (k * batch) // n or (k * batch) % n == 0
        ]
        assert bench.pass_boundary_steps(steps, batch, n) == want


def test_step_statistics_come_from_one_run_and_stay_positive_when_load_changes():
    # steps of one run: tracing first, a load change halfway (steps twice as slow), a 12 s
    # stall at the pass boundary; the old two-run difference went negative in such cases
    wall = [9.0] + [0.3] * 200 + [0.6] * 189 + [12.6]
    cpu = [5.0] + [0.25] * 389 + [10.25]
    boundary = bench.pass_boundary_steps(391, 128, 50_000)
    stage = 30.0 + sum(wall[1:])
    s = bench.step_statistics(wall, cpu, stage, boundary)
    steady = wall[1:]
    assert s["seconds_per_step"] == pytest.approx(sum(steady) / 390) and s["seconds_per_step"] > 0
    assert s["median_seconds_per_step"] == pytest.approx(0.3)
    assert s["cpu_seconds_per_step"] == pytest.approx(0.25 + 10.0 / 390)
    assert s["median_cpu_seconds_per_step"] == pytest.approx(0.25)
    assert s["pass_boundary_stall_cpu_seconds"] == {390: pytest.approx(10.0)}
    assert s["fixed_seconds"] == pytest.approx(30.0)
    assert s["first_step_seconds"] == 9.0
    assert s["pass_boundary_steps"] == [390]
    assert s["pass_boundary_stall_seconds"] == {390: pytest.approx(12.3)}
    assert s["max_stall_seconds"] == pytest.approx(12.3)
    assert s["slowest_other_step_seconds"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="at least 2"):
        bench.step_statistics([1.0], [1.0], 1.0, [])
