"""``QuantizedModel``: the Functional model that ``quantize_model`` returns.

It is an ordinary Keras Functional model (save, load, ``fit``, ``evaluate``
all as usual) with three additions for learned quantization:

* ``memory_budget``: an optional :class:`tfdq.constraints.MemoryBudget` (set
  with :func:`tfdq.constrain`). While one is set the training loss gets the
  penalty ``sum_j lambda_j max(0, size_j - target_j)^2`` and the gradients of
  the quantizers' step and range parameters are clipped to ``[-d, d]``
  before the optimizer step (METHOD.md sections 3 and 5).
* with a budget, every training step logs the current sizes
  (``weight_kb``, ``act_kb_sum``, ``act_kb_max``, ``mean_bits``,
  ``penalty``, ``budget_met``), so they show in the progress bar,
  ``History`` and TensorBoard (``tfdq.callbacks.MemoryLogger`` does the
  same for a model without a budget).
* :meth:`memory_penalty` and :meth:`clip_quantizer_gradients` for custom
  training loops.
* ``fit`` keeps BatchNorm statistics current (:mod:`tfdq.batchnorm`).

The budget is part of the model's config: a saved model keeps it.
"""

import weakref

import keras
import tensorflow as tf

from tfdq import batchnorm
from tfdq import layers as qlayers
from tfdq import nonfinite
from tfdq import quantizers as quantizers_lib


