"""BatchNormalization statistics that keep up with learned quantization.

In training mode a ``BatchNormalization`` layer normalizes with the statistics
of the current batch; in inference mode (``evaluate``, ``predict``, export)
with its moving averages, which follow the batch statistics with momentum
0.99 (Keras' default): about 460 steps to forget 99% of the past. Learned
quantization moves the inputs of every BatchNorm in jumps (a layer that
loses a bit changes its outputs at once), so after a few hundred steps of
quantized fine-tuning the moving statistics describe a network that no
longer exists: the model is right in training mode and wrong in inference
mode, and so is its integer export, which folds the moving statistics into
per-channel scales.

:func:`recalibrate_batchnorm` replaces the moving statistics with the
statistics of the current network on some training inputs (BatchNorm
re-estimation: Nagel et al., ICML 2022, "Overcoming oscillations in
quantization-aware training"). Every BatchNorm sees the inputs training
mode gives it (earlier BatchNorms normalizing with batch statistics, as
during training), and its mean and variance are pooled over all the
inputs: the statistics of the data set, not a moving average. Nothing else
changes: weights, ``gamma``, ``beta`` and the quantizers keep their values,
so an export afterwards still holds the learned integers, with the per-channel
scales ``d |s_c|`` of the new statistics.

:class:`BatchNormRecalibration` is the Keras callback that does it during
``fit``: before every validation, at the end of every epoch (before
checkpoints are written: it runs ahead of the other callbacks) and at the end
of training. ``QuantizedModel.fit`` adds it on its own when the model has
BatchNorm layers and the training inputs can be read again (arrays, a
``tf.data.Dataset``, a ``keras.utils.PyDataset``); pass
``recalibrate_batchnorm=False`` to ``fit`` to opt out, or your own callback
to choose the data and sample count. Custom training loops call
:func:`recalibrate_batchnorm` after training (and before evaluating)::

    tfdq.recalibrate_batchnorm(qmodel, x_train)          # or a tf.data.Dataset
"""

from __future__ import annotations

import contextlib
import logging
import weakref

import keras
import numpy as np
import tensorflow as tf

logger = logging.getLogger("tfdq")

DEFAULT_SAMPLES = 2048
DEFAULT_BATCH = 128


def batchnorm_layers(model, trainable_only=True):
    """The ``BatchNormalization`` layers of ``model`` (nested models included)
    whose statistics training updates: trainable, without batch renormalization.

    A BatchNorm set to ``trainable=False`` runs in inference mode even during
    training (Keras' rule), so its statistics are the user's and stay as they are.
    """
    found, seen = [], set()

    def walk(m):
        for layer in m.layers:
            if isinstance(layer, keras.Model):
                walk(layer)
            elif isinstance(layer, keras.layers.BatchNormalization) and id(layer) not in seen:
                seen.add(id(layer))
                if not trainable_only or (layer.trainable and not layer.renorm):
                    found.append(layer)

    walk(model)
    return found


def _input_batches(data, batch_size):
    """Yield input batches (x only) of ``data`` through Keras' own data adapters:
    arrays (or a list/dict of them, or ``(x, y)``), ``tf.data.Dataset``,
    ``keras.utils.PyDataset`` or a generator."""
    from tfdq._compat import get_data_adapter  # noqa: PLC0415

    if isinstance(data, tuple) and len(data) in (2, 3) and not isinstance(data[0], (int, float)):
        if np.ndim(data[0]) > 1 or isinstance(data[0], (list, dict)):
            data = data[0]  # (x, y) or (x, y, sample_weight)
    adapter = get_data_adapter(data, batch_size=batch_size, shuffle=False)
    for batch in adapter.get_tf_dataset():
        x, _, _ = keras.utils.unpack_x_y_sample_weight(batch)
        yield x


_FORWARD = weakref.WeakKeyDictionary()  # model -> (BatchNorms it was traced with, tf.function)


