"""tfdq: learned mixed-precision quantization for Keras 3.

Implements Uhlich et al., "Mixed Precision DNNs: All you need is a good
parametrization", ICLR 2020, on TensorFlow / Keras 3::

    qmodel = tfdq.quantize_model(model)     # U3 weights and activations
    qmodel.compile(...); qmodel.fit(...)    # ordinary Keras training
    tfdq.summary(qmodel)                    # per-layer bits and sizes
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tfdq import batchnorm, callbacks, constraints, layers, memory, models, ops, quantizers  # noqa: E402
from tfdq.batchnorm import recalibrate_batchnorm  # noqa: E402
from tfdq.constraints import MemoryBudget, constrain  # noqa: E402
from tfdq.model import QuantizedModel  # noqa: E402
from tfdq.quantize import quantize_model  # noqa: E402
from tfdq.summary import summary  # noqa: E402
from tfdq import export  # noqa: E402  (after the modules it builds on)

__version__ = "0.1.0"

__all__ = [
    "MemoryBudget",
    "batchnorm",
    "QuantizedModel",
    "callbacks",
    "constrain",
    "constraints",
    "export",
    "layers",
    "memory",
    "models",
    "ops",
    "quantize_model",
    "quantizers",
    "recalibrate_batchnorm",
    "summary",
]
