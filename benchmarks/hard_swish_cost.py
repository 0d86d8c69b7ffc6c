"""Training-step cost of ``tfdq.layers.QHardSwish`` (LiteRT's int8 HARD_SWISH levels in Keras).

Two quantized ``keras.applications.MobileNetV3Small`` (32x32x3, 10 classes, 19 hard-swishes) built
alike, one with its QHardSwish layers computing the kernel's levels (as ``quantize_model`` makes
them), one with them falling back to the float hard-swish; Adam, batch 64, generated integer
pixels (a timing, not an accuracy). After 3 warm-up steps each, rounds of 10 steps alternate
between the two; CPU time (``time.process_time``) and wall time per step, medians over rounds.
Writes ``results/hard_swish_cost.json``::

    python -m benchmarks.hard_swish_cost             # 5 rounds (about 2 min on 2 shared cores)
"""

import sys
import time

import numpy as np

from benchmarks.common import RESULTS_DIR, write_result


def _model(emulate, x):
    import keras  # noqa: PLC0415

    import tfdq  # noqa: PLC0415
    from tfdq import layers as qlayers  # noqa: PLC0415

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV3Small(
        weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None
    )
    qmodel = tfdq.quantize_model(model, calibration_data=x[:128], strict=True)
    if not emulate:
        for layer in qmodel.layers:
            if isinstance(layer, qlayers.QHardSwish):
                layer.learned_quantizers = lambda: None  # the float hard-swish
    qmodel.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return qmodel


def main(rounds=5):
    from tfdq import layers as qlayers  # noqa: PLC0415

    rng = np.random.default_rng(0)
    x = np.round(rng.uniform(0, 255, (128, 32, 32, 3))).astype(np.float32)
    y = rng.integers(0, 10, 128)
    models = {"emulated": _model(True, x), "float": _model(False, x)}
    xb, yb = x[:64], y[:64]
    for m in models.values():
        for _ in range(3):
            m.train_on_batch(xb, yb)
    times = {k: [] for k in models}
    for _ in range(rounds):
        for name, m in models.items():
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(10):
                m.train_on_batch(xb, yb)
            times[name].append(((time.process_time() - cpu) / 10, (time.perf_counter() - wall) / 10))
    cpu = {k: float(np.median([c for c, _ in v])) for k, v in times.items()}
    wall = {k: float(np.median([w for _, w in v])) for k, v in times.items()}
    payload = {
        "model": "MobileNetV3Small 32x32x3, batch 64, Adam",
        "qhardswish_layers": sum(isinstance(l, qlayers.QHardSwish) for l in models["emulated"].layers),
        "rounds": rounds,
        "cpu_s_per_step": cpu,
        "wall_s_per_step": wall,
        "cpu_ratio_emulated_over_float": cpu["emulated"] / cpu["float"],
        "wall_ratio_emulated_over_float": wall["emulated"] / wall["float"],
    }
    print(payload)
    write_result(
        RESULTS_DIR,
        "hard_swish_cost",
        "QHardSwish training-step cost",
        "python -m benchmarks.hard_swish_cost",
        payload,
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
