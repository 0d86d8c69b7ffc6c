"""Float models of the training script.

* ``small_cnn`` and ``resnet20``: :mod:`tfdq.models` (MNIST CNN; the paper's
  CIFAR ResNet-20 with identity shortcuts, 268,346 counted weights).
* ``resnet18``: ImageNet ResNet-18 (He et al. 2016): 7x7/2 stem, 3x3/2 max
  pooling, 4 stages x 2 basic blocks with 64/128/256/512 channels, 1x1
  projection shortcuts where the shape changes, global average pooling and
  a Dense classifier. Written here as a plain Functional model (no
  ``Lambda``), 11,679,912 counted weights (BatchNormalization not counted):
  44.56 MB at 32 bits, as the paper's Table 4.
* ``mobilenetv2``: ``keras.applications.MobileNetV2(weights=None)``.

Every model returns logits. Weight decay and synchronized BatchNormalization
are applied afterwards by :func:`configure` (a rebuild from the config), so
the same code path handles our models, Keras applications and a float
checkpoint given with ``--init_checkpoint``.
"""

import keras
import numpy as np

import tfdq

MODELS = ("small_cnn", "resnet20", "resnet18", "mobilenetv2")
DEFAULT_MODEL = {"mnist": "small_cnn", "cifar10": "resnet20", "imagenet2012": "resnet18"}


def _conv_bn(x, filters, kernel, stride, name):
    x = keras.layers.Conv2D(
        filters,
        kernel,
        strides=stride,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{name}_conv",
    )(x)
    return keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9, name=f"{name}_bn")(x)


def resnet18(input_shape=(224, 224, 3), num_classes=1000, name="resnet18"):
    """ImageNet ResNet-18 with basic blocks (see module docstring)."""
    inputs = keras.Input(shape=input_shape, name="image")
    x = _conv_bn(inputs, 64, 7, 2, "stem")
    x = keras.layers.ReLU(name="stem_relu")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    channels = 64
    for stage, filters in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            prefix = f"s{stage + 1}b{block + 1}"
            y = _conv_bn(x, filters, 3, stride, f"{prefix}a")
            y = keras.layers.ReLU(name=f"{prefix}a_relu")(y)
            y = _conv_bn(y, filters, 3, 1, f"{prefix}b")
            shortcut = x
            if stride != 1 or filters != channels:
                shortcut = _conv_bn(x, filters, 1, stride, f"{prefix}_proj")
            x = keras.layers.Add(name=f"{prefix}_add")([y, shortcut])
            x = keras.layers.ReLU(name=f"{prefix}_relu")(x)
            channels = filters
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def mobilenetv2(input_shape=(224, 224, 3), num_classes=1000, alpha=1.0):
    """``keras.applications.MobileNetV2`` with random weights, returning logits."""
    return keras.applications.MobileNetV2(
        input_shape=input_shape,
        alpha=alpha,
        weights=None,
        classes=num_classes,
        classifier_activation=None,
    )


def build(name, input_shape, num_classes):
    """The float model ``name`` (one of :data:`MODELS`), not yet configured."""
    if name == "small_cnn":
        return tfdq.models.small_cnn(input_shape=input_shape, num_classes=num_classes)
    if name == "resnet20":
        return tfdq.models.resnet20(input_shape=input_shape, num_classes=num_classes)
    if name == "resnet18":
        return resnet18(input_shape=input_shape, num_classes=num_classes)
    if name == "mobilenetv2":
        return mobilenetv2(input_shape=input_shape, num_classes=num_classes)
    raise ValueError(f"Unknown --model={name!r}; choose one of {', '.join(MODELS)}.")


_KERNEL_KEYS = {
    "Conv1D": ("kernel_regularizer",),
    "Conv2D": ("kernel_regularizer",),
    "Conv3D": ("kernel_regularizer",),
    "Dense": ("kernel_regularizer",),
    "DepthwiseConv2D": ("depthwise_regularizer",),
    "SeparableConv2D": ("depthwise_regularizer", "pointwise_regularizer"),
    "QConv2D": ("kernel_regularizer",),
    "QDense": ("kernel_regularizer",),
    "QDepthwiseConv2D": ("depthwise_regularizer",),
}


def configure(model, weight_decay=0.0, sync_batchnorm=False):
    """Rebuild ``model`` with weight decay on every kernel and, optionally,
    synchronized BatchNormalization; the weights are copied.

    ``weight_decay`` is the SGD weight decay of the paper (the gradient gets
    ``+ wd * w``, as NNabla's and PyTorch's solvers do), so each kernel gets
    ``keras.regularizers.L2(wd / 2)`` (Keras' L2 adds ``l2 * sum(w^2)`` to the
    loss). BatchNormalization and biases are not decayed. Synchronized
    BatchNormalization computes the batch statistics over the global batch
    under ``tf.distribute`` (the same as one device with the same batch).
    """
    config = model.get_config()
    regularizer = keras.regularizers.serialize(keras.regularizers.L2(weight_decay / 2.0)) if weight_decay else None
    changed = False
    for layer in config["layers"]:
        cls = layer["class_name"]
        for key in _KERNEL_KEYS.get(cls, ()):
            if key in layer["config"]:
                layer["config"][key] = regularizer
                changed = True
        if cls == "BatchNormalization" and bool(layer["config"].get("synchronized")) != bool(sync_batchnorm):
            layer["config"]["synchronized"] = bool(sync_batchnorm)
            changed = True
    if not changed and not weight_decay:
        return model
    rebuilt = model.__class__.from_config(config)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def counted_weights(model):
    """Weights counted as the paper's Table 2: kernels and biases of the
    convolution and Dense layers (BatchNormalization is folded, not counted)."""
    total = 0
    for layer in model.layers:
        if not isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense, keras.layers.DepthwiseConv2D)):
            continue
        total += int(np.prod(layer.kernel.shape))
        if getattr(layer, "use_bias", False) and layer.bias is not None:
            total += int(np.prod(layer.bias.shape))
    return total
