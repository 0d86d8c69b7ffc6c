"""Reference float models: the paper's CIFAR ResNet-20 and a small MNIST CNN.

They are plain Keras Functional models; quantize them with
:func:`tfdq.quantize_model`. The ResNet-20 identity shortcut that changes
resolution and width is a small registered layer (not a ``Lambda``), so
saved models load under Keras' safe mode.
"""

import keras
from keras import ops as kops

_PACKAGE = "tfdq"


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
        x = inputs[:, :: self.stride, :: self.stride, :]
        if self.extra_channels:
            x = kops.pad(x, [[0, 0], [0, 0], [0, 0], [0, self.extra_channels]])
        return x

    def compute_output_shape(self, input_shape):
        n, h, w, c = input_shape
        h = None if h is None else (h + self.stride - 1) // self.stride
        w = None if w is None else (w + self.stride - 1) // self.stride
        return (n, h, w, c + self.extra_channels)

    def get_config(self):
        config = super().get_config()
        config.update(stride=self.stride, extra_channels=self.extra_channels)
        return config


def _conv_bn(x, filters, stride, name, weight_decay):
    reg = keras.regularizers.L2(weight_decay) if weight_decay else None
    x = keras.layers.Conv2D(
        filters,
        3,
        strides=stride,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        kernel_regularizer=reg,
        name=f"{name}_conv",
    )(x)
    return keras.layers.BatchNormalization(name=f"{name}_bn")(x)


def resnet20(input_shape=(32, 32, 3), num_classes=10, weight_decay=0.0, name="resnet20"):
    """The paper's CIFAR-10 ResNet-20 (He et al. 2016, identity shortcuts).

    3 stages x 3 basic blocks with 16/32/64 channels; 19 bias-free 3x3
    convolutions each followed by BatchNormalization, 19 ReLUs, global
    average pooling and a Dense classifier: 268,346 counted weights.
    ``weight_decay`` adds Keras' ``L2(weight_decay)`` on kernels, i.e. the
    loss term ``wd * sum(w^2)`` whose gradient is ``2 wd w``. The paper's
    decay of 2e-4 is in the gradient-``wd w`` convention (NNabla, PyTorch),
    so pass half of it (1e-4) to match (train/ does).
    """
    inputs = keras.Input(shape=input_shape, name="image")
    x = _conv_bn(inputs, 16, 1, "stem", weight_decay)
    x = keras.layers.ReLU(name="stem_relu")(x)
    channels = 16
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(3):
            stride = 2 if stage > 0 and block == 0 else 1
            prefix = f"s{stage + 1}b{block + 1}"
            y = _conv_bn(x, filters, stride, f"{prefix}a", weight_decay)
            y = keras.layers.ReLU(name=f"{prefix}a_relu")(y)
            y = _conv_bn(y, filters, 1, f"{prefix}b", weight_decay)
            if stride != 1 or filters != channels:
                shortcut = ZeroPadShortcut(stride, filters - channels, name=f"{prefix}_shortcut")(x)
            else:
                shortcut = x
            x = keras.layers.Add(name=f"{prefix}_add")([y, shortcut])
            x = keras.layers.ReLU(name=f"{prefix}_relu")(x)
            channels = filters
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    reg = keras.regularizers.L2(weight_decay) if weight_decay else None
    outputs = keras.layers.Dense(num_classes, kernel_regularizer=reg, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def small_cnn(input_shape=(28, 28, 1), num_classes=10, name="small_cnn"):
    """A small MNIST CNN (29,658 weights): three conv/BN/ReLU stages, Flatten, Dense.

    BatchNormalization uses momentum 0.9 so that its moving statistics settle
    within the few hundred steps of a short run.
    """
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    for i, filters in enumerate((16, 32, 32)):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{i + 1}")(x)
        x = keras.layers.ReLU(name=f"relu{i + 1}")(x)
        if i < 2:
            x = keras.layers.MaxPooling2D(name=f"pool{i + 1}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)
