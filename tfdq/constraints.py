"""Memory budgets enforced during ordinary training (METHOD.md section 5).

Constraints of the paper, with sizes in kB (1024 bytes):

* (8a) total weight memory ``sum_l S_w,l <= weight_kb``;
* (8b) total activation memory ``sum_l S_x,l <= activation_kb``
  (``activation="sum"``);
* (8c) largest activation ``max_l S_x,l <= activation_kb``
  (``activation="max"``).

They enter the loss as the penalty ``sum_j lambda_j max(0, g_j)^2`` with
``g_j = size_j - target_j``; the bitwidths inside the sizes are the inferred
``b(d, q_max)`` with a straight-through ceiling, so the penalty pushes d up
and q_max down (fewer bits) exactly while a constraint is violated. While a
budget is set the quantizer step/range gradients are clipped to ``[-d, d]``.

Use::

    qmodel = tfdq.constrain(qmodel, weight_kb=70, activation_kb=8, activation="max")
    qmodel.compile(...); qmodel.fit(...)
"""

import keras
import tensorflow as tf

from tfdq import memory
from tfdq.model import QuantizedModel

DEFAULT_LAMBDA = 0.1  # the paper's value for sizes in kB on CIFAR-10
# The paper's ResNet-20 budgets that lambda = 0.1 was tuned for (kB):
# 2-bit weights, and 4-bit activations as the largest map (8c) or in sum (8b).
REFERENCE_KB = {"weight": 65.5, "max": 8.0, "sum": 92.0}


def auto_lambda(target_kb, reference_kb):
    """The paper's scaling of lambda: ``0.1 (reference / target)^2``.

    lambda = 0.1 holds for ResNet-20-sized budgets on CIFAR-10; for ImageNet
    the paper scales it by the square of the model-size ratio, which keeps the
    penalty's pull comparable when sizes (and so excesses) are larger or
    smaller. A 7.6 kB MNIST budget gets lambda = 7.4.
    """
    return DEFAULT_LAMBDA * (reference_kb / target_kb) ** 2


