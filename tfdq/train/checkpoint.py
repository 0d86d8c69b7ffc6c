"""Crash-safe checkpoints and the guard that keeps a model_dir to one run.

A checkpoint is a folder ``ckpt-e{epoch}-s{step}`` holding the whole model
(``model.keras``), the optimizer's variables (``optimizer.npz``: slots and
iteration counter, so learning-rate schedules continue) and ``state.json``
(completed epochs, step inside the epoch, history so far, the best feasible
epoch). It is written into a hidden temporary folder and renamed into place
(an atomic rename on POSIX file systems), so a process killed at any moment
leaves either the previous checkpoint or the new one, never a half-written
one. Older checkpoints are deleted after the new one is in place: each is
first renamed to a hidden temporary name, so a kill during the deletion
leaves nothing that looks like a checkpoint, and the leftovers are removed
at the next save or start. A checkpoint is never written from a model with
NaN or Inf values (:class:`tfdq.nonfinite.NonFiniteError`).

On resume, a damaged latest checkpoint (truncated ``model.keras``, broken
``state.json``, truncated ``optimizer.npz``) is set aside as
``damaged-ckpt-...`` with a warning naming it, and the run resumes from the
previous intact one (:meth:`Checkpointer.restore_latest`).

:class:`RunLock` keeps a run folder to one process: a second process on the
same folder is refused before it changes anything.

``TFDQ_FAULT_INJECT=<point>`` (a testing hook, see :func:`fault_point`)
kills the process with SIGKILL at a named point of the checkpoint writer,
so fault-injection tests stop a run at a chosen, deterministic place.
"""

import errno
import json
import os
import shutil
import signal
import tempfile

import keras
import numpy as np

from tfdq.callbacks import atomic_write_bytes, respect_umask

CONFIG_FILE = "flags.json"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"
DAMAGED_PREFIX = "damaged-"
FAULT_ENV = "TFDQ_FAULT_INJECT"


def fault_point(name):
    """Testing hook: SIGKILL this process here if ``$TFDQ_FAULT_INJECT == name``."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write_text(path, text):
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "numpy"):
        return np.asarray(value.numpy()).tolist()
    return str(value)


class RunDirError(RuntimeError):
    """``--model_dir`` holds something that is not this run, or cannot be used."""


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``model_dir/.lock``, held until
    :meth:`release` or the process ends (the OS drops it on any exit, SIGKILL
    included, so a crash never leaves a stale lock)."""

    def __init__(self, model_dir):
        self.path = os.path.join(model_dir, LOCK_FILE)
        self._file = None

    def acquire(self):
        try:
            import fcntl  # noqa: PLC0415
        except ImportError:  # not POSIX: no lock
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise RunDirError(
                f"--model_dir={os.path.dirname(self.path)} is in use by {holder}, which is "
                "training in it now (it holds the folder's lock). Nothing was changed. Wait "
                "for it to finish (re-running the same command then resumes or reports the "
                "finished run), stop it, or choose another --model_dir."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()}\n")
        handle.flush()
        self._file = handle
        return self

    def release(self):
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None


def remove_stale_temporaries(model_dir, depth=3):
    """Delete the hidden temporaries (``.tmp-*``) a killed process left in
    ``model_dir`` and its stage and checkpoint folders; call only while
    holding the folder's :class:`RunLock`."""
    if depth < 0 or not os.path.isdir(model_dir):
        return
    for name in os.listdir(model_dir):
        path = os.path.join(model_dir, name)
        if name.startswith(TMP_PREFIX):
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.remove(path)
                except OSError:
                    pass
        elif os.path.isdir(path) and name != "workers" and not name.startswith(Checkpointer.PREFIX):
            remove_stale_temporaries(path, depth - 1)


def _read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise RunDirError(
            f"{path} ({what}) is damaged and cannot be read: {e}. Nothing was changed. Restore "
            "the file from a copy, or start the run again in a new --model_dir."
        ) from None


def claim_model_dir(model_dir, config, ignore=(), write=True):
    """Record ``config`` in ``model_dir/flags.json``, or check it matches.

    A new or empty folder is claimed (the config is written). A folder that
    holds this run (same config, apart from the keys in ``ignore``) is
    resumed. Anything else is refused with :class:`RunDirError`: a run with
    other flags, or a non-empty folder that is not a tfdq training run.
    Returns True when an earlier run is resumed. With ``write=False`` only
    checks (nothing is created).
    """
    path = os.path.join(model_dir, CONFIG_FILE)
    _check_writable(model_dir)
    if os.path.exists(path):
        old = _read_json(path, "the flags of the run in this folder")
        keys = (set(old) | set(config)) - set(ignore)
        diff = sorted(k for k in keys if old.get(k) != config.get(k))
        if diff:
            lines = "\n".join(f"  --{k}: this run {config.get(k)!r}, stored run {old.get(k)!r}" for k in diff)
            raise RunDirError(
                f"--model_dir={model_dir} holds a run with different flags:\n{lines}\n"
                "It is not overwritten. Re-run with the stored flags to resume it "
                f"(they are in {path}), or choose a new --model_dir."
            )
        return True
    ours = (TMP_PREFIX, "workers", LOCK_FILE)  # temporaries; other workers; the lock
    if os.path.isdir(model_dir) and [n for n in os.listdir(model_dir) if not n.startswith(ours)]:
        raise RunDirError(
            f"--model_dir={model_dir} is not empty and has no {CONFIG_FILE}: it is "
            "not a tfdq training run, and it is not overwritten. Choose a new or empty --model_dir."
        )
    if write:
        os.makedirs(model_dir, exist_ok=True)
        atomic_write_json(path, config)
    return False


