"""tfdq.train.train: bad input fails before any training, with a message that says what to do."""

import json
import os
import subprocess
import sys

import pytest

from tfdq.train import config as cfg
from tfdq.train import data as data_lib
from tfdq.train import train as train_lib
from tfdq.train.checkpoint import RunDirError, claim_model_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, **values):
    values.setdefault("model_dir", str(tmp_path / "run"))
    values.setdefault("verbose", 0)
    return train_lib.run(values, print_fn=lambda *a: None)


@pytest.mark.parametrize(
    "values, words",
    [
        ({"dataset": "svhn"}, ["--dataset='svhn'", "mnist, cifar10, imagenet2012"]),
        ({"model": "vgg16"}, ["--model='vgg16'", "resnet20"]),
        ({"weight_quantizer": "U4"}, ["--weight_quantizer='U4'", "U3"]),
        ({"activation_quantizer": "log2"}, ["--activation_quantizer='log2'"]),
        ({"stages": "quant"}, ["--init_checkpoint"]),
        ({"stages": "quant,export", "init_checkpoint": "/nonexistent/float.keras"}, ["does not exist"]),
        ({"quantize_activations": False}, ["--target_activation_kb", "--noquantize_activations"]),
        ({"weight_quantizer": "fixed"}, ["fixed", "learned parametrization"]),
        ({"activation_constraint": "mean"}, ["max", "sum"]),
        ({"optimizer": "rmsprop"}, ["sgd or adam"]),
        ({"strategy": "tpu_pod"}, ["--strategy"]),
        ({"stages": "export,float"}, ["order"]),
        ({"lr_decay_at": "0.9,0.5"}, ["--lr_decay_at"]),
        ({"weight_bits": 1}, ["--weight_bits"]),
        ({"strategy": "multi_worker"}, ["TF_CONFIG"]),
        ({"loop": "fit", "strategy": "multi_worker", "worker_hosts": "a:1,b:2"}, ["20585"]),
    ],
)
def test_bad_flags_fail_before_training(tmp_path, values, words):
    with pytest.raises(cfg.ConfigError) as info:
        _run(tmp_path, **values)
    for word in words:
        assert word in str(info.value), str(info.value)
    assert not (tmp_path / "run").exists()  # nothing created


def test_missing_model_dir():
    with pytest.raises(cfg.ConfigError, match="--model_dir is required"):
        train_lib.run({"verbose": 0})


def test_budget_below_the_reachable_minimum_fails_before_training(tmp_path):
    # small_cnn at 2 bits everywhere: 7.24 kB of weights
    with pytest.raises(cfg.ConfigError, match="smallest weight size"):
        _run(tmp_path, target_weight_kb=5.0)
    assert not (tmp_path / "run").exists()


def test_data_set_not_on_this_machine_says_how_to_provide_it(tmp_path):
    with pytest.raises(data_lib.DataUnavailableError) as info:
        _run(tmp_path, dataset="cifar10", data_dir=str(tmp_path / "tfds"), download=False)
    text = str(info.value)
    assert "cifar10" in text and "download_and_prepare" in text and "--data_dir" in text
    with pytest.raises(data_lib.DataUnavailableError) as info:
        _run(tmp_path, dataset="imagenet2012", data_dir=str(tmp_path / "tfds"), download=False)
    assert "--manual_dir" in str(info.value) and "ILSVRC2012_img_train.tar" in str(info.value)
    assert not (tmp_path / "run").exists()


def test_a_failed_download_becomes_a_clear_error(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    def no_network(self, *args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_network)
    with pytest.raises(data_lib.DataUnavailableError) as info:
        data_lib.check_available("cifar10", data_dir=str(tmp_path / "tfds"))
    assert "ConnectionError" in str(info.value) and "copy the folder" in str(info.value)
    with pytest.raises(data_lib.DataUnavailableError, match="does not exist"):
        data_lib.check_available(
            "imagenet2012", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "none")
        )


def test_model_dir_with_other_flags_is_refused(tmp_path):
    model_dir = tmp_path / "run"
    stored = cfg.resolve({"model_dir": str(model_dir), "quant_epochs": 3})
    claim_model_dir(str(model_dir), stored)
    before = (model_dir / "flags.json").read_text()
    with pytest.raises(RunDirError) as info:
        _run(tmp_path, quant_epochs=4)
    assert "--quant_epochs: this run 4, stored run 3" in str(info.value)
    assert (model_dir / "flags.json").read_text() == before
    # flags that may change on resumption are ignored
    assert claim_model_dir(str(model_dir), dict(stored, verbose=2), cfg.RESUME_IGNORE) is True


def test_foreign_non_empty_model_dir_is_refused(tmp_path):
    model_dir = tmp_path / "mine"
    model_dir.mkdir()
    (model_dir / "notes.txt").write_text("my thesis")
    with pytest.raises(RunDirError, match="not a tfdq training run"):
        _run(tmp_path, model_dir=str(model_dir))
    assert sorted(os.listdir(model_dir)) == ["notes.txt"]


