"""The registry of layers: one table that cloning, memory, export and the README read."""

import os

import keras
import pytest

from tfdq import layers as qlayers
from tfdq import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_table_is_generated_from_the_registry():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    start = text.index(registry.README_BEGIN) + len(registry.README_BEGIN)
    end = text.index(registry.README_END)
    assert text[start:end] == registry.readme_tables(), "run: python -m tfdq.registry README.md"


def test_lookup_takes_the_most_specific_class_and_every_class_once():
    assert registry.lookup(qlayers.QConv2D(2, 1)).memory == "quantized"
    assert registry.lookup(keras.layers.Conv2D(2, 1)).clone == "quantize"
    assert registry.lookup(keras.layers.GroupNormalization()) is None
    seen = {}
    for entry in registry.ENTRIES:
        for cls in entry.classes:
            assert cls not in seen, f"{cls.__name__} in two entries: {seen[cls]} and {entry.name}"
            seen[cls] = entry.name


def test_subclass_of_a_quantizable_layer_is_not_quantized():
    class MyDense(keras.layers.Dense):
        pass

    layer = MyDense(3)
    assert not registry.is_quantizable(layer) and registry.is_quantizable(keras.layers.Dense(3))


@pytest.mark.parametrize("entry", registry.ENTRIES, ids=lambda e: e.name[:30])
def test_every_entry_is_complete(entry):
    assert entry.clone in ("quantize", "split", "keep", "nested")
    assert entry.memory in ("quantized", "float", "folded", "activation", "none")
    assert entry.export in (registry.EXACT, registry.CALIBRATED, registry.FOLDED, registry.REFUSED)
    if entry.export == registry.REFUSED:
        assert entry.fix, "a refused entry says what to do instead"
    else:
        assert entry.rule, "an exported entry names its export rule"
    if entry.clone in ("quantize", "split"):
        assert issubclass(entry.quantized, qlayers.QuantizedWeightsMixin)


def _leaky_model():
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="c1")(inp)
    x = keras.layers.ELU(name="leaky")(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inp, keras.layers.Dense(3, name="head")(x))


def test_unexportable_layer_is_reported_before_training_and_strict_refuses():
    import tfdq  # noqa: PLC0415

    model = _leaky_model()
    with pytest.warns(UserWarning, match=r"(?s)cannot take.*ELU.*\(leaky\).*Fix: "):
        _, report = tfdq.quantize_model(model, return_report=True)
    assert [(p["layer"], p["class"]) for p in report["export_problems"]] == [("leaky", "ELU")]
    with pytest.raises(ValueError, match=r"(?s)ELU.*leaky.*target=None"):
        tfdq.quantize_model(model, strict=True)
    import warnings  # noqa: PLC0415

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, report = tfdq.quantize_model(model, strict=True, target=None, return_report=True)
    assert report["export_problems"] == []


def test_early_check_agrees_with_the_exporter():
    import numpy as np  # noqa: PLC0415

    import tfdq  # noqa: PLC0415

    with pytest.warns(UserWarning):
        qmodel = tfdq.quantize_model(_leaky_model())
    with pytest.raises(tfdq.export.ExportError, match="leaky"):
        tfdq.export.to_tflite(qmodel, np.zeros((4, 8, 8, 3), "float32"))
    # an exportable model: no problems, no warning
    _, report = tfdq.quantize_model(tfdq.models.small_cnn(), return_report=True)
    assert report["export_problems"] == []


def test_logistic_activations_are_registry_fields():
    """quantize_model's sigmoid / swish handling reads these fields (no name lists of its own)."""
    for act, split, int8, form in [
        ("sigmoid", True, "int8_sigmoid", "logistic"),
        ("swish", True, "int8_swish", "logistic_mul"),
        ("silu", True, "int8_swish", "logistic_mul"),
        ("hard_swish", False, None, None),
        ("relu", False, None, None),
        ("linear", False, None, None),
    ]:
        for op in (keras.layers.Dense(4, activation=act), keras.layers.Activation(act)):
            assert registry.splits_fused_activation(op) is split, act
            assert registry.int8_activation_name(op) == int8, act
            assert registry.logistic_form(op) == form, act
    # the int8 functions themselves resolve to their own entries
    assert registry.logistic_form(keras.layers.Activation(qlayers.int8_swish)) == "logistic_mul"
    assert registry.int8_activation_name(keras.layers.Activation(qlayers.int8_sigmoid)) == "int8_sigmoid"
