"""Reference float models: the paper's CIFAR ResNet-20 and a small MNIST CNN.

They are plain Keras Functional models; quantize them with
:func:`tfdq.quantize_model`. The ResNet-20 identity shortcut that changes
resolution and width is a small registered layer (not a ``Lambda``), so
saved models load under Keras' safe mode.
"""

import keras
from keras import ops as kops

_PACKAGE = "tfdq"


def zero_pad_shortcut(x, stride, extra_channels, pad):
    """The option-A shortcut's computation: subsample by ``stride``, then append
    ``extra_channels`` zero channels with ``pad`` (``keras.ops.pad`` or ``tf.pad``).

    Written once for the Keras 3 layer below and for the tf_keras twin that the
    peers benchmark (tfmot) builds."""
    x = x[:, ::stride, ::stride, :]
    if extra_channels:
        x = pad(x, [[0, 0], [0, 0], [0, 0], [0, extra_channels]])
    return x


def zero_pad_shortcut_shape(input_shape, stride, extra_channels):
    """Output shape of :func:`zero_pad_shortcut`."""
    n, h, w, c = input_shape
    h = None if h is None else (h + stride - 1) // stride
    w = None if w is None else (w + stride - 1) // stride
    return (n, h, w, c + extra_channels)


@keras.saving.register_keras_serializable(_PACKAGE)
class ZeroPadShortcut(keras.layers.Layer):
    """Identity shortcut of the paper's ResNet-20 ("option A").

    Subsamples by ``stride`` in both spatial dimensions and appends
    ``extra_channels`` zero channels: no weights, so the model keeps the
    268,346 counted parameters of docs/method.md section 6.
    """

    def __init__(self, stride=2, extra_channels=0, **kwargs):
        super().__init__(**kwargs)
        self.stride = int(stride)
        self.extra_channels = int(extra_channels)

    def call(self, inputs):
        return zero_pad_shortcut(inputs, self.stride, self.extra_channels, kops.pad)

    def compute_output_shape(self, input_shape):
        return zero_pad_shortcut_shape(input_shape, self.stride, self.extra_channels)

    def get_config(self):
        config = super().get_config()
        config.update(stride=self.stride, extra_channels=self.extra_channels)
        return config


def build_resnet20(
    k, shortcut_layer, input_shape=(32, 32, 3), num_classes=10, weight_decay=0.0, name="resnet20"
):
    """ResNet-20 built from the Keras-like namespace ``k`` (``keras``, or ``tf_keras``
    for the tfmot peer), with ``shortcut_layer`` the option-A shortcut class."""

    def conv_bn(x, filters, stride, layer_name):
        reg = k.regularizers.L2(weight_decay) if weight_decay else None
        x = k.layers.Conv2D(
            filters,
            3,
            strides=stride,
            padding="same",
            use_bias=False,
            kernel_initializer="he_normal",
            kernel_regularizer=reg,
            name=f"{layer_name}_conv",
        )(x)
        return k.layers.BatchNormalization(momentum=0.99, epsilon=1e-3, name=f"{layer_name}_bn")(x)

    inputs = k.Input(shape=input_shape, name="image")
    x = k.layers.ReLU(name="stem_relu")(conv_bn(inputs, 16, 1, "stem"))
    channels = 16
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(3):
            stride = 2 if stage > 0 and block == 0 else 1
            prefix = f"s{stage + 1}b{block + 1}"
            y = k.layers.ReLU(name=f"{prefix}a_relu")(conv_bn(x, filters, stride, f"{prefix}a"))
            y = conv_bn(y, filters, 1, f"{prefix}b")
            if stride != 1 or filters != channels:
                shortcut = shortcut_layer(stride, filters - channels, name=f"{prefix}_shortcut")(x)
            else:
                shortcut = x
            x = k.layers.Add(name=f"{prefix}_add")([y, shortcut])
            x = k.layers.ReLU(name=f"{prefix}_relu")(x)
            channels = filters
    x = k.layers.GlobalAveragePooling2D(name="pool")(x)
    reg = k.regularizers.L2(weight_decay) if weight_decay else None
    outputs = k.layers.Dense(num_classes, kernel_regularizer=reg, name="logits")(x)
    return k.Model(inputs, outputs, name=name)


def build_small_cnn(k, input_shape=(28, 28, 1), num_classes=10, name="small_cnn"):
    """The small MNIST CNN built from the Keras-like namespace ``k`` (``keras`` or ``tf_keras``)."""
    inputs = k.Input(shape=input_shape, name="image")
    x = inputs
    for i, filters in enumerate((16, 32, 32)):
        x = k.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
        x = k.layers.BatchNormalization(momentum=0.9, epsilon=1e-3, name=f"bn{i + 1}")(x)
        x = k.layers.ReLU(name=f"relu{i + 1}")(x)
        if i < 2:
            x = k.layers.MaxPooling2D(name=f"pool{i + 1}")(x)
    x = k.layers.Flatten(name="flatten")(x)
    outputs = k.layers.Dense(num_classes, name="logits")(x)
    return k.Model(inputs, outputs, name=name)


def resnet20(input_shape=(32, 32, 3), num_classes=10, weight_decay=0.0, name="resnet20"):
    """The paper's CIFAR-10 ResNet-20 (He et al. 2016, identity shortcuts).

    3 stages x 3 basic blocks with 16/32/64 channels; 19 bias-free 3x3
    convolutions each followed by BatchNormalization, 19 ReLUs, global
    average pooling and a Dense classifier: 268,346 counted weights.
    ``weight_decay`` adds Keras' ``L2(weight_decay)`` on kernels, i.e. the
    loss term ``wd * sum(w^2)`` whose gradient is ``2 wd w``. The paper's
    decay of 2e-4 is in the gradient-``wd w`` convention (NNabla, PyTorch),
    so pass half of it (1e-4) to match (tfdq-train does).
    """
    return build_resnet20(keras, ZeroPadShortcut, input_shape, num_classes, weight_decay, name)


def small_cnn(input_shape=(28, 28, 1), num_classes=10, name="small_cnn"):
    """A small MNIST CNN (29,658 weights): three conv/BN/ReLU stages, Flatten, Dense.

    BatchNormalization uses momentum 0.9 so that its moving statistics settle
    within the few hundred steps of a short run.
    """
    return build_small_cnn(keras, input_shape, num_classes, name)
