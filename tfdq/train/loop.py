"""A small ``tf.distribute`` training loop, for MultiWorkerMirroredStrategy.

Keras 3's ``fit`` fails under MultiWorkerMirroredStrategy ("Attempt to
convert a value (PerReplica...)", keras-team/keras#20585), so the
multi-worker path trains with this loop: the global batch is split by
``strategy.experimental_distribute_dataset`` and every step runs
:func:`replica_step` on each replica through ``strategy.run`` inside one
``tf.function``. The step is the same computation as
``QuantizedModel.train_step``:

    loss = mean cross-entropy over the global batch
           + regularization losses + memory penalty (each scaled 1/replicas)
    grads = clip_quantizer_gradients(d loss / d variables)   # [-d, d], with a budget
    optimizer.apply_gradients(grads)                          # all-reduced by Keras

It drives the same Keras callbacks as ``fit`` (progress bar, checkpoints,
TensorBoard, best feasible checkpoint), so both paths write the same
outputs. Validation runs on each worker over the whole held-out set (the
weights are identical on every worker, so are the results).
"""

import keras
import numpy as np
import tensorflow as tf

from tfdq import nonfinite
from tfdq.batchnorm import BatchNormRecalibration


def replica_step(model, optimizer, loss_fn, x, y, global_batch_size):
    """One training step on one replica; returns (loss sum, correct, count).

    ``loss_fn`` has reduction ``"none"``. The per-example losses are summed
    and divided by the global batch size, and the model's regularization
    losses and memory penalty by the number of replicas, so that the
    gradients all-reduced (summed) by the optimizer equal those of one
    device with the whole batch. A step with a non-finite loss or gradient
    changes nothing and counts zero examples (:mod:`tfdq.nonfinite`).
    """
    saved = nonfinite.snapshot(model)
    with tf.GradientTape() as tape:
        logits = model(x, training=True)
        per_example = loss_fn(y, logits)
        loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch_size)
        extra = list(model.losses)
        if hasattr(model, "memory_penalty") and getattr(model, "memory_budget", None) is not None:
            extra.append(model.memory_penalty())
        if extra:
            loss += tf.nn.scale_regularization_loss(tf.add_n([tf.cast(e, loss.dtype) for e in extra]))
    variables = model.trainable_variables
    if getattr(model, "quantizers_frozen", False):
        # the final phase of a budget: the allocation stays, the weights adapt
        frozen = {id(v) for q in model.quantizers() for v in q.trainable_weights}
        variables = [v for v in variables if id(v) not in frozen]
    grads = tape.gradient(loss, variables)
    if hasattr(model, "clip_quantizer_gradients"):
        grads = model.clip_quantizer_gradients(grads, variables)
    applied = nonfinite.apply_if_finite(model, optimizer.apply_gradients, zip(grads, variables), loss, saved)
    if hasattr(model, "update_memory_multipliers"):
        model.update_memory_multipliers()  # learned multipliers: one controller step (none while frozen)
    correct = tf.reduce_sum(
        tf.cast(
            tf.equal(tf.cast(tf.argmax(logits, -1), tf.int64), tf.cast(tf.reshape(y, [-1]), tf.int64)),
            tf.float32,
        )
    )
    count = tf.cast(tf.shape(y)[0], tf.float32)
    applied = tf.cast(applied, tf.float32)
    return tf.where(applied > 0, tf.reduce_sum(per_example), 0.0), correct * applied, count * applied