def _check_writable(model_dir):
    """Refuse a folder (or, for a new one, its nearest existing parent) that
    this process cannot write, before anything is done."""
    target = os.path.abspath(model_dir)
    while not os.path.exists(target):
        parent = os.path.dirname(target)
        if parent == target:
            break
        target = parent
    if os.path.exists(target) and not os.path.isdir(target):
        raise RunDirError(
            f"--model_dir={model_dir}: {target} is a file, not a folder. Choose another --model_dir."
        )
    if os.path.isdir(target) and not os.access(target, os.W_OK | os.X_OK):
        raise RunDirError(
            f"--model_dir={model_dir}: {target} is not writable by this user (read-only "
            "folder or file system). Fix its permissions or choose a writable --model_dir."
        )


class CheckpointDamaged(RuntimeError):
    """A checkpoint folder whose files cannot be read back."""


class Checkpointer:
    """Numbered checkpoint folders in ``directory`` (see module docstring)."""

    PREFIX = "ckpt-"

    def __init__(self, directory, keep=2):
        self.directory = directory
        self.keep = max(1, int(keep))

    @staticmethod
    def _key(name):
        # ckpt-e000003-s000000 -> (3, 0)
        parts = name[len(Checkpointer.PREFIX) :].split("-")
        return int(parts[0][1:]), int(parts[1][1:])

    def all(self):
        """Complete checkpoints, oldest first."""
        if not os.path.isdir(self.directory):
            return []
        found = []
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if name.startswith(self.PREFIX) and os.path.exists(os.path.join(path, "state.json")):
                try:
                    found.append((self._key(name), path))
                except (IndexError, ValueError):
                    continue
        return [p for _, p in sorted(found)]

    def latest(self):
        found = self.all()
        return found[-1] if found else None

    def save(self, model, optimizer, state):
        """Write a checkpoint for ``state["epoch"]`` / ``state["step"]``.

        Raises :class:`tfdq.nonfinite.NonFiniteError` (nothing written) when
        a variable of ``model`` holds NaN or Inf.
        """
        from tfdq import nonfinite  # noqa: PLC0415

        os.makedirs(self.directory, exist_ok=True)
        name = f"{self.PREFIX}e{int(state['epoch']):06d}-s{int(state['step']):06d}"
        nonfinite.check_finite(model, f"write the checkpoint {name}")
        final = os.path.join(self.directory, name)
        tmp = tempfile.mkdtemp(dir=self.directory, prefix=TMP_PREFIX)
        try:
            respect_umask(tmp, directory=True)
            model.save(os.path.join(tmp, "model.keras"))
            store = {}
            if optimizer is not None and optimizer.built:
                optimizer.save_own_variables(store)
            np.savez(os.path.join(tmp, "optimizer.npz"), **store)
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump(state, f, indent=1, default=_json_default)
                f.flush()
                os.fsync(f.fileno())
            fault_point(f"before-rename:{name}")
            if os.path.exists(final):
                self._delete(final)
            os.rename(tmp, final)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        fault_point(f"saved:{name}")
        for old in self.all()[: -self.keep]:
            self._delete(old)
        self._clean_tmp()
        return final

    def _delete(self, path):
        """Rename ``path`` to a hidden temporary, then delete it: a kill in
        between leaves a ``.tmp-`` folder (removed later), never a
        half-deleted checkpoint."""
        doomed = os.path.join(self.directory, f"{TMP_PREFIX}deleting-{os.path.basename(path)}")
        os.rename(path, doomed)
        fault_point(f"deleting:{os.path.basename(path)}")
        shutil.rmtree(doomed, ignore_errors=True)

    def _clean_tmp(self):
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            # a ckpt- folder without state.json: half deleted by an older tfdq
            stale = name.startswith(self.PREFIX) and not os.path.exists(os.path.join(path, "state.json"))
            if name.startswith(TMP_PREFIX) or (stale and os.path.isdir(path)):
                shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def read_state(path):
        with open(os.path.join(path, "state.json")) as f:
            return json.load(f)

    @staticmethod
    def read(path):
        """``(state, model, optimizer store)`` of the checkpoint at ``path``
        (call inside the strategy scope); :class:`CheckpointDamaged` when any
        of its files cannot be read back."""
        try:
            state = Checkpointer.read_state(path)
            if not isinstance(state, dict) or "epoch" not in state or "step" not in state:
                raise ValueError("state.json lacks the epoch and step")
            with np.load(os.path.join(path, "optimizer.npz")) as data:
                store = {k: np.array(data[k]) for k in data.files}
            model = Checkpointer.load_model(path)
        except Exception as e:  # noqa: BLE001 (any unreadable part: damaged)
            raise CheckpointDamaged(f"{type(e).__name__}: {e}"[:500]) from e
        return state, model, store

    def restore_latest(self, warn=print):
        """The newest intact checkpoint as ``(path, state, model, store)``, or None.

        Damaged ones, newest first, are renamed ``damaged-ckpt-...`` (kept for
        inspection, never resumed from) with a warning naming each.
        """
        for path in reversed(self.all()):
            try:
                return (path, *self.read(path))
            except CheckpointDamaged as e:
                aside = os.path.join(self.directory, DAMAGED_PREFIX + os.path.basename(path))
                if os.path.exists(aside):
                    shutil.rmtree(aside, ignore_errors=True)
                os.rename(path, aside)
                warn(
                    f"WARNING: checkpoint {path} is damaged ({e}); it is kept as {aside} and the "
                    "run resumes from the previous intact checkpoint."
                )
        return None

    @staticmethod
    def restore_optimizer_store(store, optimizer, variables):
        """Build ``optimizer`` for ``variables`` and load ``store`` (from :meth:`read`)."""
        if not store:
            return
        if not optimizer.built:
            optimizer.build(variables)
        optimizer.load_own_variables(store)

    @staticmethod
    def load_model(path):
        """The checkpoint's model (not compiled); call inside the strategy scope."""
        return keras.models.load_model(os.path.join(path, "model.keras"), compile=False)

    @staticmethod
    def restore_optimizer(path, optimizer, variables):
        """Build ``optimizer`` for ``variables`` and load its saved state."""
        with np.load(os.path.join(path, "optimizer.npz")) as data:
            store = {k: data[k] for k in data.files}
        Checkpointer.restore_optimizer_store(store, optimizer, variables)


