"""Memory budgets met during ordinary training (section 4 of the paper).

Constraints of the paper, with sizes in kB (1024 bytes):

* (8a) total weight memory ``sum_l S_w,l <= weight_kb``;
* (8b) total activation memory ``sum_l S_x,l <= activation_kb``
  (``activation="sum"``);
* (8c) largest activation ``max_l S_x,l <= activation_kb``
  (``activation="max"``).

With ``g_j = size_j - target_j``, the user gives only the targets: each
constraint gets a Lagrange multiplier that training learns (the loss term
``sum_j lambda_j g_j / target_j``; after every step ``lambda_j`` grows while
``g_j > 0`` and decays while the constraint holds). The paper's penalty
``sum_j lambda_j max(0, g_j)^2`` with fixed ``lambda_j`` stays available
(``multipliers="fixed"``, or by giving a lambda). The bitwidths inside the
sizes are differentiable in the quantizer parameters (straight-through), so
the term pushes d up and q_max down (fewer bits). While a budget is set the
quantizer step/range gradients are clipped to ``[-d, d]``.

The last part of ``fit`` is the final phase
(:class:`tfdq.callbacks.FinishInsideBudget`): :func:`enforce_budget` moves
the allocation inside every constraint bit by bit and fills the slack, the
quantizers stop training and the weights adapt, so ``fit`` ends with every
constraint met and each size just under its target.

Use::

    qmodel = tfdq.constrain(qmodel, weight_kb=70, activation_kb=8, activation="max")
    qmodel.compile(...); qmodel.fit(...)
"""

from __future__ import annotations

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


CONSTRAINTS = ("weight", "activation")
# Multiplier controller (automatic multipliers), per training step, on the
# relative violation r = (size - target) / target:
#   I <- max(0, I + KI r),   lambda = max(0, I + KP r).
# KP = 0 is plain dual ascent (gradient ascent on the multiplier); KP > 0
# adds the proportional term of a PI controller (Sohrabi et al., ICML 2024).
# Chosen by measurement on the MNIST CNN (BENCHMARKS.md, "Budgets"): dual
# ascent with KI = 0.1 met the budgets in more epochs and with fewer bit
# changes at the final phase than KI = 0.01 (with or without KP = 0.1, which
# overshot to 81% of the weight target).
DEFAULT_KP = 0.0
DEFAULT_KI = 0.1


