"""Quick modes of the peer benchmarks (benchmarks/peers.py, latency.py, qat_step_time.py).

What runs in the plain test install: Keras 3's post-training quantization
peers, tfdq's constrained fine-tune, export and verification, and LiteRT
timing (slow set). tfmot needs tf_keras (its own environment, .venv-peers): its parts
are skipped here unless tf_keras and tfmot are importable.
"""

import importlib.util
import json
import os
import sys
import warnings

import numpy as np
import pytest

from benchmarks import latency, peers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_TFMOT = (
    importlib.util.find_spec("tf_keras") is not None
    and importlib.util.find_spec("tensorflow_model_optimization") is not None
)
NO_TFMOT = (
    "tf_keras / tensorflow-model-optimization are not installed in this environment (they need "
    "their own venv, .venv-peers; see benchmarks/tfkeras_models.py)"
)


@pytest.fixture(scope="module")
def peers_quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("peers")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Layer .* does not have a `quantize` method")
        payload = peers.run(str(out), quick=True, tfmot=False, keep_files=str(out / "files"))
    return out, payload


def test_peers_quick_writes_complete_json_and_png(peers_quick):
    out, payload = peers_quick
    with open(out / "peers_quick.json") as f:
        saved = json.load(f)
    for key in ("experiment", "machine", "tensorflow", "date", "command", "config", "summary", "per_seed"):
        assert key in saved
    assert set(saved["summary"]) == {"float", "keras_int8", "keras_int4", "tfdq_4bit"}
    for method, s in saved["summary"].items():
        assert 0.0 <= s["keras_accuracy"] <= 1.0, method
        assert s["weight_bytes"] > 0, method
    assert (out / "peers_quick.png").stat().st_size > 1000


def test_keras_ptq_stores_one_byte_per_int8_weight_and_half_per_int4(peers_quick):
    _, payload = peers_quick
    run = payload["per_seed"][0]
    int8, int4 = run["keras_int8"], run["keras_int4"]
    # Keras 3 quantizes Dense only; the convolutions stay float32.
    assert [n for n, l in int8["layers"].items() if l["policy"] != "float32"] == ["logits"]
    assert int8["layers"]["conv2"]["bytes"]["kernel"] == 4 * 3 * 3 * 16 * 32
    assert int8["quantized_kernel_weights"] == 1568 * 10
    assert int8["quantized_kernel_bytes_per_weight"] == pytest.approx(1.0)
    assert int4["quantized_kernel_bytes_per_weight"] == pytest.approx(0.5)
    # the total counts the float convolutions, the integer kernel and its scales
    assert int8["weight_bytes"] == 4 * (29658 - 15690) + 15680 + 4 * 10 + 4 * 10
    for r in (int8, int4):
        assert set(r["tflite"]) == {"plain", "optimize_default"}
        for attempt in r["tflite"].values():
            assert attempt["converted"] in (True, False)
            if attempt["converted"]:
                assert attempt["file_bytes"] > 0 and isinstance(attempt["integer"], bool)
            else:
                assert attempt["error"]
        assert isinstance(r["real_integer_tflite"], bool)


def test_tfdq_export_holds_integers_within_learned_bits(peers_quick):
    out, payload = peers_quick
    r = payload["per_seed"][0]["tfdq_4bit"]
    assert r["budget_met"] and r["weight_kb"] <= r["weight_target_kb"] + 1e-9
    assert r["integer"] and r["all_kernels_exact"]
    assert r["weight_bytes"] == pytest.approx(
        sum(
            {"conv1": 144, "conv2": 4608, "conv3": 9216, "logits": 15690}[n] * b
            for n, b in r["weight_bits"].items()
        )
        / 8
    )
    for name, k in r["kernels"].items():
        limit = 2 ** (int(k["bits"]) - 1) - 1
        assert k["allowed"] == [-limit, limit]
        assert -limit <= k["file_range"][0] <= k["file_range"][1] <= limit, name
        assert k["storage"] == ("int4" if k["bits"] <= 4 else "int8"), name
    # independently of verify: read the file's int4/int8 kernels back
    from tfdq.export.flatbuffer import inspect_tflite, unpack_integers

    with open(out / "files" / "tfdq_4bit_seed0.tflite", "rb") as f:
        tflite = f.read()
    info = inspect_tflite(tflite)
    largest = max(2 ** (int(b) - 1) - 1 for b in r["weight_bits"].values())
    kernels = [
        t for t in info["tensors"] if t["bytes"] and t["type"] in ("int4", "int8") and len(t["shape"]) >= 2
    ]
    assert len(kernels) == 4
    for t in kernels:
        values = unpack_integers(t, tflite)
        assert np.abs(values).max() <= (7 if t["type"] == "int4" else largest)
    n_int4 = sum(t["type"] == "int4" for t in kernels)
    assert n_int4 == sum(b <= 4 for b in r["weight_bits"].values())
    assert r["kernel_bytes_in_file"] == sum(t["bytes"] for t in kernels)
    assert 0.9 <= r["top1_agreement"] <= 1.0


