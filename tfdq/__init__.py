"""tfdq: learned mixed-precision quantization for Keras 3.

Implements Uhlich et al., "Mixed Precision DNNs: All you need is a good
parametrization", ICLR 2020, on TensorFlow / Keras 3.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tfdq import ops, quantizers  # noqa: E402

__version__ = "0.1.0"
from tfdq import layers  # noqa: E402
from tfdq.quantize import quantize_model  # noqa: E402
