"""Shared pieces of the MNIST-subset benchmarks (small CNN, real digits).

Used by ``benchmarks.budget_mnist``, ``benchmarks.parametrizations`` (the
paper's Table 1) and ``benchmarks.homogeneous`` (Table 3 and the
accuracy-vs-size curve):

* :func:`load_data`: the 4,000 / 1,000 split of ``tfdq.data.mnist_subset``
  (optionally fewer training images, for smoke runs);
* :func:`train_float`: the float model of one seed (Adam, batch 64), trained
  once and reused by every configuration of that seed;
* :func:`quantized_run`: one quantized training run described by a config
  dict (parametrizations, fixed / TQT baselines, random or float init,
  memory budgets, the finish), returning a JSON-ready record;
* :class:`SeedStart`: one seed's float model and the quantized runs that
  start from it (:func:`train_float` once, then :func:`quantized_run` per
  config); :func:`run_configs`: every config on every seed, with progress
  lines and the partial results written after each run;
* :func:`sizes`, :func:`feature_counts`: memory in kB as ``tfdq.memory``
  counts it (Table 2 of the paper);
* :func:`aggregate`: mean, std, min and max over seeds;
  :func:`summarize_configs`: the summary over seeds of every config.

A config (all keys but ``name`` optional)::

    {"name": "U3 W+A",
     "weight": "U3",                  # U1..P3, or fixed / tqt / fixed_pow2 / tqt_pow2
     "weight_bits": 2,                # bitwidth of the fixed / TQT weight quantizer
     "activation": "U3",              # same choices; None: weights only
     "activation_bits": 4,
     "init": "float",                 # or "random": train the quantized net from scratch
     "weight_budget_bits": 2.0,       # (8a) target = margin * N * bits / 8192 kB
     "weight_budget_margin": 1.07,
     "activation_budget": ("max", 4), # (8b) "sum" / (8c) "max" at this many bits per value
     "quantizer_options": {"full_grid": True},  # keyword arguments of the learned quantizers
    }

Random initialization (docs/method.md section 4, ``d = 2^-3``): a random-init
run quantizes a freshly initialized (untrained) network with
``quantize_model(..., init="random")``: every quantizer starts at tfdq's
default (uniform ``d = 2^-3``, ``q_max = 7 d``; power of two ``q_max = 1``,
``q_min = 2^-7``; ``b = 4``) instead of from the kernels, and no calibration
data is passed, so the activation quantizers start at the same defaults.
"""

import math
import time

import numpy as np

BATCH = 64
FLOAT_LR = 1e-3
QUANT_LR = 1e-3
FINISH_LR = 5e-4
BITS_PER_KB = 8192.0


MODELS = ("small_cnn", "resnet20")  # the ``model`` argument's choices


def input_size(model="small_cnn"):
    """Side of the square input image of ``model``: 28 for the small CNN, 32
    for ResNet-20 (the paper's CIFAR network, fed MNIST zero-padded to 32x32)."""
    _check_model(model)
    return 32 if model == "resnet20" else 28


def _check_model(model):
    if model not in MODELS:
        raise ValueError(f"Unknown model {model!r}: use one of {', '.join(MODELS)}.")


def pad_images(x, size):
    """Zero-pad ``(N, 28, 28, C)`` images evenly to ``(N, size, size, C)``."""
    extra = size - x.shape[1]
    if extra < 0 or extra % 2:
        raise ValueError(f"Cannot pad {x.shape[1]}x{x.shape[2]} images evenly to {size}x{size}.")
    if not extra:
        return x
    e = extra // 2
    return np.pad(x, ((0, 0), (e, e), (e, e), (0, 0)))


def load_data(n_train=None, n_test=None, model="small_cnn"):
    """``(x_train, y_train), (x_test, y_test)`` of the MNIST subset (split seed 0).

    For ``model="resnet20"`` the 28x28 digits are zero-padded to 32x32 (2
    pixels on every side), as the paper feeds MNIST to its CIFAR ResNet-20.
    """
    from tfdq.data import mnist_subset  # noqa: PLC0415

    (xt, yt), (xv, yv) = mnist_subset(0)
    if n_train:
        xt, yt = xt[:n_train], yt[:n_train]
    if n_test:
        xv, yv = xv[:n_test], yv[:n_test]
    size = input_size(model)
    return (pad_images(xt, size), yt), (pad_images(xv, size), yv)


