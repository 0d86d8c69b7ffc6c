"""benchmarks/peers_hgq.py: HGQ2 and QKeras beside tfdq at the same weight memory.

HGQ2 and qkeras-v3 live in their own environment (``.venv-hgq``, see
benchmarks/hgq_worker.py); without it only the cheap check runs, and the
worker test is skipped.
"""

import os

import numpy as np
import pytest

from benchmarks import peers_hgq

HAVE_ENV = os.path.exists(peers_hgq.HGQ_PYTHON)  # cheap; the imports are checked inside the slow test


def test_missing_hgq_environment_is_reported_with_its_setup_command(tmp_path):
    problem = peers_hgq.env_problem(str(tmp_path / "no-such-venv" / "bin" / "python"))
    assert "not found" in problem
    assert "hgq2==0.2.0" in problem and "--target .venv-hgq/qkeras-v3 qkeras-v3==1.2.1" in problem


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_ENV, reason=f"{peers_hgq.HGQ_PYTHON} not found (see benchmarks/hgq_worker.py)")
def test_workers_count_stored_bits_and_report_the_tflite_they_get(tmp_path):
    problem = peers_hgq.env_problem()
    if problem:
        pytest.skip(f"HGQ2 / qkeras-v3 environment unusable: {problem}")
    import keras

    import tfdq
    from benchmarks.tfkeras_models import save_weights

    keras.utils.set_random_seed(0)
    weights = save_weights(tfdq.models.small_cnn(), str(tmp_path / "w.npz"))
    rng = np.random.default_rng(0)
    x = rng.random((256, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, 256).astype(np.int32)
    data = str(tmp_path / "d.npz")
    np.savez(data, xt=x, yt=y, xv=x[:64], yv=y[:64])
    common = dict(
        weights=weights, data_npz=data, seed=0, epochs=(1, 0), tmp=str(tmp_path), x=x[:64], y=y[:64]
    )
    common.update(python=peers_hgq.HGQ_PYTHON, qkeras_path=peers_hgq.QKERAS_PATH)

    qk = peers_hgq.worker_run("qkeras", bits=2, **common)
    assert "error" not in qk, qk.get("error")
    assert qk["weight_bytes"] == 2 * peers_hgq.N_WEIGHTS / 8
    # a signed 2-bit grid holds three values per channel
    assert max(qk["max_levels_per_channel"].values()) <= 3
    assert isinstance(qk["real_integer_tflite"], bool)

    hg = peers_hgq.worker_run("hgq", target_kb=7.75, **common)
    assert "error" not in hg, hg.get("error")
    # b0 = 1.49 rounds to b = 1 (sign apart): 2 stored bits per kernel weight before training; the
    # 10 classifier biases keep HGQ2's default bias quantizer (b = 8, plus the sign)
    assert hg["start_weight_kb"] == pytest.approx((2 * (peers_hgq.N_WEIGHTS - 10) + 9 * 10) / 8192)
    assert hg["weight_bytes"] == pytest.approx(hg["mean_weight_bits"] * peers_hgq.N_WEIGHTS / 8)
    assert all(0.0 <= b <= 24 for b in hg["layer_mean_bits"].values())
    assert isinstance(hg["real_integer_tflite"], bool)
