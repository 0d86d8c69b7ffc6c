"""Non-finite training steps: skipped, counted, and stopped when they repeat.

One NaN in a batch or one overflow would otherwise turn every quantizer's
``d``, ``q_max`` and bitwidth into NaN for good. A guarded step:

* checks the loss and every gradient (one sum per gradient, all-reduced over
  replicas, so every replica decides alike);
* where any is NaN or infinite, applies nothing: the optimizer (its slots and
  iteration counter) and the trainable variables are untouched, and the
  variables the forward pass changed (BatchNorm moving statistics, the loss
  tracker) are put back to their values before the step;
* counts it: ``nonfinite_steps`` in the step's logs (progress bar,
  ``History``) is the number of skipped steps so far;
* stops training after ``patience`` non-finite steps in a row (default
  :data:`PATIENCE`) with :class:`NonFiniteTrainingError` saying what to do;
  the variables are then those before the first of them.

``QuantizedModel`` guards its ``fit`` steps (:meth:`QuantizedModel.compile`
calls :func:`attach`); a custom loop calls :func:`attach` once (in the
strategy scope), :func:`snapshot` before the forward pass and
:func:`apply_if_finite` in place of ``optimizer.apply_gradients``.
:func:`nonfinite_variables` / :func:`check_finite` find the variables of a
model that hold NaN or infinity (checkpoints and exports refuse them).
"""

import contextlib
import os

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2

from tfdq import _compat, config

__all__ = [
    "PATIENCE",
    "NonFiniteError",
    "NonFiniteTrainingError",
    "apply_if_finite",
    "attach",
    "check_finite",
    "nonfinite_variables",
    "snapshot",
]

PATIENCE = 10
# tfdq.config's nonfinite_guard (TFDQ_NONFINITE_GUARD=0, or
# ``with tfdq.config.settings(nonfinite_guard=False)``) traces training steps
# without the guard (read when a step is traced; benchmarks/step_time.py
# measures its cost).
_ATTR = "_tfdq_nonfinite"
MESSAGE = (
    "tfdq: {n} training steps in a row had a non-finite loss or gradient (NaN or Inf); none "
    "of them was applied, so the model holds the values from before the first. Training is "
    "stopped: check the data for NaN/Inf values, lower the learning rate, or lower the lambda of "
    "the memory penalty; then resume from the last checkpoint."
)


class NonFiniteError(ValueError):
    """A model variable holds NaN or infinity (named in the message)."""


class NonFiniteTrainingError(RuntimeError):
    """Training stopped: too many non-finite steps in a row."""


def raise_clear(error):
    """Re-raise the guard's stop (a TensorFlow assertion) as
    :class:`NonFiniteTrainingError` with its message alone; other errors as they are."""
    message = getattr(error, "message", str(error))
    start = message.find("tfdq: ")
    if start < 0:
        raise error
    end = message.find("]", start)
    raise NonFiniteTrainingError(message[start : end if end > 0 else None]) from None


def nonfinite_variables(model):
    """Paths of ``model``'s variables that hold NaN or infinity."""
    bad = []
    for v in model.weights:
        value = np.asarray(v.numpy() if hasattr(v, "numpy") else v)
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            bad.append(getattr(v, "path", None) or v.name)
    return bad


def check_finite(model, action):
    """Raise :class:`NonFiniteError` if any variable of ``model`` is not
    finite; ``action`` (e.g. ``"write a checkpoint"``) names what is refused."""
    bad = nonfinite_variables(model)
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise NonFiniteError(
            f"refusing to {action}: the model holds NaN or Inf values in {shown}. The parameters "
            "were poisoned by a non-finite training step; resume from an earlier checkpoint or "
            "retrain with a lower learning rate (tfdq's fit skips such steps)."
        )


# -- the guard ----------------------------------------------------------------------


def attach(model, patience=None):
    """Create the step counters of ``model`` (idempotent; call in the strategy scope)."""
    state = getattr(model, _ATTR, None)
    if state is None:

        def counter(name):
            return tf.Variable(
                0,
                dtype=tf.int64,
                trainable=False,
                name=name,
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )

        with tf.init_scope():
            state = {"total": counter("tfdq_nonfinite_total"), "streak": counter("tfdq_nonfinite_streak")}
        # Not a Keras attribute: the counters are no model weights (not saved).
        object.__setattr__(model, _ATTR, state)
    if patience is not None:
        state["patience"] = int(patience)
    return state


def _restorable(model):
    variables = list(model.non_trainable_variables)
    tracker = getattr(model, "_loss_tracker", None)
    if tracker is not None:
        variables += list(tracker.variables)
    return variables


def snapshot(model):
    """The values of the variables a forward pass may change (take before it)."""
    return [(v, tf.identity(v.value if hasattr(v, "value") else v)) for v in _restorable(model)]


@contextlib.contextmanager
def guarding(model):
    """While active (one traced training step), ``model``'s wrapped optimizer
    applies gradients only through :func:`apply_if_finite`."""
    if not config.get("nonfinite_guard"):
        yield None
        return
    state = attach(model)
    state["step"] = {"snapshot": snapshot(model), "loss": None}
    try:
        yield state
    finally:
        state["step"] = None