def build_model(model="small_cnn"):
    """A fresh float ``model``: ``tfdq.models.small_cnn()`` or a one-channel
    ``tfdq.models.resnet20(input_shape=(32, 32, 1))``."""
    import tfdq  # noqa: PLC0415

    _check_model(model)
    if model == "resnet20":
        return tfdq.models.resnet20(input_shape=(32, 32, 1))
    return tfdq.models.small_cnn()


def _loss():
    import keras  # noqa: PLC0415

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def make_optimizer(name, lr):
    import keras  # noqa: PLC0415

    if name == "adam":
        return keras.optimizers.Adam(lr)
    if name == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.9)
    raise ValueError(f"Unknown optimizer {name!r}: use 'adam' or 'sgd'.")


def error(model, data, batch=500):
    """Held-out top-1 error in [0, 1] (inference mode; eager calls, which
    skip the tracing of ``predict`` that would dominate a short run)."""
    x, y = data
    wrong = 0
    for i in range(0, len(x), batch):
        logits = np.asarray(model(x[i : i + batch], training=False))
        wrong += int(np.sum(np.argmax(logits, axis=-1) != y[i : i + batch]))
    return wrong / len(x)


def train_float(seed, data, epochs=8, lr=FLOAT_LR, verbose=0, reseed=True, model="small_cnn"):
    """Float ``model`` (:func:`build_model`) of one seed; returns ``(model,
    held-out error, seconds)``.

    ResNet-20's BatchNorms average with momentum 0.99, too slow to settle in
    the few hundred steps of a CPU-scale run (after 2 epochs of 63 steps the
    moving statistics still hold 28% of their initial 0 / 1), so for it the
    statistics are re-estimated on the training images after training
    (``tfdq.batchnorm.recalibrate_batchnorm``), before the error is measured.
    ``reseed=False`` leaves the global random state as the caller set it.
    """
    import keras  # noqa: PLC0415

    from tfdq.batchnorm import recalibrate_batchnorm  # noqa: PLC0415

    (xt, yt), test = data
    if reseed:
        keras.utils.set_random_seed(seed)
    start = time.time()
    name, model = model, build_model(model)
    model.compile(keras.optimizers.Adam(lr), _loss(), metrics=["accuracy"])
    if epochs:
        model.fit(xt, yt, batch_size=BATCH, epochs=epochs, verbose=verbose)
    if name == "resnet20":
        recalibrate_batchnorm(model, xt)
    return model, error(model, test), time.time() - start


def random_model(seed, model="small_cnn"):
    """Untrained ``model`` with the initial weights of ``seed``'s float model."""
    import keras  # noqa: PLC0415

    keras.utils.set_random_seed(seed)
    return build_model(model)


# -- sizes --------------------------------------------------------------------


def schedule_settings(seeds, float_epochs, quant_epochs, finish_epochs, data, counts):
    """The settings every MNIST-subset run records: seeds, schedule, optimizer, data and weight count."""
    return {
        "seeds": seeds,
        "float_epochs": float_epochs,
        "quant_epochs": quant_epochs,
        "finish_epochs": finish_epochs,
        "optimizer": "adam",
        "quant_lr": QUANT_LR,
        "finish_lr": FINISH_LR,
        "float_lr": FLOAT_LR,
        "batch_size": BATCH,
        "n_train": len(data[0][0]),
        "n_test": len(data[1][0]),
        "weight_count": sum(counts["weights"].values()),
    }


def feature_counts(model="small_cnn"):
    """Element counts of ``model`` (:func:`build_model`): weights per layer and
    the quantized feature maps (per sample, without the input image), as tfdq
    counts them."""
    import tfdq  # noqa: PLC0415
    from tfdq import memory  # noqa: PLC0415

    q = tfdq.quantize_model(build_model(model))
    entries = memory.size_entries(q)
    return {
        "weights": {e.name: e.count for e in entries if e.kind == "weight"},
        "activations": {e.name: e.count for e in entries if e.kind == "activation" and not e.is_input},
    }


def float_sizes(counts):
    """Sizes of the float model: everything at 32 bits (kB of 1024 bytes)."""
    acts = list(counts["activations"].values())
    return {
        "weight_kb": 32 * sum(counts["weights"].values()) / BITS_PER_KB,
        "activation_kb_sum": 32 * sum(acts) / BITS_PER_KB,
        "activation_kb_max": 32 * max(acts) / BITS_PER_KB,
        "mean_weight_bits": 32.0,
    }


