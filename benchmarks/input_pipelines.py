"""The training script's input pipelines before and after issue 16, side by side.

Two measurements, each alternating the two versions of ``train/data.py`` in
one process (``before``: the module as it was at commit ``BASE``, read with
``git show``; ``after``: the working tree), medians over ``--repeats``:

* **CIFAR-10 pass-boundary stall.** 50,000 random 32x32 images, PNG-encoded
  once (tensorflow-datasets stores CIFAR-10 as PNGs and decodes them on
  every read), served by ``tfds.testing.mock_data`` with CIFAR-10's feature
  specs. The training stream of ``data.load("cifar10", 128)`` is iterated
  for one pass and the first batch of the next by a consumer that sleeps
  ``--step_seconds`` after each batch in place of a training step (0: the
  pipeline alone, its worst case): the time of each ``next()`` is recorded. ``stall_seconds`` is the time of the batch
  that crosses into the second pass minus the median batch time: before,
  the second pass decodes all 50,000 PNGs again before its first batch;
  after, the decoded set is cached.
* **ImageNet images per second.** ``data.load("imagenet2012", 256,
  image_size=224)`` on ``tfds.testing.mock_data`` whose examples are drawn
  from a pool of ``--pool`` JPEGs of ImageNet-like sizes (encoded once,
  random smooth images, 300-500 pixels a side); training images per second
  over ``--imagenet_batches`` batches after a warm-up. The mock has no
  files, so both versions read through ``as_dataset``: this measures the
  decode-and-crop and the read-ahead of the next shuffle block, not the
  parallel file reads (which need the prepared TFRecords).

Generated data: these are pipeline timings, nothing about accuracy::

    python -m benchmarks.input_pipelines              # writes results/input_pipelines.json
    python -m benchmarks.input_pipelines --quick      # small sizes, to a temp folder
"""

import contextlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from benchmarks.common import RESULTS_DIR, write_result

