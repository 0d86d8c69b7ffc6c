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
    leaves at most a hidden ``.tmp-*`` file, which ``train.train`` removes at
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
                print(f"\nEpoch {epoch + 1}: constraints met, {self.monitor} {value:.4f}: saved {self.filepath}")
            self.best, self.best_epoch = value, epoch


from tfdq.batchnorm import BatchNormRecalibration  # noqa: E402,F401  (also tfdq.callbacks.BatchNormRecalibration)
