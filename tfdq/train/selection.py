"""Which model a training stage reports: the paper's rule and the final model.

The paper's reference code (sony/ai-research-code, mixed-precision-dnns/
train_resnet.py) keeps the parameters with the best test-set error seen
during training: for the float network the best epoch; for a quantized
network the best among the epochs, and, when a weight budget is set, among
the training steps too, whose memory constraints all hold. Its Table 1 and
Table 3 numbers are those. Choosing on the held-out set is optimistic, so
the training script writes both numbers, labelled: this rule's and the last
epoch's (``--selection`` says which model a stage hands on).
"""

import numpy as np

from tfdq.callbacks import BestFeasibleCheckpoint, atomic_save

RULE = "best held-out accuracy over the epochs (quantized: among those meeting every constraint)"
STEP_RULE = RULE + ", also checked every {n} step(s) while every constraint holds"


class BestCheckpoint(BestFeasibleCheckpoint):
    """:class:`tfdq.callbacks.BestFeasibleCheckpoint` (epoch ends) that can
    also check every ``every_steps`` training steps: when every memory
    constraint holds, ``evaluate(model)`` (held-out accuracy) is computed
    and the model saved if it beats the best so far. ``best_epoch`` is the
    epoch (0-based) the best model was seen in and ``best_step`` its step in
    that epoch (None: at the epoch's end). Without a budget every epoch and
    step counts as feasible (the float stage)."""

    def __init__(self, filepath, evaluate=None, every_steps=0, verbose=1):
        super().__init__(filepath, monitor="val_accuracy", mode="max", verbose=verbose)
        self.evaluate = evaluate
        self.every_steps = int(every_steps or 0)
        self.best_step = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        before = self.best
        super().on_epoch_end(epoch, logs)
        if self.best != before:
            self.best_step = None

    def on_train_batch_end(self, batch, logs=None):
        if not self.every_steps or self.evaluate is None or (batch + 1) % self.every_steps:
            return
        budget = getattr(self.model, "memory_budget", None)
        if budget is not None and not all(budget.satisfied(self.model).values()):
            return
        value = float(self.evaluate(self.model))
        if np.isfinite(value) and (self.best is None or value > self.best):
            atomic_save(self.model, self.filepath)
            self.best, self.best_epoch, self.best_step = value, self._epoch, batch + 1
            if self.verbose:
                print(
                    f"\nEpoch {self._epoch + 1}, step {batch + 1}: held-out accuracy {value:.4f}: saved {self.filepath}"
                )

    def state(self):
        return {"best": self.best, "best_epoch": self.best_epoch, "best_step": self.best_step}

    def restore(self, state):
        self.best, self.best_epoch = state.get("best"), state.get("best_epoch")
        self.best_step = state.get("best_step")


def describe(every_steps):
    return STEP_RULE.format(n=int(every_steps)) if every_steps else RULE