FLAGS = flags.FLAGS
NAME = "input_pipelines"
BASE = "35370b7"  # main before issue 16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def old_data_module(base=BASE):
    """``train/data.py`` as it was at commit ``base``, imported under another name."""
    source = subprocess.run(
        ["git", "show", f"{base}:train/data.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    path = os.path.join(tempfile.mkdtemp(prefix="tfdq_old_data_"), "old_train_data.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("old_train_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _random_images(n, h, w, seed):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@contextlib.contextmanager
def mock_pool(encoded, labels, n_by_split):
    """tfds mock whose split ``s`` serves ``n_by_split[s]`` examples cycling
    through the pre-encoded images (decoded per read unless SkipDecoding)."""
    import tensorflow as tf  # noqa: PLC0415
    import tensorflow_datasets as tfds  # noqa: PLC0415

    pool = tf.constant(encoded)
    pool_labels = tf.constant(labels, tf.int64)

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False, **kwargs):
        del self, read_config, shuffle_files, kwargs
        n = n_by_split[
            "test" if "test" in str(split) else "validation" if "validation" in str(split) else "train"
        ]
        skip = decoders is not None and "image" in decoders

        def example(i):
            k = i % len(encoded)
            image = pool[k]
            if not skip:
                image = tf.io.decode_image(image, channels=3, expand_animations=False)
            return {"image": image, "label": pool_labels[k]}

        ds = tf.data.Dataset.range(n).map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.apply(tf.data.experimental.assert_cardinality(n))

    with tfds.testing.mock_data(num_examples=max(n_by_split.values()), as_dataset_fn=as_dataset):
        yield


def cifar_stall(modules, n_train, batch_size, repeats, data_dir, step_seconds=0.0):
    """Per version: batch times over one pass and the first batch of the next."""
    import tensorflow as tf  # noqa: PLC0415

    encoded = [tf.io.encode_png(x).numpy() for x in _random_images(n_train, 32, 32, 0)]
    labels = np.arange(n_train) % 10
    steps = n_train // batch_size
    boundary = steps  # batch index `steps` holds the last examples of pass 0 and the first of pass 1
    out = {name: [] for name in modules}
    with mock_pool(encoded, labels, {"train": n_train, "test": 1000}):
        for r in range(repeats):
            for name, module in modules.items():
                d = module.load("cifar10", batch_size, data_dir=data_dir, calibration_examples=8, seed=r)
                times = []
                it = iter(d.train)
                for _ in range(boundary + 2):
                    t = time.perf_counter()
                    next(it)
                    times.append(time.perf_counter() - t)
                    if step_seconds:
                        time.sleep(step_seconds)
                median = float(np.median(times[1:boundary]))
                out[name].append(
                    {
                        "first_batch_seconds": times[0],
                        "median_batch_seconds": median,
                        "boundary_batch_seconds": times[boundary],
                        "stall_seconds": times[boundary] - median,
                        "pass_seconds": float(np.sum(times[:boundary])),
                    }
                )
                print(
                    f"[cifar10 {name} #{r}] first {times[0]:.2f} s, median {median * 1e3:.1f} ms, "
                    f"boundary {times[boundary]:.2f} s",
                    flush=True,
                )
    return {name: _medians(rows) | {"repeats": rows} for name, rows in out.items()}


def imagenet_rate(modules, pool, batch_size, batches, repeats, data_dir):
    """Per version: training images per second of the ImageNet stream."""
    import tensorflow as tf  # noqa: PLC0415

    rng = np.random.default_rng(1)
    encoded, labels = [], []
    for k in range(pool):
        h, w = (int(v) for v in rng.integers(300, 501, size=2))
        smooth = np.cumsum(np.cumsum(rng.integers(-3, 4, size=(h, w, 3)), 0), 1)
        image = np.clip(128 + smooth % 120, 0, 255).astype(np.uint8)
        encoded.append(tf.io.encode_jpeg(image, quality=90).numpy())
        labels.append(k % 1000)
    out = {name: [] for name in modules}
    with mock_pool(encoded, labels, {"train": max(20_000, 4 * batch_size * batches), "validation": 1000}):
        for r in range(repeats):
            for name, module in modules.items():
                d = module.load(
                    "imagenet2012",
                    batch_size,
                    data_dir=data_dir,
                    image_size=224,
                    calibration_examples=8,
                    seed=r,
                )
                it = iter(d.train)
                for _ in range(2):  # warm-up: tracing, first shuffle block
                    next(it)
                t = time.perf_counter()
                for _ in range(batches):
                    next(it)
                seconds = time.perf_counter() - t
                out[name].append({"images_per_second": batches * batch_size / seconds, "seconds": seconds})
                print(f"[imagenet {name} #{r}] {batches * batch_size / seconds:.0f} images/s", flush=True)
    return {name: _medians(rows) | {"repeats": rows} for name, rows in out.items()}


def _medians(rows):
    return {k: float(np.median([row[k] for row in rows])) for k in rows[0]}


def run(
    n_train=50_000,
    cifar_batch=128,
    imagenet_batch=256,
    imagenet_batches=40,
    pool=64,
    repeats=3,
    out_dir=RESULTS_DIR,
    command_line=None,
    step_seconds=(0.0,),
    imagenet=True,
):
    import tensorflow as tf  # noqa: PLC0415

    sys.path.insert(0, ROOT)
    from tfdq.train import data as new_data  # noqa: PLC0415

    modules = {"before": old_data_module(), "after": new_data}
    data_dir = tempfile.mkdtemp(prefix="tfdq_pipelines_")
    del tf
    result = {
        "data": "generated images through tfds.testing.mock_data (timings of the pipelines; no accuracy)",
        "note": "machine shared with other work while measured: the ratios of the two versions, measured "
        "alternately in one process, are the reliable part",
        "before": f"train/data.py at commit {BASE}",
        "after": "train/data.py of this tree",
        "cifar10": {
            "settings": {
                "n_train": n_train,
                "batch_size": cifar_batch,
                "repeats": repeats,
                "step_seconds": list(step_seconds),
            }
        },
        "imagenet2012": {
            "settings": {
                "batch_size": imagenet_batch,
                "batches": imagenet_batches,
                "image_size": 224,
                "pool": pool,
                "repeats": repeats,
            }
        },
    }
    result["summary"] = {"cifar10_stall_seconds": {}}
    for step in step_seconds:
        c = cifar_stall(modules, n_train, cifar_batch, repeats, data_dir, step)
        result["cifar10"][f"step_seconds={step:g}"] = c
        result["summary"]["cifar10_stall_seconds"][f"step_seconds={step:g}"] = {
            "before": c["before"]["stall_seconds"],
            "after": c["after"]["stall_seconds"],
        }
    if imagenet:
        i = imagenet_rate(modules, pool, imagenet_batch, imagenet_batches, repeats, data_dir)
        result["imagenet2012"].update(i)
        result["summary"]["imagenet_images_per_second"] = {
            "before": i["before"]["images_per_second"],
            "after": i["after"]["images_per_second"],
            "ratio": i["after"]["images_per_second"] / i["before"]["images_per_second"],
        }
    write_result(out_dir, NAME, "input pipelines before/after issue 16", command_line, result)
    print(result["summary"], flush=True)
    return result


def define_flags():
    flags.DEFINE_boolean("quick", False, "Small sizes, results to a temporary folder.")
    flags.DEFINE_integer("repeats", 3, "Alternating repeats of each version.")
    flags.DEFINE_integer("n_train", 50_000, "CIFAR-10-shaped training images.")
    flags.DEFINE_integer("imagenet_batches", 40, "Timed ImageNet batches (of 256).")
    flags.DEFINE_list(
        "step_seconds", ["0", "0.05"], "Consumer sleep per batch (a training step's stand-in), each measured."
    )
    flags.DEFINE_boolean("imagenet", True, "Also measure the ImageNet pipeline.")


def main(argv):
    del argv
    if FLAGS.quick:
        run(
            n_train=2_000,
            imagenet_batch=16,
            imagenet_batches=4,
            pool=8,
            repeats=1,
            out_dir=tempfile.mkdtemp(prefix="tfdq_pipelines_quick_"),
            command_line=" ".join(["python -m benchmarks.input_pipelines", *sys.argv[1:]]),
        )
    else:
        run(
            n_train=FLAGS.n_train,
            imagenet_batches=FLAGS.imagenet_batches,
            repeats=FLAGS.repeats,
            command_line=" ".join(["python -m benchmarks.input_pipelines", *sys.argv[1:]]),
            step_seconds=[float(v) for v in FLAGS.step_seconds],
            imagenet=FLAGS.imagenet,
        )


if __name__ == "__main__":
    define_flags()
    app.run(main)