def test_recipes_fill_the_paper_schedule_for_cifar10():
    c = cfg.resolve({"dataset": "cifar10", "model_dir": "x"})
    assert (c["model"], c["batch_size"], c["float_epochs"], c["quant_epochs"]) == ("resnet20", 128, 160, 160)
    assert (c["optimizer"], c["momentum"], c["weight_decay"]) == ("sgd", 0.9, 2e-4)
    assert (c["float_lr"], c["quant_lr"]) == (0.1, 0.01)
    # lr / 10 after epochs 80 and 120 of 160
    assert [f * 160 for f in cfg.decay_fractions(c["lr_decay_at"])] == [80, 120]
    assert cfg.resolve({"dataset": "cifar10", "batch_size": 32})["batch_size"] == 32  # flags win
    assert cfg.resolve({"dataset": "imagenet2012"})["model"] == "resnet18"


def test_memory_weights_learned_by_default_on_mnist_fixed_lambda_as_the_paper():
    """The mnist recipe learns the constraints' multipliers and ends with a final phase
    (so its final model meets both targets); the paper's fixed-lambda penalty is
    --multipliers=fixed (or --lam alone), the cifar10 and imagenet2012 recipes' choice."""
    c = cfg.resolve({"model_dir": "x"})
    assert (c["multipliers"], c["lam"], c["finish_epochs"]) == ("auto", None, 2)  # 20% of 10 epochs
    assert cfg.resolve({"quant_epochs": 1})["finish_epochs"] == 0  # fixed after the epoch
    assert cfg.resolve({"quant_epochs": 3})["finish_epochs"] == 1
    f = cfg.resolve({"multipliers": "fixed"})
    assert (f["multipliers"], f["lam"], f["finish_epochs"]) == ("fixed", 1.0, 0)  # the recipe's lambda
    g = cfg.resolve({"lam": 2.0})
    assert (g["multipliers"], g["lam"], g["finish_epochs"]) == ("fixed", 2.0, 0)
    h = cfg.resolve({"multipliers": "fixed", "finish_epochs": 3})
    assert h["finish_epochs"] == 3
    r = cfg.resolve({"dataset": "cifar10"})
    assert (r["multipliers"], r["lam"], r["finish_epochs"]) == ("fixed", 0.1, 0)
    assert cfg.resolve({"dataset": "cifar10", "multipliers": "auto"})["finish_epochs"] == 32
    with pytest.raises(cfg.ConfigError, match="--multipliers=fixed"):
        cfg.resolve({"multipliers": "auto", "lam": 1.0})
    for bad, word in (({"multipliers": "pid"}, "--multipliers"), ({"finish_epochs": 11}, "--finish_epochs")):
        with pytest.raises(cfg.ConfigError, match=word):
            cfg.validate(cfg.resolve(dict({"model_dir": "x"}, **bad)))


def test_the_quant_stage_constrains_as_the_flags_say():
    """--multipliers=auto: tfdq.constrain's learned multipliers; fixed: the paper's penalty
    with --lam; the final phase as a FinishInsideBudget over the stage's absolute epochs."""
    import keras  # noqa: PLC0415

    from tfdq.train import models as models_lib  # noqa: PLC0415

    float_model = models_lib.build("small_cnn", (28, 28, 1), 10)
    auto = train_lib.quantize(cfg.resolve({"model_dir": "x"}), float_model, None)
    b = auto.memory_budget
    assert (b.multipliers, b.weight_kb, b.activation_kb, b.activation) == ("auto", 8.0, 4.6, "max")
    fixed = train_lib.quantize(cfg.resolve({"model_dir": "x", "lam": 2.0}), float_model, None)
    b = fixed.memory_budget
    assert (b.multipliers, b.weight_lambda, b.activation_lambda, b.finish) == ("fixed", 2.0, 2.0, None)
    finisher = train_lib.final_phase_callback(cfg.resolve({"model_dir": "x"}), 10, None, 0)
    assert (finisher.first_final_epoch, finisher.total_epochs) == (8, 10)
    at_end = train_lib.final_phase_callback(cfg.resolve({"quant_epochs": 1}), 1, None, 0)
    assert (at_end.first_final_epoch, at_end.total_epochs) == (1, 1)
    assert train_lib.final_phase_callback(cfg.resolve({"lam": 1.0}), 10, None, 0) is None
    keras.backend.clear_session()


def test_lr_schedule_divides_by_ten_at_the_boundaries():
    c = cfg.resolve({"dataset": "cifar10", "model_dir": "x"})
    opt = train_lib.make_optimizer(c, 0.1, 160, 10)
    lr = opt.learning_rate
    sched = opt._learning_rate
    values = [float(sched(step)) for step in (0, 799, 801, 1199, 1201)]
    assert values == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])
    assert float(lr) == pytest.approx(0.1)


def test_command_line_reports_errors_with_exit_code_2(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-m", "tfdq.train", f"--model_dir={tmp_path / 'r'}", "--model=alexnet"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: Unknown --model='alexnet'" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_flags_file_round_trips(tmp_path):
    c = cfg.resolve({"model_dir": str(tmp_path / "r")})
    claim_model_dir(str(tmp_path / "r"), c)
    with open(tmp_path / "r" / "flags.json") as f:
        assert json.load(f) == c
