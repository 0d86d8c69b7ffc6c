"""Every private Keras and TensorFlow API tfdq uses, in one place.

Each of these is an implementation detail of Keras 3 (tested with 3.10-3.13)
or TensorFlow 2.21 that has no public equivalent. When a new release moves
one, this module is the only place to change; each entry says what it is
for and what happens if it is missing.
"""

# -- Keras ------------------------------------------------------------------

# The class of Functional models: quantize_model turns a Sequential or a
# subclassed-Functional model into one, and recognizes nested Functional
# models. keras.Model(inputs, outputs) returns an instance of it, but the
# class itself is not exported.
# Rebuilds a Functional subclass (QuantizedModel) from its saved config; the
# public Model.from_config does this only for keras.Model itself.
from keras.src.models.functional import (
    Functional,  # noqa: F401
    functional_from_config,  # noqa: F401
)

# The operation classes of keras.ops (Add, Multiply, Relu, HardSwish, ...):
# a Functional graph records keras.ops calls as instances of them, and the
# registry of layers maps each class to its treatment. keras.ops exports
# the functions, not the classes.
from keras.src.ops import nn as nn_ops  # noqa: F401
from keras.src.ops import numpy as numpy_ops  # noqa: F401

# Keras' own reader of fit()'s inputs (arrays, tf.data, PyDataset,
# generators), so BatchNorm re-estimation reads the same batches fit does.
from keras.src.trainers.data_adapters import get_data_adapter  # noqa: F401


def keras_history(tensor):
    """The ``(operation, node_index, tensor_index)`` record of a symbolic KerasTensor, or None.

    Keras keeps it on every tensor of a Functional graph (``_keras_history``);
    tfdq reads it to walk graphs (there is no public graph API).
    """
    return getattr(tensor, "_keras_history", None)


def inbound_nodes(layer):
    """The nodes where ``layer`` was called (``_inbound_nodes``), in call order."""
    return layer._inbound_nodes


# -- TensorFlow ---------------------------------------------------------------


def in_xla_context():
    """Whether the graph being traced is inside an XLA-compiled function.

    The compiled CPU kernel cannot run under ``jit_compile``; when the
    internal helpers are missing, report False (the kernel is then tried,
    and XLA names the op it cannot compile).
    """
    try:
        from tensorflow.python.framework import ops as tf_ops  # noqa: PLC0415
        from tensorflow.python.ops import control_flow_util  # noqa: PLC0415
    except ImportError:
        return False
    return control_flow_util.GraphOrParentsInXlaContext(tf_ops.get_default_graph())


def gradients_may_be_recorded():
    """Whether a gradient tape (or forward accumulator) may record here.

    tfdq uses its compiled kernel only in training steps, so inference graphs
    (SavedModel, the TFLite converter) hold plain TensorFlow ops. When the
    internal helper is missing, report True (a training step).
    """
    try:
        from tensorflow.python.eager import record  # noqa: PLC0415
    except ImportError:
        return True
    return bool(record.could_possibly_record())


def strategy_supports_no_merge_call():
    """Whether the current tf.distribute strategy can apply gradients without merge_call."""
    import tensorflow as tf  # noqa: PLC0415

    return tf.__internal__.distribute.strategy_supports_no_merge_call()


def keras_application_layers():
    """Layers that keras.applications defines inside its private modules, by name (missing ones skipped).

    ``CustomScaleLayer`` (InceptionResNetV2's ``x + scale * branch``),
    ConvNeXt's ``LayerScale`` and ``StochasticDepth``: the registry gives
    each an entry; fallback: an empty dict when Keras moves them.
    """
    found = {}
    for module, name in (
        ("keras.src.applications.inception_resnet_v2", "CustomScaleLayer"),
        ("keras.src.applications.convnext", "LayerScale"),
        ("keras.src.applications.convnext", "StochasticDepth"),
    ):
        try:
            found[name] = getattr(__import__(module, fromlist=[name]), name)
        except (ImportError, AttributeError):
            continue
    return found
