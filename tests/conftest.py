"""Shared test setup: quiet TensorFlow, deterministic seeds, repo root on sys.path."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    yield
    keras.backend.clear_session()


# TFDQ_TEST_CPU_TIMES=path.json records each test's CPU seconds (this process and the
# subprocesses it waited for, setup included): a cost that does not depend on what else
# the machine runs, for deciding what belongs in the slow set.
_CPU_TIMES_PATH = os.environ.get("TFDQ_TEST_CPU_TIMES")
if _CPU_TIMES_PATH:
    import json  # noqa: E402
    import time  # noqa: E402

    _cpu_times = {}

    def _cpu_now():
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        start, wall = _cpu_now(), time.perf_counter()
        yield
        _cpu_times[item.nodeid] = {
            "cpu_s": round(_cpu_now() - start, 2),
            "wall_s": round(time.perf_counter() - wall, 2),
        }
        with open(_CPU_TIMES_PATH, "w") as f:
            json.dump(_cpu_times, f, indent=0)