def sizes(qmodel, counts):
    """Weight kB (8a), activation kB sum (8b) and max (8c), mean weight bits.

    ``tfdq.memory`` on the quantized model; feature maps without an
    activation quantizer (weights-only runs) count at 32 bits, as the paper's
    Table 3 lists them.
    """
    import tfdq  # noqa: PLC0415

    rows = tfdq.summary(qmodel, print_fn=None)
    total = rows[-1]
    out = {
        "weight_kb": total["weight_kb"],
        "mean_weight_bits": total["mean_weight_bits"],
        "weight_bits": {r["name"]: r["bits"] for r in rows if r["kind"] == "weight"},
        "activation_bits": {r["name"]: r["bits"] for r in rows if r["kind"] == "activation"},
    }
    if any(r["kind"] == "activation" for r in rows[:-1]):
        out["activation_kb_sum"] = total["activation_kb_sum"]
        out["activation_kb_max"] = total["activation_kb_max"]
    else:
        out.update({k: v for k, v in float_sizes(counts).items() if k.startswith("activation")})
    return out


def budget_targets(config, counts):
    """``(weight_kb, activation_kb, activation_kind)`` of a config (None: none)."""
    weight_kb = act_kb = kind = None
    if config.get("weight_budget_bits") is not None:
        n = sum(counts["weights"].values())
        weight_kb = config.get("weight_budget_margin", 1.0) * n * config["weight_budget_bits"] / BITS_PER_KB
    if config.get("activation_budget") is not None:
        kind, bits = config["activation_budget"]
        acts = list(counts["activations"].values())
        act_kb = bits * (sum(acts) if kind == "sum" else max(acts)) / BITS_PER_KB
    return weight_kb, act_kb, kind


# -- one quantized run ----------------------------------------------------------


def build_quantized(config, source_model, calibration):
    """``quantize_model`` (+ ``constrain``) as ``config`` says; returns
    ``(qmodel, targets)``."""
    import tfdq  # noqa: PLC0415
    from tfdq.train.train import quantizer_arg  # noqa: PLC0415

    act = config.get("activation")
    random_init = config.get("init", "float") == "random"
    options = config.get("quantizer_options")

    def arg(name, bits, role):
        if options and name in tfdq.quantizers.PARAMETRIZATIONS:
            # a template with these options (e.g. full_grid=True) for every tensor of the role
            return tfdq.quantizers.get(name, role=role, signed=role == "weight", **options)
        return quantizer_arg(name, bits)

    qmodel = tfdq.quantize_model(
        source_model,
        weight_quantizer=arg(config["weight"], config.get("weight_bits", 4), "weight"),
        activation_quantizer=arg(act, config.get("activation_bits", 4), "activation") if act else "U3",
        quantize_activations=act is not None,
        calibration_data=None if random_init else calibration,
        init="random" if random_init else "float",
    )
    targets = {}
    weight_kb, act_kb, kind = config.get("_targets") or (None, None, None)
    if weight_kb is not None or act_kb is not None:
        gains = {k: config[k] for k in ("kp", "ki") if config.get(k) is not None}
        qmodel = tfdq.constrain(
            qmodel,
            weight_kb=weight_kb,
            activation_kb=act_kb,
            activation=kind or "max",
            lam=config.get("lam"),
            **gains,
        )
        targets = {"weight_kb": weight_kb, "activation_kb": act_kb, "activation": kind}
    return qmodel, targets


def _finite_history(history):
    losses = history.get("loss", [])
    return bool(losses) and all(math.isfinite(v) for v in losses)


