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

Every model returns logits (a loaded model that ends in softmax, such as a
keras.applications classifier, is rebuilt by :func:`to_logits`).
BatchNormalization settings and synchronization are applied afterwards by
:func:`configure` (a rebuild from the config) and weight decay by
:func:`apply_weight_decay` (on the variables), so the same code path
handles our models, Keras applications and a float checkpoint given with
``--init_checkpoint``.
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


def configure(model, sync_batchnorm=False, bn_momentum=None, bn_epsilon=None):
    """Rebuild ``model`` for training here; the weights are copied.

    * Regularizers saved in the layers' configs are dropped (a float model
      saved elsewhere may carry its own): weight decay is applied by
      :func:`apply_weight_decay` to exactly the variables the recipe names.
    * BatchNormalization: ``synchronized`` as asked (the batch statistics of
      the global batch under ``tf.distribute``, as one device with the whole
      batch), and ``bn_momentum`` / ``bn_epsilon`` where given (None keeps
      the model's own). Keras' ``momentum`` is the weight of the old moving
      average: NNabla's ``decay_rate`` and 1 - PyTorch's ``momentum``.
    """
    config = model.get_config()
    changed = False
    for layer in config["layers"]:
        cls, lc = layer["class_name"], layer["config"]
        for key in _KERNEL_KEYS.get(cls, ()) + ("bias_regularizer",):
            if lc.get(key) is not None:
                lc[key] = None
                changed = True
        if cls == "BatchNormalization":
            wanted = {"synchronized": bool(sync_batchnorm), "momentum": bn_momentum, "epsilon": bn_epsilon}
            for key, value in wanted.items():
                if value is not None and lc.get(key) != value:
                    lc[key] = value
                    changed = True
            for key in ("gamma_regularizer", "beta_regularizer"):
                if lc.get(key) is not None:
                    lc[key] = None
                    changed = True
    if not changed:
        return model
    rebuilt = model.__class__.from_config(config)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


_DEPTHWISE = (keras.layers.DepthwiseConv2D,) + tuple(
    getattr(tfdq.layers, name) for name in ("QDepthwiseConv2D",) if hasattr(tfdq.layers, name)
)


def decayed_variables(model, on="kernels"):
    """The trainable variables that weight decay reaches under scope ``on``:
    ``"all"`` (every trainable variable: kernels, biases, BatchNormalization
    gamma and beta, learned quantizer parameters), ``"kernels"`` (kernels of
    convolutions, depthwise included, and Dense layers) or
    ``"kernels_except_depthwise"``."""
    if on == "all":
        return list(model.trainable_variables)
    found, seen = [], set()
    for layer in model._flatten_layers(include_self=False):
        if on == "kernels_except_depthwise" and isinstance(layer, _DEPTHWISE):
            continue
        for attr in ("kernel", "depthwise_kernel", "pointwise_kernel"):
            try:
                v = getattr(layer, attr, None)
            except (AttributeError, ValueError):  # a property of an unbuilt layer
                v = None
            if v is not None and getattr(v, "trainable", False) and id(v) not in seen:
                seen.add(id(v))
                found.append(v)
    return found


def apply_weight_decay(model, weight_decay, on="kernels"):
    """SGD weight decay as the reference code's solver applies it: every
    variable of :func:`decayed_variables` gets ``+ wd * w`` in its gradient
    (coupled, so it goes through the momentum), written as
    ``keras.regularizers.L2(wd / 2)`` on the variable (Keras' L2 adds
    ``l2 * sum(w^2)`` to the loss). Set on the variables, not in the
    layers' configs, so saved models carry no regularizer; call it again
    after loading or cloning. Returns the number of decayed variables."""
    chosen = {id(v) for v in decayed_variables(model, on)} if weight_decay else set()
    regularizer = keras.regularizers.L2(weight_decay / 2.0) if weight_decay else None
    for v in model.trainable_variables:
        v.regularizer = regularizer if id(v) in chosen else None
    return len(chosen)


def to_logits(model):
    """``(model, note)``: ``model`` ending in logits.

    A classifier whose last layer applies softmax (keras.applications models
    end in ``Dense(..., activation="softmax")``; others in a ``Softmax`` or
    ``Activation("softmax")`` layer) is rebuilt without it, weights copied,
    because the training loss takes logits; ``note`` says what changed
    (None when the model already returns logits). Softmax does not change
    the arg max, so accuracy is the same.
    """
    config = model.get_config()
    outputs = config.get("output_layers")
    if not outputs or len(model.outputs) != 1:
        return model, None
    flat = isinstance(outputs[0], str)  # one output: ["name", 0, 0]; else [["name", 0, 0], ...]
    name = outputs[0] if flat else outputs[0][0]
    layers = {l["config"]["name"]: l for l in config["layers"]}
    last = layers.get(name)
    if last is None:
        return model, None
    cls, lc = last["class_name"], last["config"]
    if lc.get("activation") == "softmax" and cls != "Activation":
        lc["activation"] = "linear"
        note = f"its last layer {name!r} applied softmax; rebuilt to return logits"
    elif cls == "Softmax" or (cls == "Activation" and lc.get("activation") == "softmax"):
        inbound = last["inbound_nodes"]
        args = inbound[0]["args"] if inbound and isinstance(inbound[0], dict) else None
        history = args[0]["config"]["keras_history"] if args and isinstance(args[0], dict) else None
        if history is None:
            return model, None
        entry = [history[0], history[1], history[2]]
        config["output_layers"] = entry if flat else [entry]
        config["layers"] = [l for l in config["layers"] if l["config"]["name"] != name]
        note = f"its last layer {name!r} is a softmax; dropped to return logits"
    else:
        return model, None
    rebuilt = model.__class__.from_config(config)
    rebuilt.set_weights(model.get_weights())
    return rebuilt, note


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