@keras.saving.register_keras_serializable("tfdq")
class MemoryBudget:
    """Targets of the memory constraints and how training meets them.

    Args:
        weight_kb: target of (8a), or None.
        activation_kb: target of (8b) or (8c), or None.
        activation: ``"max"`` for (8c) (default) or ``"sum"`` for (8b).
        multipliers: ``"auto"`` (default): each constraint's weight is a
            Lagrange multiplier that training learns (it grows while the
            constraint is violated and decays while it holds; see
            :meth:`update_multipliers`), so only targets are given.
            ``"fixed"``: the paper's penalty ``sum_j lambda_j max(0, g_j)^2``
            with the fixed weights below (for reproducing the paper).
        weight_lambda, activation_lambda: the fixed penalty weights
            (``multipliers="fixed"``; default 0.1, the paper's value).
        kp, ki: proportional and integral gains of the multiplier controller
            (``multipliers="auto"``; ``kp=0`` is plain dual ascent).
        finish: fraction of the epochs of each ``fit`` spent in the final
            phase (allocation fixed inside the budget, weights adapting;
            :class:`tfdq.callbacks.FinishInsideBudget`), or None to leave the
            end of training to the caller. Default 0.2.
        include_input: count the quantizer on the model's input image in the
            activation constraint (default False, as the paper).
        clip_gradients: clip the step/range gradients to [-d, d] (default True).
        multiplier_state: saved controller state (set by ``get_config``).
    """

    def __init__(
        self,
        weight_kb=None,
        activation_kb=None,
        activation="max",
        multipliers="auto",
        weight_lambda=DEFAULT_LAMBDA,
        activation_lambda=DEFAULT_LAMBDA,
        kp=DEFAULT_KP,
        ki=DEFAULT_KI,
        finish=0.2,
        include_input=False,
        clip_gradients=True,
        multiplier_state=None,
    ):
        if weight_kb is None and activation_kb is None:
            raise ValueError(
                "A memory budget needs weight_kb, activation_kb or both (sizes in kB of 1024 bytes)."
            )
        _check_targets(weight_kb, activation_kb)
        for name, value in (("weight_lambda", weight_lambda), ("activation_lambda", activation_lambda)):
            _check_lambda(name, value)
        if activation not in ("max", "sum"):
            raise ValueError(
                f"activation must be 'max' (largest feature map, 8c) or 'sum' "
                f"(all feature maps, 8b); got {activation!r}."
            )
        if multipliers not in ("auto", "fixed"):
            raise ValueError(
                f"multipliers must be 'auto' (learned Lagrange multipliers: give only "
                f"targets) or 'fixed' (the paper's penalty with weight_lambda / "
                f"activation_lambda); got {multipliers!r}."
            )
        if not (kp >= 0 and ki > 0):
            raise ValueError(f"The multiplier gains need kp >= 0 and ki > 0, got kp={kp}, ki={ki}.")
        if finish is not None and not 0 < finish < 1:
            raise ValueError(
                f"finish is the fraction of the epochs spent in the final phase, in (0, 1), "
                f"or None for no final phase; got {finish}."
            )
        self.weight_kb = None if weight_kb is None else float(weight_kb)
        self.activation_kb = None if activation_kb is None else float(activation_kb)
        self.activation = activation
        self.multipliers = multipliers
        self.weight_lambda = float(weight_lambda)
        self.activation_lambda = float(activation_lambda)
        self.kp = float(kp)
        self.ki = float(ki)
        self.finish = None if finish is None else float(finish)
        self.include_input = bool(include_input)
        self.clip_gradients = bool(clip_gradients)
        self._initial_state = dict(multiplier_state or {})
        self._state = None

    def get_config(self):
        return {
            "weight_kb": self.weight_kb,
            "activation_kb": self.activation_kb,
            "activation": self.activation,
            "multipliers": self.multipliers,
            "weight_lambda": self.weight_lambda,
            "activation_lambda": self.activation_lambda,
            "kp": self.kp,
            "ki": self.ki,
            "finish": self.finish,
            "include_input": self.include_input,
            "clip_gradients": self.clip_gradients,
            "multiplier_state": self.multiplier_values(),
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def targets(self):
        """``{"weight": kB, "activation": kB}`` of the active constraints."""
        out = {}
        if self.weight_kb is not None:
            out["weight"] = self.weight_kb
        if self.activation_kb is not None:
            out["activation"] = self.activation_kb
        return out

    # -- multipliers ---------------------------------------------------------

    def build_multipliers(self):
        """Create the controller variables (integral and multiplier per
        constraint) if not there yet. Called eagerly by ``constrain`` and
        ``compile`` (create them under a ``tf.distribute`` scope to mirror them)."""
        if self._state is not None or self.multipliers != "auto":
            return
        self._state = {}
        for name in self.targets():
            integral, lam = self._initial_state.get(name, (0.0, 0.0))
            self._state[name] = tuple(
                tf.Variable(
                    float(v),
                    trainable=False,
                    dtype=tf.float32,
                    name=f"tfdq_{name}_{kind}",
                    synchronization=tf.VariableSynchronization.ON_WRITE,
                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
                )
                for kind, v in (("integral", integral), ("multiplier", lam))
            )

    def multiplier_values(self):
        """Current ``{constraint: (integral, multiplier)}`` as Python floats."""
        if self._state is None:
            return dict(self._initial_state)
        return {k: (float(i.numpy()), float(l.numpy())) for k, (i, l) in self._state.items()}

    def lambdas(self):
        """The weight of each constraint now: the learned multipliers
        (``"auto"``) or the fixed penalty weights, as tensors."""
        if self.multipliers == "fixed":
            fixed = {"weight": self.weight_lambda, "activation": self.activation_lambda}
            return {k: tf.constant(fixed[k]) for k in self.targets()}
        self.build_multipliers()
        return {k: tf.convert_to_tensor(lam) for k, (_, lam) in self._state.items()}

    def update_multipliers(self, model, sizes=None):
        """One controller step (``"auto"`` only; call once per training step,
        after the optimizer step, with the sizes that step used):
        ``I <- max(0, I + ki r)``, ``lambda = max(0, I + kp r)`` with the
        relative violation ``r = (size - target) / target``."""
        if self.multipliers != "auto":
            return
        self.build_multipliers()
        targets = self.targets()
        for name, g in self.excess(model, sizes).items():
            integral, lam = self._state[name]
            r = tf.stop_gradient(g) / targets[name]
            new_integral = tf.maximum(integral + self.ki * r, 0.0)
            integral.assign(new_integral)
            lam.assign(tf.maximum(new_integral + self.kp * r, 0.0))

    # -- sizes -----------------------------------------------------------------

    def sizes(self, model, entries=None):
        """Current ``weight_kb`` and activation kB (the constrained kind).

        ``entries`` may be a :class:`tfdq.memory.Sizes` already computed."""
        s = entries if isinstance(entries, memory.Sizes) else memory.Sizes(model, entries)
        return {
            "weight_kb": s.weight_kb(),
            "activation_kb": s.activation_kb(self.activation, include_input=self.include_input),
        }

    def excess(self, model, entries=None):
        """``g_j = size_j - target_j`` for each active constraint (kB)."""
        sizes = self.sizes(model, entries)
        return {k: sizes[f"{k}_kb"] - t for k, t in self.targets().items()}

    def penalty(self, model, entries=None):
        """The budget's loss term.

        ``"fixed"``: the paper's ``sum_j lambda_j max(0, g_j)^2`` (kB).
        ``"auto"``: the Lagrangian term ``sum_j lambda_j g_j / target_j`` with
        the learned multipliers (constant within a step).
        """
        lambdas = self.lambdas()
        excess = self.excess(model, entries)
        if self.multipliers == "fixed":
            terms = [lambdas[k] * tf.square(tf.nn.relu(g)) for k, g in excess.items()]
        else:
            targets = self.targets()
            terms = [tf.stop_gradient(lambdas[k]) * g / targets[k] for k, g in excess.items()]
        return tf.add_n(terms)

    def logs(self, model, entries=None):
        """Size logs plus ``penalty``, ``budget_met`` (1.0 when all hold) and,
        with automatic multipliers, ``lambda_weight`` / ``lambda_activation``."""
        sizes = entries if isinstance(entries, memory.Sizes) else memory.Sizes(model, entries)
        logs = sizes.logs()
        excess = self.excess(model, sizes)
        met = tf.reduce_all(tf.stack([g <= 0.0 for g in excess.values()]))
        logs["penalty"] = self.penalty(model, sizes)
        logs["budget_met"] = tf.cast(met, tf.float32)
        if self.multipliers == "auto":
            for k, lam in self.lambdas().items():
                logs[f"lambda_{k}"] = lam
        return logs

    def satisfied(self, model, entries=None):
        """Python dict ``constraint -> bool`` for the current parameters."""
        return {k: bool(g <= 0.0) for k, g in self.excess(model, entries).items()}


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
    model: QuantizedModel,
    weight_kb: float | None = None,
    activation_kb: float | None = None,
    activation: str = "max",
    lam: float | None = None,
    weight_lambda: float | None = None,
    activation_lambda: float | None = None,
    multipliers: str | None = None,
    finish: float | str | None = "auto",
    include_input: bool = False,
    clip_gradients: bool = True,
    kp: float = DEFAULT_KP,
    ki: float = DEFAULT_KI,
) -> QuantizedModel:
    """Attach memory constraints to a tfdq model; returns the model to train.

    Any combination of (8a) ``weight_kb`` with (8b)/(8c) ``activation_kb``
    (``activation="sum"`` or ``"max"``). Give only the targets: by default
    each constraint's weight is a Lagrange multiplier learned during
    training (``multipliers="auto"``, :class:`MemoryBudget`), and the last
    ``finish`` fraction of every ``fit`` fixes the allocation inside the
    budget (using its slack) and trains the weights only
    (:class:`tfdq.callbacks.FinishInsideBudget`), so ``fit`` ends with every
    constraint met.

    The paper's fixed penalty ``sum_j lambda_j max(0, g_j)^2`` is used when
    a weight is given (``lam`` for both constraints, or ``weight_lambda`` /
    ``activation_lambda``) or with ``multipliers="fixed"``; a weight not
    given is then the paper's 0.1 scaled by the square of the budget ratio
    to the paper's ResNet-20 budgets (:func:`auto_lambda`), and ``finish``
    defaults to None (the paper's recipe: keep the best feasible epoch with
    :class:`tfdq.callbacks.BestFeasibleCheckpoint`; pass ``finish=0.2`` to
    end inside the budget as with learned multipliers). Training with
    ``fit`` adds the budget's term to the loss, clips the quantizer
    gradients to [-d, d] and logs the sizes and ``budget_met``. ``kp`` /
    ``ki``: gains of the multiplier controller (:class:`MemoryBudget`).
    Pass both targets as None to remove the budget.

    Raises ``ValueError`` before training for impossible requests: a model
    without tfdq quantizers, an activation target without activation
    quantizers, non-positive targets, or targets below the smallest size the
    model can reach with every layer at its minimum bitwidth.

    Example (``qmodel`` and ``x`` as in :func:`tfdq.quantize_model`'s example;
    1,490 weights at 4 bits are 0.73 kB, and 2 bits on the Dense layer fit
    0.5 kB where 3 do not):

    >>> qmodel = tfdq.constrain(qmodel, weight_kb=0.5)
    >>> qmodel.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    >>> _ = qmodel.fit(x, np.arange(32) % 10, epochs=2, verbose=0)
    >>> qmodel.memory_budget.satisfied(qmodel), round(float(qmodel.memory_budget.sizes(qmodel)["weight_kb"]), 3)
    ({'weight': True}, 0.388)
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
    for name, value in (
        ("lam", lam),
        ("weight_lambda", weight_lambda),
        ("activation_lambda", activation_lambda),
    ):
        if value is not None:
            _check_lambda(name, value)
    given = any(v is not None for v in (lam, weight_lambda, activation_lambda))
    if multipliers is None:
        multipliers = "fixed" if given else "auto"
    if finish == "auto":
        finish = 0.2 if multipliers == "auto" else None
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
        multipliers=multipliers,
        weight_lambda=DEFAULT_LAMBDA if weight_lambda is None else weight_lambda,
        activation_lambda=DEFAULT_LAMBDA if activation_lambda is None else activation_lambda,
        kp=kp,
        ki=ki,
        finish=finish,
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
    budget.build_multipliers()
    model.set_memory_budget(budget)
    return model


def _constrained_entries(budget, sizes):
    """``(index, entry, constraint)`` of the quantized tensors each active constraint counts."""
    out = []
    for i, e in enumerate(sizes.entries):
        if e.quantizer is None:
            continue
        if e.kind == "weight" and budget.weight_kb is not None:
            out.append((i, e, "weight"))
        elif (
            e.kind == "activation"
            and budget.activation_kb is not None
            and (budget.include_input or not e.is_input)
        ):
            out.append((i, e, "activation"))
    return out


def _try_bits(budget, model, entry, bits, keep_feasible):
    """Move ``entry`` to ``bits``; undo (and return False) if it did not land
    there or, with ``keep_feasible``, if a constraint broke."""
    saved = [v.numpy() for v in entry.quantizer._param_vars.values()]
    entry.quantizer.set_bits(bits, kernel=entry.layer.kernel if entry.kind == "weight" else None)
    ok = float(entry.bits()) == bits
    if ok and keep_feasible:
        ok = all(budget.satisfied(model).values())
    if not ok:
        for v, value in zip(entry.quantizer._param_vars.values(), saved):
            v.assign(value)
    return ok


def enforce_budget(model, fill=True, verbose=0):
    """Move the allocation inside the budget, then use the slack.

    Bit by bit, with no data (sizes depend only on the quantizer parameters
    and, for weights, the kernels): while a constraint is violated, the
    tensor it counts with the most bits (ties: the largest) gives up one
    bit (for (8c), only feature maps over the target). Then, with ``fill``,
    while a tensor can gain a bit without breaking any constraint, the one
    with the fewest bits (ties: the largest that fits) gains it, so the
    final sizes land just under the targets. Every tensor is also capped to
    the range its charged bits store (:meth:`Quantizer.set_bits`), so
    weights that grow later cannot raise its bits. Returns the number of
    bit changes. Raises ``RuntimeError`` if the budget cannot be met.
    """
    budget = getattr(model, "memory_budget", None)
    if budget is None:
        raise ValueError("The model has no memory budget: call tfdq.constrain(model, ...) first.")
    sizes = memory.Sizes(model)
    chosen = _constrained_entries(budget, sizes)
    for _, e, _ in chosen:  # pin each tensor's range to its charged bits
        _try_bits(budget, model, e, float(e.bits()), keep_feasible=False)
    changes = 0
    blocked, full = set(), set()  # (entry, bits) that cannot go down / up
    while True:
        sizes = memory.Sizes(model)
        excess = budget.excess(model, sizes)
        over = [k for k, g in excess.items() if float(g) > 0]
        if not over:
            break
        candidates = []
        for i, e, kind in chosen:
            b = float(sizes.bits[i])
            if kind not in over or b <= e.quantizer.bounds["bits"][0] or (i, b) in blocked:
                continue
            if kind == "activation" and budget.activation == "max":
                if e.count * b / memory.BITS_PER_KB <= budget.activation_kb:
                    continue
            candidates.append((b, e.count, i, e))
        if not candidates:
            raise RuntimeError(
                f"The budget cannot be met: { ({k: round(float(g), 4) for k, g in excess.items()}) } kB "
                "over with every constrained tensor at its lowest reachable bitwidth."
            )
        b, _, i, e = max(candidates, key=lambda c: (c[0], c[1]))
        if _try_bits(budget, model, e, b - 1.0, keep_feasible=False):
            changes += 1
        else:
            blocked.add((i, b))
    while fill:
        sizes = memory.Sizes(model)
        candidates = []
        for i, e, _ in chosen:
            b = float(sizes.bits[i])
            if b < e.quantizer.bounds["bits"][1] and (i, b) not in full:
                candidates.append((b, -e.count, i, e))
        grown = False
        for b, _, i, e in sorted(candidates):
            if _try_bits(budget, model, e, b + 1.0, keep_feasible=True):
                changes += 1
                grown = True
                break
            full.add((i, b))
        if not grown:
            break
    if verbose:
        s = memory.Sizes(model)
        print(
            f"tfdq: allocation inside the budget after {changes} bit changes: "
            + ", ".join(
                f"{k} {float(v):.3f} / {t:.3f} kB"
                for (k, t), v in zip(
                    budget.targets().items(), [budget.sizes(model, s)[f"{k}_kb"] for k in budget.targets()]
                )
            )
        )
    return changes


def freeze_quantizers(model, frozen=True):
    """Stop (or with ``frozen=False`` resume) training the quantizer parameters.

    Compile the model again afterwards: Keras reads the trainable variables
    when it traces the training step.
    """
    for q in model.quantizers():
        q.trainable = not frozen
    return model
