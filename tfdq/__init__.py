"""tfdq: learned mixed-precision quantization for Keras 3.

Implements Uhlich et al., "Mixed Precision DNNs: All you need is a good
parametrization", ICLR 2020, on TensorFlow / Keras 3::

    qmodel = tfdq.quantize_model(model)     # U3 weights and activations
    qmodel.compile(...); qmodel.fit(...)    # ordinary Keras training
    tfdq.summary(qmodel)                    # per-layer bits and sizes
    tfdq.plot_bitwidths(qmodel, "bits.png") # the same, drawn with the budgets

Importing tfdq changes no global setting (environment, Keras policy, TF
logging). The commands ``tfdq-train`` and ``tfdq-export`` live in
``tfdq.train`` and ``tfdq.export.command``; ``import tfdq`` imports neither.
"""

from tfdq import (
    batchnorm,
    callbacks,
    config,
    constraints,
    export,
    layers,
    memory,
    models,
    nonfinite,
    ops,
    quantizers,
)
from tfdq.batchnorm import recalibrate_batchnorm
from tfdq.constraints import MemoryBudget, constrain
from tfdq.model import QuantizedModel
from tfdq.plot import plot_bitwidths
from tfdq.quantize import quantize_model
from tfdq.summary import summary

__version__ = "0.1.0"

__all__ = [
    "MemoryBudget",
    "batchnorm",
    "QuantizedModel",
    "callbacks",
    "config",
    "constrain",
    "constraints",
    "export",
    "layers",
    "memory",
    "models",
    "nonfinite",
    "ops",
    "plot_bitwidths",
    "quantize_model",
    "quantizers",
    "recalibrate_batchnorm",
    "summary",
]
