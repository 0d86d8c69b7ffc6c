"""``QuantizedModel``: the Functional model that ``quantize_model`` returns.

It is an ordinary Keras Functional model (save, load, ``fit``, ``evaluate``
all as usual) with three additions for learned quantization:

* ``memory_budget``: an optional :class:`tfdq.constraints.MemoryBudget` (set
  with :func:`tfdq.constrain`). While one is set the training loss gets the
  budget's term (learned multipliers times the relative violations, or the
  paper's fixed penalty ``sum_j lambda_j max(0, size_j - target_j)^2``),
  the gradients of the quantizers' step and range parameters are clipped
  to ``[-d, d]`` before the optimizer step (section 3 of the paper), the
  multipliers take one controller step after each optimizer step, and
  ``fit`` ends with the final phase that fixes the allocation inside the
  budget (:class:`tfdq.callbacks.FinishInsideBudget`).
* with a budget, every training step logs the current sizes
  (``weight_kb``, ``act_kb_sum``, ``act_kb_max``, ``mean_bits``,
  ``penalty``, ``budget_met``, ``lambda_*``), so they show in the progress
  bar, ``History`` and TensorBoard (``tfdq.callbacks.MemoryLogger`` does the
  same for a model without a budget). The sizes are computed once per step
  (:class:`tfdq.memory.Sizes`) and shared by the loss term, the logs and
  the clip bounds.
* :meth:`memory_penalty`, :meth:`clip_quantizer_gradients` and
  :meth:`update_memory_multipliers` for custom training loops.
* ``fit`` keeps BatchNorm statistics current (:mod:`tfdq.batchnorm`).

The budget is part of the model's config: a saved model keeps it.
"""

import weakref

import keras
import tensorflow as tf

from tfdq import batchnorm, memory, nonfinite
from tfdq import layers as qlayers
from tfdq import quantizers as quantizers_lib


