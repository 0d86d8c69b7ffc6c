"""The MNIST default of tfdq.train.train, shortened, end to end from the command line."""

import json
import os
import struct
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(args, timeout=600):  # a guard against hangs: about 30 s on 2 idle cores
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(
        [sys.executable, "-m", "tfdq.train", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def event_tags(directory):
    """Scalar tags in the TensorBoard event files under ``directory``."""
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    tags = set()
    for root, _, files in os.walk(directory):
        for name in files:
            if name.startswith("events.out.tfevents"):
                for record in tf.data.TFRecordDataset(os.path.join(root, name)):
                    event = event_pb2.Event.FromString(record.numpy())
                    tags.update(v.tag for v in event.summary.value)
    return tags


def export_available():
    try:
        import tfdq.export  # noqa: F401
    except ImportError:
        return False
    return True


def test_mnist_default_shortened_end_to_end(tmp_path):
    model_dir = tmp_path / "mnist"
    args = [
        f"--model_dir={model_dir}",
        "--float_epochs=2",
        "--quant_epochs=2",
        "--steps_per_epoch=20",
        "--val_examples=300",
        "--export_examples=200",
        "--verbose=2",
    ]
    proc = run_cli(args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "tfdq training summary: mnist / small_cnn" in proc.stdout

    with open(model_dir / "summary.json") as f:
        s = json.load(f)
    assert s["float_accuracy"] > 0.5 and s["quant_accuracy"] > 0.3  # 40 float steps, 40 quantized
    assert s["target_weight_kb"] == 8.0 and s["target_activation_kb"] == 4.6  # the MNIST recipe
    assert set(s["constraints_met"]) == {"weight", "activation"}
    assert 2.0 <= s["mean_weight_bits"] <= 8.0 and s["weight_kb"] < s["float_weight_kb"]
    # learned multipliers and a final phase (the second epoch): the final model meets both
    # targets by itself, with the slack used
    with open(model_dir / "quant" / "result.json") as f:
        qr = json.load(f)
    assert qr["final_feasible"] is True and s["quant_final_feasible"] is True
    assert set(qr["final_sizes"]) == {"weight", "activation"}
    for c in qr["final_sizes"].values():
        assert 0.9 <= c["ratio"] <= 1.0 and c["size_kb"] <= c["target_kb"], qr["final_sizes"]

    # outputs of each stage
    for stage in ("float", "quant"):
        d = model_dir / stage
        assert (d / "final.keras").exists() and (d / "result.json").exists()
        with open(d / "history.json") as f:
            assert [h["epoch"] for h in json.load(f)] == [1, 2]
        assert (d / "history.csv").read_text().splitlines()[0].startswith("epoch,")
        assert any(n.startswith("ckpt-e000002-s000000") for n in os.listdir(d / "checkpoints"))
    # the paper's rule for float (the default --selection): the best epoch; the final model's number
    # next to it (the stage and its selection are the same for every data set; this is the default
    # run's check of them)
    with open(model_dir / "float" / "result.json") as f:
        fr = json.load(f)
    with open(model_dir / "float" / "history.json") as f:
        hist = json.load(f)
    assert fr["best_val_accuracy"] == max(h["val_accuracy"] for h in hist)
    assert fr["final_val_accuracy"] == hist[-1]["val_accuracy"]
    assert fr["chosen"].endswith("best.keras") and s["float_accuracy"] == fr["best_val_accuracy"]
    assert s["float_accuracy_final"] == fr["final_val_accuracy"] and "paper_rule" in s
    text = (model_dir / "summary.txt").read_text()
    assert "paper's rule" in text and "final model" in text
    tags = event_tags(model_dir / "quant" / "logs")
    assert {"epoch_bits/conv1", "epoch_bits/relu1_aq", "epoch_weight_kb", "epoch_accuracy"} <= tags
    assert "epoch_accuracy" in event_tags(model_dir / "quant" / "logs" / "validation")
    png = (model_dir / "quant" / "bitwidths.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24])[0] > 300
    assert "weights:" in (model_dir / "quant" / "summary.txt").read_text()
    with open(model_dir / "flags.json") as f:
        assert json.load(f)["quant_epochs"] == 2

    if export_available() and not s.get("export_note"):
        assert (model_dir / "export" / "model.tflite").exists()
        assert 0.0 <= s["tflite_accuracy"] <= 1.0
        assert (model_dir / "export" / "report.json").exists()
    else:
        assert s.get("export_note"), "the summary says why there is no .tflite"

    # the same flags again: everything is done, nothing is retrained. Run in this process (the
    # command's main() hands its flags to this same run()), which spares a second start of
    # TensorFlow and a second read of MNIST; test_train_resume.py runs the command itself again
    from tfdq.train import train as train_lib  # noqa: PLC0415

    given = {a[2:].split("=")[0]: a.split("=", 1)[1] for a in args}
    values = {k: (v if k == "model_dir" else int(v)) for k, v in given.items()}
    lines = []
    again = train_lib.run(values, print_fn=lines.append)
    out = "\n".join(lines)
    assert "[float] already finished" in out and "[quant] already finished" in out, out
    assert again["quant_accuracy"] == s["quant_accuracy"] and again["constraints_met"] == s["constraints_met"]


@pytest.mark.slow
def test_mnist_default_full_recipe_meets_budget_with_high_accuracy(tmp_path):
    """The README's main-job command (about 2 minutes here)."""
    proc = run_cli([f"--model_dir={tmp_path / 'm'}"], timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    with open(tmp_path / "m" / "summary.json") as f:
        s = json.load(f)
    assert s["float_accuracy"] > 0.94
    assert all(s["constraints_met"].values()), s["constraints_met"]
    # the final model meets both targets by itself (learned multipliers, final phase) at 95-100%
    with open(tmp_path / "m" / "quant" / "result.json") as f:
        qr = json.load(f)
    assert qr["final_feasible"] is True and qr["final_val_accuracy"] > 0.93
    for c in qr["final_sizes"].values():
        assert 0.95 <= c["ratio"] <= 1.0, qr["final_sizes"]
    assert s["quant_accuracy"] > 0.93
    if s.get("tflite_accuracy") is not None:
        assert s["tflite_accuracy"] > 0.92