def _forward(model, layers):
    """A compiled ``model(x, training=True)`` with momentum 0 in ``layers``
    (each stores its batch statistics), traced once per model and layer set."""
    key = tuple(id(bn) for bn in layers)
    cached = _FORWARD.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    ref = weakref.ref(model)

    @tf.function(reduce_retracing=True, autograph=False)
    def forward(x):
        ref()(x, training=True)

    _FORWARD[model] = (key, forward)
    return forward


def _batch_len(x):
    first = keras.tree.flatten(x)[0]
    return int(first.shape[0])


def recalibrate_batchnorm(
    model: keras.Model,
    data,
    batch_size: int = DEFAULT_BATCH,
    max_samples: int | None = DEFAULT_SAMPLES,
    verbose: int = 0,
    compiled: bool = True,
) -> dict:
    """Re-estimate the moving statistics of every BatchNorm of ``model`` on ``data``.

    Runs ``model(x, training=True)`` on up to ``max_samples`` inputs, so
    every BatchNorm sees what it sees in training (the current weights and
    quantizers, earlier BatchNorms normalizing with batch statistics,
    dropout active), and sets ``moving_mean`` and ``moving_variance`` to the
    mean and variance of its input pooled over all these inputs (per
    channel). Weights, ``gamma``, ``beta`` and quantizer parameters do not
    change. BatchNorms with ``trainable=False`` and batch-renormalization
    layers are left as they are.

    Call it after training (a custom loop, or a ``fit`` that did not add
    :class:`BatchNormRecalibration`) and before evaluating or exporting.
    The result depends on the sample only through its statistics: a few
    thousand training inputs (augmented as in training) are plenty.

    Args:
        model: a Keras model (tfdq or float); changed in place.
        data: training inputs: an array, a list/dict of arrays, ``(x, y)``
            tuples, a ``tf.data.Dataset`` (batched, of ``x`` or ``(x, y,
            ...)``), a ``keras.utils.PyDataset`` or a generator.
        batch_size: batch size for array inputs (datasets keep theirs).
        max_samples: stop after this many inputs (None: all of ``data``;
            an infinite dataset needs a limit).
        verbose: 1 prints one line with the layer and sample counts.
        compiled: run the forward passes as one ``tf.function``, traced
            once per model (fastest when called again, as
            :class:`BatchNormRecalibration` does); False runs them eagerly,
            which saves the tracing on a single call over a few batches.

    Returns:
        A dict: ``layers`` (names re-estimated), ``samples`` (inputs used),
        ``max_mean_shift`` (largest ``|new - old|`` of a moving mean, in
        units of the new standard deviation) and ``max_std_ratio`` (largest
        factor between a new and an old standard deviation, >= 1): how
        stale the statistics were.

    Raises:
        ValueError: ``data`` holds no inputs, or non-finite statistics came
            out (the model's outputs are NaN/Inf); the moving statistics
            are then left as they were.
    """
    layers = batchnorm_layers(model)
    if not layers:
        return {"layers": [], "samples": 0, "max_mean_shift": 0.0, "max_std_ratio": 1.0}
    if max_samples is not None and max_samples <= 0:
        raise ValueError(f"max_samples must be positive or None, got {max_samples}.")
    old = [(bn.momentum, bn.moving_mean.numpy(), bn.moving_variance.numpy()) for bn in layers]
    sums = [[0.0, 0.0] for _ in layers]  # per layer: sum of n * mean, sum of n * (var + mean^2)
    seen = 0

    if compiled:
        forward = _forward(model, layers)
    else:

        def forward(x):
            model(x, training=True)

    try:
        for bn in layers:
            bn.momentum = 0.0
        for x in _input_batches(data, batch_size):
            n = _batch_len(x)
            if max_samples is not None and seen + n > max_samples:
                n = max_samples - seen
                x = keras.tree.map_structure(lambda t: t[:n], x)  # noqa: B023 (applied at once)
            if n <= 0:
                break
            forward(x)
            for s, bn in zip(sums, layers):
                mean = np.asarray(bn.moving_mean.numpy(), np.float64)
                var = np.asarray(bn.moving_variance.numpy(), np.float64)
                s[0] = s[0] + n * mean
                s[1] = s[1] + n * (var + mean * mean)
            seen += n
            if max_samples is not None and seen >= max_samples:
                break
    finally:
        for bn, (momentum, mean, var) in zip(layers, old):
            bn.momentum = momentum
            bn.moving_mean.assign(mean)
            bn.moving_variance.assign(var)
    if seen == 0:
        raise ValueError("recalibrate_batchnorm: data holds no inputs.")
    shift, ratio = 0.0, 1.0
    new = []
    for bn, s, (_, old_mean, old_var) in zip(layers, sums, old):
        mean = s[0] / seen
        var = np.maximum(s[1] / seen - mean * mean, 0.0)
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var))):
            raise ValueError(
                f"recalibrate_batchnorm: {bn.name} gets non-finite inputs on this data, so "
                "its statistics were left unchanged. Check the model for NaN/Inf weights."
            )
        new.append((mean, var))
        shift = max(shift, float(np.max(np.abs(mean - old_mean) / np.sqrt(var + bn.epsilon))))
        std_ratio = np.sqrt((var + bn.epsilon) / (np.asarray(old_var, np.float64) + bn.epsilon))
        ratio = max(ratio, float(np.max(np.maximum(std_ratio, 1.0 / std_ratio))))
    for bn, (mean, var) in zip(layers, new):
        bn.moving_mean.assign(mean.astype(np.float32))
        bn.moving_variance.assign(var.astype(np.float32))
    if verbose:
        print(
            f"tfdq: re-estimated {len(layers)} BatchNorm layer(s) on {seen} inputs "
            f"(moving means moved by up to {shift:.3g} standard deviations)"
        )
    logger.info("recalibrate_batchnorm: %d layers, %d samples, max mean shift %.3g", len(layers), seen, shift)
    return {
        "layers": [bn.name for bn in layers],
        "samples": seen,
        "max_mean_shift": shift,
        "max_std_ratio": ratio,
    }