@keras.saving.register_keras_serializable("tfdq")
class QuantizedModel(keras.Model):
    """Functional Keras model with learned quantizers (see module docstring)."""

    def __init__(self, *args, memory_budget=None, **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(memory_budget, dict):
            memory_budget = keras.saving.deserialize_keras_object(memory_budget)
        self.memory_budget = memory_budget
        self.quantizers_frozen = False

    # -- configuration -----------------------------------------------------

    def get_config(self):
        config = super().get_config()
        if self.memory_budget is not None:
            config["memory_budget"] = keras.saving.serialize_keras_object(self.memory_budget)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        from tfdq._compat import functional_from_config  # noqa: PLC0415

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

    def _sizes(self):
        """This step's :class:`tfdq.memory.Sizes`: built once per traced step
        (the loss term builds it; the logs and the clip bounds reuse it)."""
        sizes = getattr(self, "_tfdq_step_sizes", None)
        graph = tf.compat.v1.get_default_graph() if not tf.executing_eagerly() else None
        if sizes is None or sizes[0] is not graph or graph is None:
            sizes = (graph, memory.Sizes(self))
            object.__setattr__(self, "_tfdq_step_sizes", sizes)
        return sizes[1]

    def memory_penalty(self):
        """The budget's loss term (0 without a budget), differentiable."""
        if self.memory_budget is None:
            return tf.constant(0.0)
        return self.memory_budget.penalty(self, self._sizes())

    def update_memory_multipliers(self):
        """One step of the budget's multiplier controller (automatic
        multipliers only); ``fit`` calls it after every optimizer step, a
        custom loop should too."""
        if self.memory_budget is not None and not self.quantizers_frozen:
            self.memory_budget.update_multipliers(self, self._sizes())

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
            [(g, variables[i]) for g, i in zip(selected, chosen)], self.quantizers(), self._sizes().params
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
        while no budget is set) and build the budget's multipliers (under
        the current ``tf.distribute`` scope)."""
        return self._compile(*args, **kwargs)

    def _compile(self, *args, **kwargs):
        super().compile(*args, **kwargs)
        nonfinite.attach(self)
        _install_gradient_clipping(self)
        if self.memory_budget is not None:
            self.memory_budget.build_multipliers()

    def compile_from_config(self, config):
        """Compile from a saved model's compile config, as Keras does for a
        model that does not override ``compile`` (Keras skips models that do,
        and the optimizer state in a ``.keras`` file would be lost)."""
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if getattr(self, "optimizer", None) is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    def make_train_function(self, force=False):
        """Keras' ``make_train_function``, with the optimizer's variables created first.

        Without a ``tf.distribute`` strategy Keras creates the optimizer's
        slots (Adam's two per trainable variable) inside the first trace of
        the training step, and TensorFlow then traces the step a second time
        because that trace created variables. A quantized model has a
        trainable step and range per quantizer besides its kernels, and each
        variable made inside the trace costs more the larger the graph
        already is: on MobileNetV3Small that was most of the first step's
        time. Built here, eagerly, as Keras does under a strategy, the step
        is traced once (BENCHMARKS.md, first-step time).
        """
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None and not optimizer.built and self.built:
            with self.distribute_strategy.scope():
                optimizer.build(self.trainable_variables)
        return super().make_train_function(force)

    def fit(self, *args, recalibrate_batchnorm=True, **kwargs):
        """``keras.Model.fit``; too many non-finite steps in a row raise
        :class:`tfdq.nonfinite.NonFiniteTrainingError` (see :mod:`tfdq.nonfinite`).

        A model with BatchNormalization layers gets a
        :class:`tfdq.batchnorm.BatchNormRecalibration` among the callbacks,
        so that validation, checkpoints and the model after ``fit`` use
        BatchNorm statistics of the current quantizers (re-estimated on the
        training inputs). ``recalibrate_batchnorm=False`` leaves them as
        Keras' moving averages.

        With a memory budget whose ``finish`` is set and no
        :class:`tfdq.callbacks.FinishInsideBudget` among the callbacks, one is
        added first, so the run ends inside the budget; it runs before the
        BatchNorm re-estimation, whose statistics then follow the final
        allocation."""
        from tfdq import callbacks as callbacks_lib  # noqa: PLC0415

        if recalibrate_batchnorm:
            args, kwargs = batchnorm.fit_with_recalibration(self, args, kwargs)
        state = getattr(self, "_tfdq_nonfinite", None)
        if state is not None:
            state["streak"].assign(0)  # a new fit starts a new count
        budget = self.memory_budget
        if len(args) < 6:  # callbacks not given by position
            callbacks = list(kwargs.get("callbacks") or [])
            if (
                budget is not None
                and budget.finish is not None
                and not any(isinstance(c, callbacks_lib.FinishInsideBudget) for c in callbacks)
            ):
                # the allocation fixed outside a step makes the BatchNorm statistics stale
                recal = [c for c in callbacks if isinstance(c, batchnorm.BatchNormRecalibration)]
                verbose = args[4] if len(args) > 4 else kwargs.get("verbose", "auto")
                callbacks.insert(
                    0,
                    callbacks_lib.FinishInsideBudget(
                        fraction=budget.finish,
                        reestimate_batchnorm=recal[0].mark_stale if recal else None,
                        verbose=0 if verbose == 0 else 1,  # fit(verbose=0) prints nothing
                    ),
                )
            if state is not None:
                callbacks.append(nonfinite.StopOnNonFinite())
            kwargs["callbacks"] = callbacks
        try:
            return super().fit(*args, **kwargs)
        except tf.errors.InvalidArgumentError as e:
            nonfinite.raise_clear(e)

    def train_step(self, data):
        # one forward computation of every quantizer's parameters per step:
        # the layers, the sizes, the clip bounds and the logs share it
        with quantizers_lib.shared_forward_params():
            # a step with a non-finite loss or gradient changes nothing (tfdq.nonfinite)
            with nonfinite.guarding(self):
                logs = super().train_step(data)
            logs = nonfinite.step_logs(self, logs)
            if self.memory_budget is not None:
                self.update_memory_multipliers()
                logs = dict(logs)
                logs.update(self.memory_budget.logs(self, self._sizes()))
        object.__setattr__(self, "_tfdq_step_sizes", None)
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
        if target is not None and target.quantizers_frozen:
            # the final phase of a budget: the allocation stays, the weights adapt
            frozen = {id(v) for q in target.quantizers() for v in q.trainable_weights}
            grads_and_vars = [(g, v) for g, v in grads_and_vars if id(v) not in frozen]
        if target is not None and target.memory_budget is not None:
            variables = [v for _, v in grads_and_vars]
            grads = target.clip_quantizer_gradients([g for g, _ in grads_and_vars], variables)
            grads_and_vars = list(zip(grads, variables))
        step = nonfinite.active_step(target) if target is not None else None
        if step is not None:
            return nonfinite.apply_if_finite(
                target, apply_gradients, grads_and_vars, step["loss"], step["snapshot"]
            )
        return apply_gradients(grads_and_vars)

    # An instance attribute: this optimizer only, set once, read at trace time.
    optimizer.apply_gradients = apply_gradients_with_clipping
    optimizer._tfdq_clipping = True