@keras.saving.register_keras_serializable("tfdq")
class MemoryBudget:
    """Targets and penalty weights of the memory constraints.

    Args:
        weight_kb: target of (8a), or None.
        activation_kb: target of (8b) or (8c), or None.
        activation: ``"max"`` for (8c) (default) or ``"sum"`` for (8b).
        weight_lambda, activation_lambda: penalty weights (default 0.1).
        include_input: count the quantizer on the model's input image in the
            activation constraint (default False, as the paper).
        clip_gradients: clip the step/range gradients to [-d, d] (default True).
    """

    def __init__(
        self,
        weight_kb=None,
        activation_kb=None,
        activation="max",
        weight_lambda=DEFAULT_LAMBDA,
        activation_lambda=DEFAULT_LAMBDA,
        include_input=False,
        clip_gradients=True,
    ):
        if weight_kb is None and activation_kb is None:
            raise ValueError(
                "A memory budget needs weight_kb, activation_kb or both "
                "(sizes in kB of 1024 bytes)."
            )
        _check_targets(weight_kb, activation_kb)
        for name, value in (("weight_lambda", weight_lambda), ("activation_lambda", activation_lambda)):
            _check_lambda(name, value)
        if activation not in ("max", "sum"):
            raise ValueError(
                f"activation must be 'max' (largest feature map, 8c) or 'sum' "
                f"(all feature maps, 8b); got {activation!r}."
            )
        self.weight_kb = None if weight_kb is None else float(weight_kb)
        self.activation_kb = None if activation_kb is None else float(activation_kb)
        self.activation = activation
        self.weight_lambda = float(weight_lambda)
        self.activation_lambda = float(activation_lambda)
        self.include_input = bool(include_input)
        self.clip_gradients = bool(clip_gradients)

    def get_config(self):
        return {
            "weight_kb": self.weight_kb,
            "activation_kb": self.activation_kb,
            "activation": self.activation,
            "weight_lambda": self.weight_lambda,
            "activation_lambda": self.activation_lambda,
            "include_input": self.include_input,
            "clip_gradients": self.clip_gradients,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def sizes(self, model, entries=None):
        """Current ``weight_kb`` and activation kB (the constrained kind)."""
        entries = memory.size_entries(model) if entries is None else entries
        out = {"weight_kb": memory.weight_kb(model, entries)}
        out["activation_kb"] = memory.activation_kb(
            model, self.activation, include_input=self.include_input, entries=entries
        )
        return out

    def excess(self, model, entries=None):
        """``g_j = size_j - target_j`` for each active constraint (kB)."""
        sizes = self.sizes(model, entries)
        out = {}
        if self.weight_kb is not None:
            out["weight"] = sizes["weight_kb"] - self.weight_kb
        if self.activation_kb is not None:
            out["activation"] = sizes["activation_kb"] - self.activation_kb
        return out

    def penalty(self, model, entries=None):
        """``sum_j lambda_j max(0, g_j)^2``."""
        lambdas = {"weight": self.weight_lambda, "activation": self.activation_lambda}
        terms = [lambdas[k] * tf.square(tf.nn.relu(g)) for k, g in self.excess(model, entries).items()]
        return tf.add_n(terms)

    def logs(self, model):
        """Size logs plus ``penalty`` and ``budget_met`` (1.0 when all hold)."""
        entries = memory.size_entries(model)
        logs = memory.size_logs(model, entries)
        excess = self.excess(model, entries)
        met = tf.reduce_all(tf.stack([g <= 0.0 for g in excess.values()]))
        logs["penalty"] = self.penalty(model, entries)
        logs["budget_met"] = tf.cast(met, tf.float32)
        return logs

    def satisfied(self, model):
        """Python dict ``constraint -> bool`` for the current parameters."""
        return {k: bool(g <= 0.0) for k, g in self.excess(model).items()}


def _positive_finite(value):
    try:
        return 0 < float(value) < float("inf")
    except (TypeError, ValueError):
        return False


def _check_targets(weight_kb, activation_kb):
    for name, value in (("weight_kb", weight_kb), ("activation_kb", activation_kb)):
        if value is not None and not _positive_finite(value):
            raise ValueError(
                f"{name} must be a positive, finite size in kB, got {value!r}; "
                f"for no {name.split('_')[0]} constraint pass {name}=None."
            )


def _check_lambda(name, value):
    if not _positive_finite(value):
        raise ValueError(
            f"{name} must be a positive, finite penalty weight, got {value!r}: an infinite or NaN "
            "lambda makes the loss non-finite at the first step over the budget. Leave it None "
            "for the default (tfdq.constraints.auto_lambda)."
        )


def constrain(
    model,
    weight_kb=None,
    activation_kb=None,
    activation="max",
    lam=None,
    weight_lambda=None,
    activation_lambda=None,
    include_input=False,
    clip_gradients=True,
):
    """Attach memory constraints to a tfdq model; returns the model to train.

    Any combination of (8a) ``weight_kb`` with (8b)/(8c) ``activation_kb``
    (``activation="sum"`` or ``"max"``). ``lam`` is the penalty weight of
    both (override per constraint with ``weight_lambda`` /
    ``activation_lambda``); by default each is the paper's 0.1 scaled by the
    square of the budget ratio to the paper's ResNet-20 budgets
    (:func:`auto_lambda`: 65.5 kB of weights, 8 kB max / 92 kB sum of
    activations), so small models are pulled as firmly as ResNet-20. Training with ``fit`` then adds the penalty to
    the loss, clips the quantizer gradients to [-d, d] and logs the sizes and
    ``budget_met``. Pass both targets as None to remove the budget.

    Raises ``ValueError`` before training for impossible requests: a model
    without tfdq quantizers, an activation target without activation
    quantizers, non-positive targets, or targets below the smallest size the
    model can reach with every layer at its minimum bitwidth.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"tfdq.constrain takes a keras.Model, got {type(model).__name__}.")
    if not isinstance(model, QuantizedModel):
        model = QuantizedModel(model.input, model.output, name=model.name)
    if not model.quantizers():
        raise ValueError(
            f"Model {model.name!r} has no tfdq quantizers, so there are no "
            "bitwidths to constrain. Quantize it first: "
            "qmodel = tfdq.quantize_model(model)."
        )
    if weight_kb is None and activation_kb is None:
        model.set_memory_budget(None)
        return model
    _check_targets(weight_kb, activation_kb)
    for name, value in (("lam", lam), ("weight_lambda", weight_lambda), ("activation_lambda", activation_lambda)):
        if value is not None:
            _check_lambda(name, value)
    if weight_lambda is None:
        weight_lambda = lam
    if weight_lambda is None and weight_kb is not None and weight_kb > 0:
        weight_lambda = auto_lambda(weight_kb, REFERENCE_KB["weight"])
    if activation_lambda is None:
        activation_lambda = lam
    if activation_lambda is None and activation_kb is not None and activation_kb > 0:
        activation_lambda = auto_lambda(activation_kb, REFERENCE_KB.get(activation, 8.0))
    budget = MemoryBudget(
        weight_kb=weight_kb,
        activation_kb=activation_kb,
        activation=activation,
        weight_lambda=DEFAULT_LAMBDA if weight_lambda is None else weight_lambda,
        activation_lambda=DEFAULT_LAMBDA if activation_lambda is None else activation_lambda,
        include_input=include_input,
        clip_gradients=clip_gradients,
    )
    entries = memory.size_entries(model)
    has_acts = any(e.kind == "activation" and (include_input or not e.is_input) for e in entries)
    if activation_kb is not None and not has_acts:
        raise ValueError(
            f"activation_kb={activation_kb} was given, but model {model.name!r} "
            "has no activation quantizers to constrain. Quantize with "
            "quantize_model(..., quantize_activations=True) or drop activation_kb."
        )
    lowest = memory.minimum_sizes(model, entries, include_input=include_input)
    if weight_kb is not None and budget.weight_kb < lowest["weight_kb"]:
        raise ValueError(
            f"weight_kb={weight_kb} is below the smallest weight size this model "
            f"can reach: {lowest['weight_kb']:.3f} kB, with every quantized layer "
            "at its minimum bitwidth (float layers at 32 bits). Raise the budget, "
            "or lower the minimum with quantize_model(..., weight_bits=(min, max))."
        )
    key = "activation_kb_" + activation
    if activation_kb is not None and budget.activation_kb < lowest[key]:
        raise ValueError(
            f"activation_kb={activation_kb} ({activation}) is below the smallest "
            f"activation size this model can reach: {lowest[key]:.3f} kB, with "
            "every activation quantizer at its minimum bitwidth. Raise the budget, "
            "or lower the minimum with quantize_model(..., activation_bits=(min, max))."
        )
    model.set_memory_budget(budget)
    return model


def enforce_budget(model, step=0.05, max_steps=10000):
    """Move the quantizer parameters until every constraint of the budget holds.

    Gradient descent on the penalty alone (no data needed: sizes depend only
    on the quantizer parameters), each step ``step * clip(grad, -d, d)`` with
    the usual projection, so every over-budget layer gives up bits at the
    same relative pace and the allocation learned so far keeps its shape.
    Training with a penalty crosses the budget back and forth (each bit of a
    big layer is a jump in size); call this at the end, then
    :func:`freeze_quantizers` and fine-tune the weights, to finish inside the
    budget. Returns the number of steps taken.
    """
    budget = getattr(model, "memory_budget", None)
    if budget is None:
        raise ValueError("The model has no memory budget: call tfdq.constrain(model, ...) first.")
    quantizers = model.quantizers()
    variables = [v for q in quantizers for v in q.trainable_weights]
    for n in range(max_steps):
        if all(budget.satisfied(model).values()):
            return n
        with tf.GradientTape() as tape:
            penalty = budget.penalty(model)
        grads = tape.gradient(penalty, variables)
        pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
        from tfdq.quantizers import clip_gradients  # noqa: PLC0415

        for g, v in clip_gradients(pairs, quantizers):
            v.assign_sub(step * g)
        for v in variables:
            if v.constraint is not None:
                v.assign(v.constraint(v))
    if all(budget.satisfied(model).values()):
        return max_steps
    raise RuntimeError(
        f"The budget still does not hold after {max_steps} steps: "
        f"{ {k: float(g) for k, g in budget.excess(model).items()} } kB over."
    )


def freeze_quantizers(model, frozen=True):
    """Stop (or with ``frozen=False`` resume) training the quantizer parameters.

    Compile the model again afterwards: Keras reads the trainable variables
    when it traces the training step.
    """
    for q in model.quantizers():
        q.trainable = not frozen
    return model