def quantized_run(
    config,
    seed,
    data,
    float_model=None,
    counts=None,
    epochs=4,
    finish_epochs=2,
    lr=QUANT_LR,
    finish_lr=FINISH_LR,
    optimizer="adam",
    validation=False,
    verbose=0,
    reseed=True,
    keep_model=False,
    model="small_cnn",
):
    """Quantize, train and evaluate one configuration; returns a record dict
    (with ``keep_model``, the trained model too, under ``"model"``).

    ``init="float"`` starts from ``float_model`` (calibrated activations);
    ``"random"`` from the untrained ``model`` of ``seed``. Training: ``epochs``
    epochs (``optimizer``, ``lr``, batch 64), then ``finish_epochs`` with the
    quantizers frozen and the weights fine-tuned at ``finish_lr``: with a
    budget, one ``fit`` whose final phase
    (:class:`tfdq.callbacks.FinishInsideBudget`) first fixes the allocation
    inside the budget; without, ``freeze_quantizers`` and a second ``fit``
    (Adam ``finish_lr``). A config's ``lam`` selects the paper's fixed
    penalty; without it the multipliers are learned.
    Never raises for a failed configuration: the record then has ``failed``
    (the exception) and no error figure. A run whose training loss became
    NaN or Inf is stopped there and marked ``diverged``.
    """
    import keras  # noqa: PLC0415

    import tfdq  # noqa: PLC0415

    counts = counts or feature_counts(model)
    (xt, yt), test = data
    start = time.time()
    record = {"name": config["name"], "seed": seed, "config": _public(config)}
    config = dict(config)
    config["_targets"] = budget_targets(config, counts)
    try:
        if reseed:
            keras.utils.set_random_seed(seed)
        if config.get("init", "float") == "random":
            source = random_model(seed, model)
        else:
            if float_model is None:
                raise ValueError("init='float' needs the float model")
            source = float_model
        qmodel, targets = build_quantized(config, source, xt[:512])
        if targets:
            record["targets"] = targets
            budget = qmodel.memory_budget
            record["multipliers"] = budget.multipliers
            if budget.multipliers == "fixed":
                record["lambda"] = {"weight": budget.weight_lambda, "activation": budget.activation_lambda}
        record["initial_params"] = {q.name: q.describe() for q in qmodel.quantizers()}
        qmodel.compile(make_optimizer(optimizer, lr), _loss(), metrics=["accuracy"])
        fit_kwargs = {
            "batch_size": BATCH,
            "verbose": verbose,
            "callbacks": [keras.callbacks.TerminateOnNaN()],
        }
        if validation:
            fit_kwargs["validation_data"] = test
        if targets:
            # one fit: `epochs` with the quantizers learning under the budget, then
            # the final phase (allocation fixed inside the budget, weights adapting
            # at finish_lr), scheduled by tfdq's callback
            total = epochs + finish_epochs
            fit_kwargs["callbacks"] = fit_kwargs["callbacks"] + [
                tfdq.callbacks.FinishInsideBudget(epochs=finish_epochs, verbose=verbose),
                keras.callbacks.LearningRateScheduler(lambda e, cur: finish_lr if e >= epochs else cur),
            ]
            hist = qmodel.fit(xt, yt, epochs=total, **fit_kwargs).history
            record["history"] = {k: [float(v) for v in vals] for k, vals in hist.items()}
            record["enforce_steps"] = fit_kwargs["callbacks"][1].changes
            diverged = not _finite_history(hist)
        else:
            hist = qmodel.fit(xt, yt, epochs=epochs, **fit_kwargs).history
            record["history"] = {k: [float(v) for v in vals] for k, vals in hist.items()}
            diverged = not _finite_history(hist)
            if finish_epochs and not diverged:
                tfdq.constraints.freeze_quantizers(qmodel)
                qmodel.compile(keras.optimizers.Adam(finish_lr), _loss(), metrics=["accuracy"])
                fin = qmodel.fit(xt, yt, epochs=finish_epochs, **fit_kwargs).history
                record["finish_history"] = {k: [float(v) for v in vals] for k, vals in fin.items()}
                diverged = not _finite_history(fin)
        record["diverged"] = diverged
        record["error"] = error(qmodel, test)
        record["final_params"] = {q.name: q.describe() for q in qmodel.quantizers()}
        record.update(sizes(qmodel, counts))
        if targets:
            record["constraints_met"] = qmodel.memory_budget.satisfied(qmodel)
        if keep_model:
            record["model"] = qmodel
    except Exception as exc:  # recorded, not hidden: the benchmark reports it
        record["failed"] = f"{type(exc).__name__}: {exc}"
    record["seconds"] = time.time() - start
    return record


class SeedStart:
    """One seed's float model and the quantized runs that start from it.

    ``float_epochs=None`` trains no float model (random-init runs only).
    ``float_record`` is ``{"seed", "error", "seconds"}`` of the float model
    (None without one); :meth:`run` is :func:`quantized_run` from it.
    ``architecture``: :func:`build_model`'s ``model`` (``data`` must be its
    input size: :func:`load_data` with the same ``model``).
    """

    def __init__(self, seed, data, counts, float_epochs=8, verbose=0, reseed=True, architecture="small_cnn"):
        self.seed, self.data, self.counts, self.verbose = seed, data, counts, verbose
        self.architecture = architecture
        self.model = self.float_record = None
        if float_epochs is not None:
            self.model, ferr, fsec = train_float(
                seed, data, float_epochs, verbose=verbose, reseed=reseed, model=architecture
            )
            self.float_record = {"seed": seed, "error": ferr, "seconds": fsec}

    def run(self, config, epochs, finish_epochs, **kwargs):
        """:func:`quantized_run` of ``config`` from this seed's float model."""
        kwargs.setdefault("verbose", self.verbose)
        kwargs.setdefault("model", self.architecture)
        return quantized_run(
            config,
            self.seed,
            self.data,
            float_model=self.model,
            counts=self.counts,
            epochs=epochs,
            finish_epochs=finish_epochs,
            **kwargs,
        )


