"""Keras callbacks for learned-quantization training."""

import os
import tempfile
import threading

import keras
import numpy as np

from tfdq import memory, nonfinite

_umask_lock = threading.Lock()


def respect_umask(path, directory=False):
    """Give a file made by ``tempfile`` (mode 0600, folders 0700) the mode a
    plain ``open``/``mkdir`` gets under the process umask."""
    with _umask_lock:  # reading the umask means setting it
        mask = os.umask(0o022)
        os.umask(mask)
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)


class MemoryLogger(keras.callbacks.Callback):
    """Adds ``weight_kb``, ``act_kb_sum``, ``act_kb_max`` and ``mean_bits`` to
    the epoch logs (History, CSVLogger, TensorBoard) of any tfdq model.

    With ``per_layer=True`` it also adds ``bits/<layer>`` for every quantizer.
    A model with a memory budget already logs the totals from its training step.
    """

    def __init__(self, per_layer=False):
        super().__init__()
        self.per_layer = per_layer

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        entries = memory.size_entries(self.model)
        for key, value in memory.size_logs(self.model, entries).items():
            logs.setdefault(key, float(value))
        if self.per_layer:
            for e in entries:
                if e.quantizer is not None:
                    logs[f"bits/{e.name}"] = float(e.bits())


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` through a hidden temporary file, ``fsync``
    and a rename: a kill leaves the old file or the new one, never a part
    (the file gets the mode the umask gives)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        respect_umask(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(model, filepath):
    """Save ``model`` to ``filepath`` through a temporary file and a rename,
    so an interrupted save never leaves a truncated file behind (a kill
    leaves at most a hidden ``.tmp-*`` file, which ``tfdq.train.train`` removes at
    its next start). A model with NaN or Inf values is refused
    (:class:`tfdq.nonfinite.NonFiniteError`, nothing written)."""
    nonfinite.check_finite(model, f"save {filepath}")
    directory = os.path.dirname(os.path.abspath(filepath))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(filepath)[1] or ".keras"
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=suffix, prefix=".tmp-")
    os.close(fd)
    try:
        if suffix == ".h5" or filepath.endswith(".weights.h5"):
            model.save_weights(tmp if tmp.endswith(".weights.h5") else tmp + ".weights.h5")
        else:
            model.save(tmp)
        respect_umask(tmp)
        os.replace(tmp, filepath)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class BestFeasibleCheckpoint(keras.callbacks.Callback):
    """Keep the best model among epochs whose memory constraints all hold.

    The reference training's rule: after each epoch, if ``budget_met`` is 1
    (every constraint satisfied) and ``monitor`` improved on the best
    feasible epoch so far, save the whole model to ``filepath`` (atomically).
    ``best_epoch`` and ``best`` tell which epoch was kept (None if no epoch
    was feasible).
    """

    def __init__(self, filepath, monitor="val_accuracy", mode="max", verbose=1):
        super().__init__()
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}.")
        self.filepath = filepath
        self.monitor = monitor
        self.mode = mode
        self.verbose = verbose
        self.best = None
        self.best_epoch = None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.monitor not in logs:
            raise KeyError(
                f"BestFeasibleCheckpoint monitors {self.monitor!r}, which is not in "
                f"the logs ({sorted(logs)}). Pass validation_data to fit or choose "
                "another monitor."
            )
        # Read the budget from the parameters as they are now: the step logs
        # may predate the last update.
        budget = getattr(self.model, "memory_budget", None)
        met = 1.0 if budget is None else float(all(budget.satisfied(self.model).values()))
        value = float(logs[self.monitor])
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if met >= 1.0 and np.isfinite(value) and better:
            atomic_save(self.model, self.filepath)
            if self.verbose:
                print(
                    f"\nEpoch {epoch + 1}: constraints met, {self.monitor} {value:.4f}: saved {self.filepath}"
                )
            self.best, self.best_epoch = value, epoch
        self._last_excess = (
            None if budget is None else {k: float(g) for k, g in budget.excess(self.model).items()}
        )

    def on_train_end(self, logs=None):
        """Never end silently without a file: if no epoch met the budget,
        save the final model if it meets it now (the end-of-training phase
        brings it inside), else say which constraint was missed by how much."""
        if self.best_epoch is not None:
            return
        budget = getattr(self.model, "memory_budget", None)
        if budget is not None and all(budget.satisfied(self.model).values()):
            atomic_save(self.model, self.filepath)
            print(
                f"BestFeasibleCheckpoint: no epoch ended inside the budget; the final model meets it "
                f"(the allocation was fixed at the end of training): saved {self.filepath} "
                f"({self.monitor} not evaluated for it)."
            )
            return
        excess = getattr(self, "_last_excess", None) or (
            {} if budget is None else {k: float(g) for k, g in budget.excess(self.model).items()}
        )
        print(
            f"BestFeasibleCheckpoint: no epoch met every constraint, so {self.filepath} was not written. "
            f"Over the targets by (kB): {excess}. Let fit end inside the budget "
            "(tfdq.constrain(..., finish=0.2), the default, or tfdq.callbacks.FinishInsideBudget), "
            "or call tfdq.constraints.enforce_budget(model) and train the weights again."
        )


class FinishInsideBudget(keras.callbacks.Callback):
    """The final phase of constrained training: allocation fixed, weights adapting.

    At the start of the last ``epochs`` epochs (or the last ``fraction`` of
    them) of ``fit``, :func:`tfdq.constraints.enforce_budget` moves the
    bitwidths inside every constraint and fills the slack (the sizes land
    just under the targets), ``reestimate_batchnorm(model)`` runs if given,
    and the quantizer parameters stop training (the optimizer skips them)
    while the weights adapt to the fixed grids. If no final phase ran (a
    one-epoch ``fit``, or training stopped early) the allocation is fixed at
    the end of training instead, so ``fit`` always returns a model that
    meets every constraint with its slack used; the quantizers are then
    released for any later ``fit``.
    ``QuantizedModel.fit`` adds one by itself when the budget's ``finish``
    is set (the default).

    Args:
        epochs: epochs of the final phase (overrides ``fraction``).
        fraction: fraction of the ``fit``'s epochs (default 0.2, at least 1
            epoch when the run has 2 or more).
        reestimate_batchnorm: optional callable ``f(model)`` run once the
            allocation is fixed, e.g. a BatchNorm statistics re-estimation
            on training data (bit changes shift the activations).
        verbose: print what was done.
        start_epoch, total_epochs: for one training split over several
            ``fit`` calls (a run resumed from a checkpoint, or an epoch
            finished on its own): the final phase is epochs ``start_epoch``
            to ``total_epochs - 1`` (0-based, as ``fit``'s ``initial_epoch``
            counts them) whatever each ``fit``'s ``initial_epoch`` and
            ``epochs``; the allocation is fixed at the start of every ``fit``
            that runs a final-phase epoch (again after a resumption: a fixed
            allocation stays as it is), and the end-of-training fix applies
            only to the ``fit`` that reaches ``total_epochs``. Give both;
            ``start_epoch == total_epochs`` fixes the allocation at the end
            only.
    """

    def __init__(
        self,
        epochs=None,
        fraction=0.2,
        reestimate_batchnorm=None,
        verbose=1,
        start_epoch=None,
        total_epochs=None,
    ):
        super().__init__()
        if epochs is not None and epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {epochs}.")
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must lie in (0, 1), got {fraction}.")
        if (start_epoch is None) != (total_epochs is None):
            raise ValueError(
                "Give start_epoch and total_epochs together (the final phase of a training split "
                "over several fit calls), or neither."
            )
        if start_epoch is not None and not 0 <= start_epoch <= total_epochs:
            raise ValueError(
                f"Need 0 <= start_epoch <= total_epochs, got start_epoch={start_epoch}, "
                f"total_epochs={total_epochs}."
            )
        self.epochs = epochs
        self.fraction = fraction
        self.reestimate_batchnorm = reestimate_batchnorm
        self.verbose = verbose
        self.first_final_epoch = start_epoch
        self.total_epochs = total_epochs
        self.start_epoch = None
        self.changes = None
        self.fixed_at_end = False
        self._end = None

    def on_train_begin(self, logs=None):
        if getattr(self.model, "memory_budget", None) is None:
            raise ValueError(
                "FinishInsideBudget needs a model with a memory budget: "
                "call tfdq.constrain(model, weight_kb=..., ...) first."
            )
        # given, or set at the first epoch (fit may start at initial_epoch)
        self.start_epoch = self.first_final_epoch
        self.changes = None
        self.fixed_at_end = False
        self._end = None

    def _fix_allocation(self):
        from tfdq import constraints  # noqa: PLC0415

        self.changes = constraints.enforce_budget(self.model, fill=True, verbose=self.verbose)
        if self.reestimate_batchnorm is not None:
            self.reestimate_batchnorm(self.model)

    def on_epoch_begin(self, epoch, logs=None):
        if self.start_epoch is None:
            total = int(self.params.get("epochs") or 1)
            span = total - epoch  # epochs of this fit
            n = self.epochs if self.epochs is not None else max(1, round(self.fraction * span))
            # a fit of one epoch has no final phase (fixed at its end if needed)
            self.start_epoch = max(total - n, epoch + 1) if span >= 2 and n > 0 else total
        if epoch < self.start_epoch or self.model.quantizers_frozen:
            return
        if self.verbose:
            print(f"\nEpoch {epoch + 1}: final phase: allocation fixed inside the budget, weights adapting")
        self._fix_allocation()
        self.model.quantizers_frozen = True
        if getattr(self.model, "compiled", False):  # fit's step; a custom loop retraces its own
            self.model.make_train_function(force=True)

    def on_epoch_end(self, epoch, logs=None):
        self._end = epoch + 1

    def on_train_end(self, logs=None):
        budget = self.model.memory_budget
        ended = self.total_epochs is None or (self._end is not None and self._end >= self.total_epochs)
        if ended and (self.changes is None or not all(budget.satisfied(self.model).values())):
            # no final phase ran (a one-epoch fit, or training stopped early): fix the
            # allocation now, inside the budget and with its slack used
            if self.verbose:
                print("tfdq: fixing the allocation inside the budget at the end of training")
            self._fix_allocation()
            self.fixed_at_end = True
        if self.model.quantizers_frozen:
            self.model.quantizers_frozen = False
            self.model.train_function = None


from tfdq.batchnorm import BatchNormRecalibration  # noqa: E402,F401  (also tfdq.callbacks.BatchNormRecalibration)