@contextlib.contextmanager
def reestimated_statistics(model, data, max_samples=DEFAULT_SAMPLES):
    """Within the ``with`` block, the BatchNorms of ``model`` hold statistics
    re-estimated on ``data`` (:func:`recalibrate_batchnorm`); on leaving it
    they get their own back. Yields the re-estimation's result dict (with
    ``error`` set and nothing changed when the model gives non-finite values).

    ``quantize_model`` calibrates activation ranges inside this block: in
    training mode a BatchNorm normalizes with batch statistics, so the
    ranges that training will see are those of the re-estimated statistics,
    not those of moving averages that may lag far behind the weights (a
    float model trained briefly with Keras' momentum 0.99, or
    keras.applications' 0.999, still holds moving variances near their
    start of 1).
    """
    layers = batchnorm_layers(model)
    saved = [(bn.moving_mean.numpy(), bn.moving_variance.numpy()) for bn in layers]
    try:
        try:
            result = recalibrate_batchnorm(model, data, max_samples=max_samples, compiled=False)
        except ValueError as err:
            result = {
                "layers": [],
                "samples": 0,
                "max_mean_shift": 0.0,
                "max_std_ratio": 1.0,
                "error": str(err),
            }
        yield result
    finally:
        for bn, (mean, var) in zip(layers, saved):
            bn.moving_mean.assign(mean)
            bn.moving_variance.assign(var)