def run_configs(
    name, configs, seeds, data, counts, float_epochs, run_one, write, verbose=0, model="small_cnn"
):
    """Every config on every seed; returns ``(float records, run records)``.

    Per seed a :class:`SeedStart` of ``model`` (``float_epochs=None``: no float model),
    then ``run_one(seed_start, config) -> record`` for each config, a
    progress line and ``write(floats, records, complete=False)`` after each.
    """
    floats, records = [], []
    print(f"{name}: {len(configs)} configurations x {len(seeds)} seeds", flush=True)
    for seed in seeds:
        seed_start = SeedStart(seed, data, counts, float_epochs, verbose=verbose, architecture=model)
        if seed_start.float_record is not None:
            floats.append(seed_start.float_record)
            print(describe_float(seed_start.float_record), flush=True)
        for config in configs:
            records.append(run_one(seed_start, config))
            print(f"[{len(records)}/{len(configs) * len(seeds)}] " + describe(records[-1]), flush=True)
            write(floats, records, complete=False)
    return floats, records


def _public(config):
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not k.startswith("_")}


def describe_float(record):
    """One progress line for a :attr:`SeedStart.float_record`."""
    return f"float seed {record['seed']}: error {100 * record['error']:.2f}% ({record['seconds']:.0f} s)"


def describe(record):
    """One progress line for a record."""
    if "failed" in record:
        return (
            f"{record['name']} seed {record['seed']}: FAILED {record['failed']} ({record['seconds']:.0f} s)"
        )
    text = (
        f"{record['name']} seed {record['seed']}: error {100 * record['error']:.2f}%  "
        f"weights {record['weight_kb']:.2f} kB ({record['mean_weight_bits']:.2f} bits)  "
        f"act sum/max {record['activation_kb_sum']:.2f}/{record['activation_kb_max']:.2f} kB"
    )
    if record.get("targets"):
        text += f"  met {record['constraints_met']}"
    if record.get("diverged"):
        text += "  DIVERGED"
    return text + f"  ({record['seconds']:.0f} s)"


# -- figures ---------------------------------------------------------------------


def percent_range(e):
    """An :func:`aggregate` of errors in percent: ``(mean, yerr)``, ``yerr`` the
    min-max range as matplotlib's ``errorbar`` takes it."""
    m = 100 * e["mean"]
    return m, [[m - 100 * e["min"]], [100 * e["max"] - m]]


def note_above(ax, text, x, e, offset, fontsize):
    """``text`` centred ``offset`` points above the top (max) of an error aggregate ``e`` at ``x``."""
    ax.annotate(
        text,
        (x, 100 * e["max"]),
        textcoords="offset points",
        xytext=(0, offset),
        ha="center",
        fontsize=fontsize,
    )


def float_line(ax, report):
    """The float model's mean error (%) as a dashed line, where the report has one."""
    ferr = report["float"]["error"]
    if ferr:
        ax.axhline(100 * ferr["mean"], color="gray", ls="--", lw=1, label="float")


# -- statistics ----------------------------------------------------------------


def aggregate(values):
    """Mean, std (population), min, max and n of a list of numbers (None if empty)."""
    values = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    arr = np.asarray(values)
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std()),
        "min": float(arr.min()),
        "max": float(arr.max()),
        "n": len(values),
    }


def summarize_configs(configs, records):
    """``{name: summary over seeds and the config}`` of every config with records."""
    summary = {}
    for c in configs:
        rs = [r for r in records if r["name"] == c["name"]]
        if rs:
            summary[c["name"]] = dict(summarize_records(rs), config=c)
    return summary


def summarize_records(records):
    """Across seeds of one configuration: error, sizes, bits, divergences."""
    ok = [r for r in records if "failed" not in r]
    out = {
        "runs": len(records),
        "failed": [r["failed"] for r in records if "failed" in r],
        "diverged": sum(bool(r.get("diverged")) for r in ok),
    }
    for key in ("error", "weight_kb", "mean_weight_bits", "activation_kb_sum", "activation_kb_max"):
        out[key] = aggregate([r[key] for r in ok])
    if ok and ok[0].get("targets"):
        out["all_constraints_met"] = all(all(r["constraints_met"].values()) for r in ok)
        out["targets"] = ok[0]["targets"]
    return out
