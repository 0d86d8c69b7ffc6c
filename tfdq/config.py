"""tfdq's switches, scoped: a context manager instead of module globals.

Three switches choose how quantizers and training steps are built; each is
read when a model's step is traced (so it applies to models traced inside
the scope), never when tfdq is imported:

* ``fused`` (default on): quantizer passes run fused, the uniform quantizer
  through tfdq's compiled CPU kernel (``tfdq.kernels``) and everything else
  as XLA-compiled loops; off runs the same formulas as plain TensorFlow ops
  (the same values).
* ``custom_kernels`` (default on): use the compiled CPU kernel where it can
  be built; off keeps the XLA path.
* ``nonfinite_guard`` (default on): training steps skip and count steps
  whose loss or gradients are not finite (:mod:`tfdq.nonfinite`).

Use::

    with tfdq.config.settings(fused=False):
        qmodel.compile(...); qmodel.train_on_batch(x, y)   # traced with plain ops

    tfdq.config.get("fused")                                # the value in force here

Outside any ``settings`` block the environment variables ``TFDQ_FUSED``,
``TFDQ_CUSTOM_KERNELS`` and ``TFDQ_NONFINITE_GUARD`` (``0`` turns one off)
give the default, read at the moment it is needed. tfdq never writes an
environment variable or any other global setting.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

_ENV = {
    "fused": "TFDQ_FUSED",
    "custom_kernels": "TFDQ_CUSTOM_KERNELS",
    "nonfinite_guard": "TFDQ_NONFINITE_GUARD",
}
_OFF = ("0", "false", "no", "off")
_overrides = contextvars.ContextVar("tfdq_config", default=None)  # None: no override


def _check(name):
    if name not in _ENV:
        raise ValueError(f"unknown tfdq setting {name!r}; the settings are {', '.join(sorted(_ENV))}.")


def get(name: str) -> bool:
    """The value of setting ``name`` in force here (a ``settings`` block, else the environment)."""
    _check(name)
    overrides = _overrides.get() or {}
    if name in overrides:
        return overrides[name]
    return os.environ.get(_ENV[name], "1").strip().lower() not in _OFF


@contextlib.contextmanager
def settings(**values: bool):
    """Override settings (``fused``, ``custom_kernels``, ``nonfinite_guard``) inside a ``with`` block.

    Blocks nest; leaving one restores what was in force before it. Only
    models traced inside the block are affected (a traced step keeps the
    choice it was built with).
    """
    for name, value in values.items():
        _check(name)
        if not isinstance(value, bool):
            raise TypeError(f"tfdq setting {name} takes True or False, got {value!r}.")
    token = _overrides.set({**(_overrides.get() or {}), **values})
    try:
        yield
    finally:
        _overrides.reset(token)