class BatchNormRecalibration(keras.callbacks.Callback):
    """Keep BatchNorm statistics current during ``fit`` (see the module docstring).

    After any training since the last re-estimation, re-estimates with
    :func:`recalibrate_batchnorm` on ``data`` before each validation run, at
    each epoch end (``every_epoch=True``; put this callback before
    checkpoint callbacks so that they save current statistics) and at the
    end of training. ``QuantizedModel.fit`` adds one, first in the list,
    with the training inputs of the call.

    Args:
        data: training inputs, as for :func:`recalibrate_batchnorm`.
        batch_size, max_samples: as for :func:`recalibrate_batchnorm`.
        every_epoch: re-estimate at every epoch end (default True); with
            False only before validation and at the end of training.
        verbose: passed on to :func:`recalibrate_batchnorm`.
    """

    def __init__(
        self, data, batch_size=DEFAULT_BATCH, max_samples=DEFAULT_SAMPLES, every_epoch=True, verbose=0
    ):
        super().__init__()
        self.data = data
        self.batch_size = batch_size
        self.max_samples = max_samples
        self.every_epoch = every_epoch
        self.verbose = verbose
        self._stale = False
        self.last = None  # the last recalibrate_batchnorm result

    def _recalibrate(self):
        if self._stale:
            self._stale = False
            try:
                self.last = recalibrate_batchnorm(
                    self.model, self.data, self.batch_size, self.max_samples, verbose=self.verbose
                )
            except ValueError as err:  # a diverged model: say so, keep training's own result
                logger.warning("tfdq: BatchNorm statistics not re-estimated: %s", err)
                self.last = {"error": str(err)}

    def mark_stale(self, model=None):
        """Re-estimate at the next occasion (the quantizers changed outside a training step)."""
        self._stale = True

    def on_epoch_begin(self, epoch, logs=None):
        self._stale = True

    def on_test_begin(self, logs=None):
        self._recalibrate()

    def on_epoch_end(self, epoch, logs=None):
        if self.every_epoch:
            self._recalibrate()

    def on_train_end(self, logs=None):
        self._recalibrate()


def fit_data(fit_args):
    """The training inputs of a ``fit`` call that can be read again, or None.

    ``fit_args`` maps fit's argument names to values. Arrays keep the part
    that ``validation_split`` leaves for training; datasets and PyDatasets
    are returned as they are; generators and other one-pass iterators give
    None (they cannot be read a second time).
    """
    x = fit_args.get("x")
    if x is None:
        return None
    if isinstance(x, (tf.data.Dataset, keras.utils.PyDataset)):
        return x
    flat = keras.tree.flatten(x) if isinstance(x, (list, tuple, dict)) else [x]
    if not flat or not all(hasattr(a, "shape") and hasattr(a, "__getitem__") for a in flat):
        return None
    split = float(fit_args.get("validation_split") or 0.0)
    if split and fit_args.get("validation_data") is None:
        n = int(flat[0].shape[0] * (1.0 - split))  # Keras' own split point
        x = keras.tree.map_structure(lambda a: a[:n], x)
    return x


def fit_with_recalibration(model, args, kwargs):
    """``(args, kwargs)`` of a ``keras.Model.fit`` call with a
    :class:`BatchNormRecalibration` first among its callbacks, when ``model``
    has BatchNorms to keep current and the data allows (the hook of
    ``QuantizedModel.fit``).

    Nothing is added when the user passed one already, when there is no
    trainable BatchNorm, or when the inputs cannot be read twice (a warning
    then says to call :func:`recalibrate_batchnorm` after training).
    """
    import inspect  # noqa: PLC0415

    try:
        bound = inspect.signature(keras.Model.fit).bind(model, *args, **kwargs)
    except TypeError:
        return args, kwargs  # let fit raise its own error
    fit_args = dict(bound.arguments)
    fit_args.pop("self", None)
    extra = fit_args.pop("kwargs", {})
    callbacks = _with_callback(model, fit_args)
    if callbacks is fit_args.get("callbacks"):
        return args, kwargs
    fit_args["callbacks"] = callbacks
    return (), {**fit_args, **extra}


def _with_callback(model, fit_args):
    callbacks = fit_args.get("callbacks")
    if isinstance(callbacks, keras.callbacks.CallbackList):
        return callbacks
    if any(isinstance(c, BatchNormRecalibration) for c in callbacks or []) or not batchnorm_layers(model):
        return callbacks
    callbacks = list(callbacks or [])
    data = fit_data(fit_args)
    if data is None:
        logger.warning(
            "tfdq: fit's inputs cannot be read a second time (a generator?), so the "
            "BatchNorm statistics are not re-estimated after training. Call "
            "tfdq.recalibrate_batchnorm(model, training_inputs) before evaluating or exporting."
        )
        return fit_args.get("callbacks")
    batch_size = fit_args.get("batch_size") or DEFAULT_BATCH
    return [BatchNormRecalibration(data, batch_size=batch_size)] + callbacks