def step_logs(model, logs):
    """``logs`` with ``nonfinite_steps`` added (the skipped steps so far)."""
    state = getattr(model, _ATTR, None)
    if state is None:
        return logs
    logs = dict(logs)
    logs["nonfinite_steps"] = tf.cast(state["total"].read_value(), tf.float32)
    return logs


def check_streak(model):
    """Raise :class:`NonFiniteTrainingError` when ``model`` has had its
    patience of non-finite steps in a row (a host-side check, for steps
    compiled with XLA, which drops the in-graph assertion)."""
    state = getattr(model, _ATTR, None)
    if state is None:
        return
    patience = int(state.get("patience", PATIENCE))
    if int(state["streak"].numpy()) >= patience:
        raise NonFiniteTrainingError(MESSAGE.format(n=patience))


class StopOnNonFinite(keras.callbacks.Callback):
    """Runs :func:`check_streak` after every batch (``QuantizedModel.fit`` adds it)."""

    def on_train_batch_end(self, batch, logs=None):
        check_streak(self.model)


def _finite(loss, grads):
    sums = [tf.reduce_sum(tf.cast(g, tf.float32)) for g in grads if g is not None]
    if loss is not None:
        sums.append(tf.reduce_sum(tf.cast(loss, tf.float32)))
    if not sums:
        return tf.constant(True)
    ok = tf.reduce_all(tf.math.is_finite(tf.stack(sums)))
    context = tf.distribute.get_replica_context()
    if context is not None and tf.distribute.get_strategy().num_replicas_in_sync > 1:
        bad = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(tf.logical_not(ok), tf.float32))
        ok = tf.equal(bad, 0.0)
    return ok


# Lower the guard's cond into switch/merge ops (TensorFlow's default inside a
# tf.function) or keep it an If op that calls its branch as a function.
LOWER_COND = os.environ.get("TFDQ_LOWER_GUARD_COND", "0") == "1"


def _as_function_call(output):
    """Keep the ``tf.cond`` that produced ``output`` an ``If`` op run as a
    function call (see :data:`LOWER_COND`)."""
    if LOWER_COND or tf.executing_eagerly() or not hasattr(output, "op"):
        return
    op, seen = output.op, 0
    while op.type not in ("If", "StatelessIf") and op.inputs and seen < 4:
        op, seen = op.inputs[0].op, seen + 1
    if op.type in ("If", "StatelessIf"):
        op._set_attr("_lower_using_switch_merge", attr_value_pb2.AttrValue(b=False))


def active_step(model):
    """The state of the :func:`guarding` step being traced, or None."""
    state = getattr(model, _ATTR, None)
    return None if state is None else state.get("step")


def apply_if_finite(model, apply_gradients, grads_and_vars, loss=None, saved=None):
    """``apply_gradients(grads_and_vars)`` when ``loss`` and the gradients are
    finite; otherwise restore ``saved`` (from :func:`snapshot`) and count the
    step (see the module docstring). Returns the boolean "applied" tensor."""
    state = attach(model)
    grads_and_vars = list(grads_and_vars)
    grads = [g for g, _ in grads_and_vars]
    variables = [v for _, v in grads_and_vars]
    ok = _finite(loss, grads)
    saved = list(saved or [])
    restored = [v for v, _ in saved]
    values = [value for _, value in saved]

    def apply(grads):
        apply_gradients(list(zip(grads, variables)))
        state["streak"].assign(0)
        return tf.constant(True)

    def skip(values):
        for v, value in zip(restored, values):
            v.assign(value)
        state["streak"].assign_add(1)
        state["total"].assign_add(1)
        return tf.constant(False)

    context = tf.distribute.get_replica_context()
    if tf.distribute.has_strategy() and context is not None and not _compat.strategy_supports_no_merge_call():
        # A branch that calls merge_call (apply_gradients does, under any
        # strategy but the default one, a one-replica MirroredStrategy too)
        # cannot run in a cond in replica context: decide in cross-replica
        # context, as Keras' LossScaleOptimizer does.
        def cross_replica(distribution, ok, grads, values):
            flag = distribution.experimental_local_results(ok)[0]

            def on_each(fn, args):
                distribution.extended.call_for_each_replica(fn, args=(args,))
                return tf.constant(True)

            tf.cond(flag, lambda: on_each(apply, grads), lambda: on_each(skip, values))

        context.merge_call(cross_replica, args=(ok, grads, values))
    else:
        _as_function_call(tf.cond(ok, lambda: apply(grads), lambda: skip(values)))
    patience = int(state.get("patience", PATIENCE))
    tf.debugging.Assert(
        tf.less(state["streak"].read_value(), patience), [MESSAGE.format(n=patience)], summarize=1
    )
    return ok


def record_loss(model, optimizer):
    """Wrap ``optimizer.scale_loss`` (Keras' train step passes it the loss)
    so that a :func:`guarding` step of ``model`` sees its loss."""
    import weakref  # noqa: PLC0415

    model_ref = weakref.ref(model)
    scale_loss = optimizer.scale_loss

    def scale_loss_recorded(loss):
        target = model_ref()
        step = active_step(target) if target is not None else None
        if step is not None:
            step["loss"] = loss
        return scale_loss(loss)

    optimizer.scale_loss = scale_loss_recorded