# Slow (18 s of CPU: three ResNet-20 files built and converted, then timed). The default run
# checks what the files are made of: ResNet-20's all-integer export with exact kernels
# (test_export.py::test_resnet20_with_identity_shortcuts_and_add), int4 kernels in a mixed file
# (test_storage_policy.py), files run in LiteRT (test_runtime.py); the timings themselves are
# not a property a test can judge.
@pytest.mark.slow
def test_latency_quick_times_every_file(tmp_path):
    result = latency.run(quick=True, tfmot=False)
    json_path, png_path = latency.write(str(tmp_path), result)
    with open(json_path) as f:
        saved = json.load(f)
    for key in ("config", "file_bytes", "contents", "latency", "ratios", "targets", "build"):
        assert key in saved
    assert set(saved["latency"]) == {"float32", "tfdq_int8", "tfdq_mixed"}
    for name, per_threads in saved["latency"].items():
        assert set(per_threads) == {"1_thread", "2_threads"}
        for v in per_threads.values():
            assert v["median_ms"] > 0 and v["samples"] == 10, name
    sizes = saved["file_bytes"]
    assert sizes["tfdq_mixed"] < sizes["tfdq_int8"] < sizes["float32"]
    assert saved["contents"]["tfdq_int8"]["integer"] and saved["contents"]["tfdq_mixed"]["integer"]
    assert not saved["contents"]["float32"]["integer"]
    assert saved["contents"]["tfdq_mixed"]["weight_bytes_by_type"].get("int4", 0) > 0
    assert "int4" not in saved["contents"]["tfdq_int8"]["weight_bytes_by_type"]
    exports = saved["build"]["tfdq"]["exports"]
    assert exports["tfdq_int8"]["all_kernels_exact"] and exports["tfdq_mixed"]["all_kernels_exact"]
    assert saved["ratios"]["float32 / tfdq_int8 latency, 1 thread"] > 0
    assert saved["ratios"]["tfdq_int8 / tfmot_int8 latency, 1 thread"] is None
    assert saved["targets"]["tfdq_mixed / tfmot_int8 file size"]["status"] == "not measured"
    assert saved["build"]["tfmot_error"]
    assert os.path.getsize(png_path) > 1000


@pytest.mark.skipif(HAVE_TFMOT, reason="tfmot is importable here: the tfmot test below runs instead")
def test_tfmot_parts_report_why_they_cannot_run_here():
    problem = peers.peers_env_problem(os.path.join(ROOT, "no-such-venv", "bin", "python"))
    assert "not found" in problem and "tensorflow-model-optimization" in problem


@pytest.mark.skipif(not HAVE_TFMOT, reason=NO_TFMOT)
def test_tfmot_qat_worker_writes_an_integer_tflite(tmp_path):
    import keras

    import tfdq
    from benchmarks.tfkeras_models import save_weights

    weights = save_weights(tfdq.models.small_cnn(), str(tmp_path / "w.npz"))
    result, error = peers.run_peers_worker(
        [
            "--task",
            "mnist_qat",
            "--weights",
            weights,
            "--out_dir",
            str(tmp_path),
            "--epochs",
            "1,0",
            "--train_limit",
            "256",
        ],
        python=sys.executable,
    )
    assert error is None, error
    with open(result["tflite_path"], "rb") as f:
        desc = peers.describe_tflite(f.read())
    assert desc["integer"] and desc["weight_bytes_by_type"].get("int8", 0) >= 29658 - 10
    keras.backend.clear_session()