@keras.saving.register_keras_serializable("tfdq")
class QuantizedModel(keras.Model):
    """Functional Keras model with learned quantizers (see module docstring)."""

    def __init__(self, *args, memory_budget=None, **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(memory_budget, dict):
            memory_budget = keras.saving.deserialize_keras_object(memory_budget)
        self.memory_budget = memory_budget

    # -- configuration -----------------------------------------------------

    def get_config(self):
        config = super().get_config()
        if self.memory_budget is not None:
            config["memory_budget"] = keras.saving.serialize_keras_object(self.memory_budget)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        from keras.src.models.functional import functional_from_config  # noqa: PLC0415

        config = dict(config)
        budget = config.pop("memory_budget", None)
        model = functional_from_config(cls, config, custom_objects=custom_objects)
        if budget is not None:
            model.memory_budget = keras.saving.deserialize_keras_object(budget)
        return model

    def set_memory_budget(self, budget):
        """Attach (or with ``None`` remove) a memory budget; retraces ``fit``."""
        self.memory_budget = budget
        # Force Keras to trace the training step again with the new loss.
        self.train_function = None
        self.test_function = None

    # -- quantizers ----------------------------------------------------------

    def quantizers(self):
        """All tfdq quantizer objects of the model, weights first."""
        found = [l.kernel_quantizer for l in qlayers.weight_quantized_layers(self)]
        found += [l.quantizer for l in qlayers.activation_quantizer_layers(self)]
        return found

    def memory_penalty(self):
        """The budget's penalty term (0 without a budget), differentiable."""
        if self.memory_budget is None:
            return tf.constant(0.0)
        return self.memory_budget.penalty(self)

    def clip_quantizer_gradients(self, grads, variables):
        """Clip the step/range gradients to ``[-d, d]`` while a budget is active.

        Returns the gradients in the order given; others pass unchanged.
        Under a ``tf.distribute`` strategy (in a replica context) the
        quantizer gradients are summed over the replicas first, so the clip
        applies to the total gradient exactly as on one device; each replica
        then carries ``1/num_replicas`` of the clipped total, which the
        optimizer's own all-reduce sums back.
        """
        grads = list(grads)
        if self.memory_budget is None or not self.memory_budget.clip_gradients:
            return grads
        variables = list(variables)
        clip_ids = {
            id(v)
            for q in self.quantizers()
            for name, v in q._param_vars.items()
            if name != "bits" and v.trainable
        }
        chosen = [i for i, (g, v) in enumerate(zip(grads, variables)) if g is not None and id(v) in clip_ids]
        if not chosen:
            return grads
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        context = tf.distribute.get_replica_context()
        selected = [grads[i] for i in chosen]
        if replicas > 1 and context is not None:
            selected = context.all_reduce(tf.distribute.ReduceOp.SUM, selected)
        pairs = quantizers_lib.clip_gradients(
            [(g, variables[i]) for g, i in zip(selected, chosen)], self.quantizers()
        )
        for (g, _), i in zip(pairs, chosen):
            grads[i] = g / replicas if (replicas > 1 and context is not None) else g
        return grads

    # -- training ------------------------------------------------------------

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training=training)
        if training and self.memory_budget is not None:
            # scaled like any additional loss under tf.distribute
            loss = loss + self._aggregate_additional_loss(self.memory_penalty())
        return loss

    def compile(self, *args, **kwargs):
        """``keras.Model.compile``, then route the optimizer's
        ``apply_gradients`` through :meth:`clip_quantizer_gradients` (a no-op
        while no budget is set)."""
        super().compile(*args, **kwargs)
        nonfinite.attach(self)
        _install_gradient_clipping(self)

    def compile_from_config(self, config):
        """Compile from a saved model's compile config, as Keras does for a
        model that does not override ``compile`` (Keras skips models that do,
        and the optimizer state in a ``.keras`` file would be lost)."""
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if getattr(self, "optimizer", None) is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    def fit(self, *args, recalibrate_batchnorm=True, **kwargs):
        """``keras.Model.fit``; too many non-finite steps in a row raise
        :class:`tfdq.nonfinite.NonFiniteTrainingError` (see :mod:`tfdq.nonfinite`).

        A model with BatchNormalization layers gets a
        :class:`tfdq.batchnorm.BatchNormRecalibration` first among the
        callbacks, so that validation, checkpoints and the model after ``fit``
        use BatchNorm statistics of the current quantizers (re-estimated on
        the training inputs). ``recalibrate_batchnorm=False`` leaves them as
        Keras' moving averages."""
        if recalibrate_batchnorm:
            args, kwargs = batchnorm.fit_with_recalibration(self, args, kwargs)
        state = getattr(self, "_tfdq_nonfinite", None)
        if state is not None:
            state["streak"].assign(0)  # a new fit starts a new count
        if state is not None and len(args) < 6:  # callbacks not given by position
            callbacks = kwargs.get("callbacks")
            kwargs["callbacks"] = [*(callbacks or []), nonfinite.StopOnNonFinite()]
        try:
            return super().fit(*args, **kwargs)
        except tf.errors.InvalidArgumentError as e:
            nonfinite.raise_clear(e)

    def train_step(self, data):
        # a step with a non-finite loss or gradient changes nothing (tfdq.nonfinite)
        with nonfinite.guarding(self):
            logs = super().train_step(data)
        logs = nonfinite.step_logs(self, logs)
        if self.memory_budget is not None:
            logs = dict(logs)
            logs.update(self.memory_budget.logs(self))
        return logs


def _install_gradient_clipping(model):
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or getattr(optimizer, "_tfdq_clipping", False):
        return
    apply_gradients = optimizer.apply_gradients
    model_ref = weakref.ref(model)
    nonfinite.record_loss(model, optimizer)

    def apply_gradients_with_clipping(grads_and_vars):
        grads_and_vars = list(grads_and_vars)
        target = model_ref()
        if target is not None and target.memory_budget is not None:
            variables = [v for _, v in grads_and_vars]
            grads = target.clip_quantizer_gradients([g for g, _ in grads_and_vars], variables)
            grads_and_vars = list(zip(grads, variables))
        step = nonfinite.active_step(target) if target is not None else None
        if step is not None:
            return nonfinite.apply_if_finite(target, apply_gradients, grads_and_vars, step["loss"], step["snapshot"])
        return apply_gradients(grads_and_vars)

    # An instance attribute: this optimizer only, set once, read at trace time.
    optimizer.apply_gradients = apply_gradients_with_clipping
    optimizer._tfdq_clipping = True