class ResumableCheckpoint(keras.callbacks.Callback):
    """Checkpoint after every epoch and, optionally, every ``every_steps`` steps.

    ``state`` is the dict restored from the last checkpoint (or a fresh one);
    its ``history`` gets one entry per finished epoch, and ``history.json`` /
    ``history.csv`` in ``history_dir`` are rewritten (atomically) after each.
    ``step_offset``: steps of the current epoch done before a mid-epoch
    restart. ``extra_state`` is called at each save and its dict merged in
    (e.g. the best feasible epoch so far); ``extra_logs(model)`` adds entries
    to the history only (e.g. per-layer bitwidths, kept out of the progress bar).
    """

    def __init__(
        self,
        checkpointer,
        state,
        steps_per_epoch,
        optimizer=None,
        every_steps=0,
        step_offset=0,
        history_dir=None,
        extra_state=None,
        extra_logs=None,
    ):
        super().__init__()
        self.checkpointer = checkpointer
        self.state = state
        self.steps_per_epoch = int(steps_per_epoch)
        self._optimizer = optimizer
        self.every_steps = int(every_steps or 0)
        self.step_offset = int(step_offset)
        self.history_dir = history_dir
        self.extra_state = extra_state
        self.extra_logs = extra_logs
        self.epoch = int(state.get("epoch", 0))

    @property
    def optimizer(self):
        return self._optimizer if self._optimizer is not None else getattr(self.model, "optimizer", None)

    def _save(self, epoch, step):
        self.state["epoch"], self.state["step"] = int(epoch), int(step)
        if self.extra_state is not None:
            self.state.update(self.extra_state())
        self.checkpointer.save(self.model, self.optimizer, self.state)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if not self.every_steps:
            return
        done = batch + 1 + self.step_offset
        if done % self.every_steps == 0 and done < self.steps_per_epoch:
            self._save(self.epoch, done)

    def on_epoch_end(self, epoch, logs=None):
        entry = {"epoch": epoch + 1}
        for key, value in (logs or {}).items():
            try:
                entry[key] = float(value)
            except (TypeError, ValueError):
                continue
        if self.extra_logs is not None:
            entry.update(self.extra_logs(self.model))
        if self.step_offset:
            entry["resumed_at_step"] = self.step_offset
        self.state.setdefault("history", []).append(entry)
        self.step_offset = 0
        self._save(epoch + 1, 0)
        if self.history_dir:
            write_history(self.history_dir, self.state["history"])


def write_history(directory, history):
    """``history.json`` and ``history.csv`` (one row per epoch)."""
    atomic_write_json(os.path.join(directory, "history.json"), history)
    keys = []
    for entry in history:
        keys += [k for k in entry if k not in keys]
    lines = [",".join(keys)]
    for entry in history:
        lines.append(",".join("" if entry.get(k) is None else repr(entry[k]) for k in keys))
    atomic_write_text(os.path.join(directory, "history.csv"), "\n".join(lines) + "\n")
