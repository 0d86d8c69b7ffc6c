"""Shared set-up of the tests that run ``tfdq.train.train.run`` in-process.

``run`` is the training script's entry with a temporary run folder and no
printing; ``run_on_mock`` runs it on ``tfds.testing.mock_data`` (random
examples with the real feature specs, no network) with the smallest settings
that still take every path of a stage: a few batches of 4 images, a few
validation and calibration examples. Each test passes what it checks on top.
"""

from tfdq.train import train as train_lib

# examples in each mocked split, and the tiny run that fits them
MOCK_EXAMPLES = {"cifar10": 16, "imagenet2012": 8}
TINY = {
    "cifar10": dict(batch_size=4, steps_per_epoch=1, val_examples=8, calibration_examples=8),
    "imagenet2012": dict(
        image_size=32, batch_size=4, steps_per_epoch=1, val_examples=4, calibration_examples=4
    ),
}


def run(tmp_path, **values):
    """``train.run(values)`` with the run folder ``tmp_path/run`` (unless given), quiet, data
    under ``tmp_path/tfds``; returns the run's summary."""
    values.setdefault("model_dir", str(tmp_path / "run"))
    values.setdefault("verbose", 0)
    values.setdefault("data_dir", str(tmp_path / "tfds"))
    return train_lib.run(values, print_fn=lambda *a: None)


def run_on_mock(tmp_path, dataset, **values):
    """``run`` on mocked ``dataset`` ("cifar10" or "imagenet2012") with ``TINY[dataset]``'s
    settings, ``values`` overriding them."""
    import tensorflow_datasets as tfds  # noqa: PLC0415 (heavy import, only for the mocked runs)

    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES[dataset]):
        return run(tmp_path, **dict(TINY[dataset], dataset=dataset, **values))