class CustomLoop:
    """Train ``model`` with ``optimizer`` under ``strategy`` (see module doc)."""

    def __init__(self, model, optimizer, strategy, global_batch_size):
        self.model = model
        self.optimizer = optimizer
        self.strategy = strategy
        self.global_batch_size = int(global_batch_size)
        self.loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
        self._train_step = None
        self._traced_frozen = None  # the quantizers' frozen state the step was traced with
        self._eval_step = None
        with strategy.scope():
            self._guard = nonfinite.attach(model)

    def _make_train_step(self):
        model, optimizer, loss_fn, gbs = self.model, self.optimizer, self.loss_fn, self.global_batch_size
        strategy = self.strategy

        def step(x, y):
            return replica_step(model, optimizer, loss_fn, x, y, gbs)

        @tf.function
        def train_step(iterator):
            x, y = next(iterator)
            results = strategy.run(step, args=(x, y))
            return [strategy.reduce(tf.distribute.ReduceOp.SUM, r, axis=None) for r in results]

        return train_step

    def _make_eval_step(self):
        model, loss_fn = self.model, self.loss_fn

        @tf.function
        def eval_step(x, y):
            logits = model(x, training=False)
            correct = tf.cast(
                tf.equal(tf.cast(tf.argmax(logits, -1), tf.int64), tf.cast(tf.reshape(y, [-1]), tf.int64)),
                tf.float32,
            )
            return (
                tf.reduce_sum(loss_fn(y, logits)),
                tf.reduce_sum(correct),
                tf.cast(tf.shape(y)[0], tf.float32),
            )

        return eval_step

    def evaluate(self, dataset):
        """``{"loss", "accuracy"}`` over ``dataset`` on this worker."""
        if self._eval_step is None:
            self._eval_step = self._make_eval_step()
        total = np.zeros(3)
        for x, y in dataset:
            total += [float(v) for v in self._eval_step(x, y)]
        return {"loss": total[0] / max(total[2], 1.0), "accuracy": total[1] / max(total[2], 1.0)}

    def fit(self, train, validation_data, epochs, steps_per_epoch, initial_epoch=0, callbacks=(), verbose=1):
        """Like ``keras.Model.fit`` on a repeated data set; returns the History.

        ``train``: the global-batch data set, or a function ``input_context ->
        data set`` of this worker's per-replica batches
        (``strategy.distribute_datasets_from_function``)."""
        if getattr(self.model, "optimizer", None) is None:
            self.model.optimizer = self.optimizer  # read by TensorBoard and checkpoints
        history = keras.callbacks.History()
        cbl = keras.callbacks.CallbackList(
            list(callbacks) + [history],
            add_progbar=verbose != 0,
            model=self.model,
            verbose=verbose,
            epochs=epochs,
            steps=steps_per_epoch,
        )
        if callable(train):  # input_context -> this worker's share, in per-replica batches
            iterator = iter(self.strategy.distribute_datasets_from_function(train))
        else:
            iterator = iter(self.strategy.experimental_distribute_dataset(train))
        cbl.on_train_begin()
        logs = {}
        for epoch in range(initial_epoch, epochs):
            cbl.on_epoch_begin(epoch)
            frozen = bool(getattr(self.model, "quantizers_frozen", False))
            if frozen != self._traced_frozen:  # the final phase trains fewer variables: trace again
                self._train_step, self._traced_frozen = self._make_train_step(), frozen
            total = np.zeros(3)
            for step in range(steps_per_epoch):
                cbl.on_train_batch_begin(step)
                try:
                    total += [float(v) for v in self._train_step(iterator)]
                except tf.errors.InvalidArgumentError as e:
                    nonfinite.raise_clear(e)
                logs = {
                    "loss": total[0] / max(total[2], 1.0),
                    "accuracy": total[1] / max(total[2], 1.0),
                    "nonfinite_steps": float(self._guard["total"].numpy()),
                }
                cbl.on_train_batch_end(step, logs)
            logs = dict(logs)  # "loss": mean cross-entropy (the penalty is logged apart)
            if validation_data is not None:
                for c in callbacks:  # BatchNorm re-estimation before validation, as in fit
                    if isinstance(c, BatchNormRecalibration):
                        c.on_test_begin()
                val = self.evaluate(validation_data)
                logs.update({f"val_{k}": v for k, v in val.items()})
            cbl.on_epoch_end(epoch, logs)
        cbl.on_train_end(logs)
        return history
