"""Outputs for people: the per-layer bitwidth chart and the final summary."""

import json
import os

import tfdq


def layer_bits(model):
    """``{"bits/<layer>": b}`` for every quantizer of a tfdq model ({} for a float one)."""
    from tfdq import memory  # noqa: PLC0415

    if not hasattr(model, "quantizers"):
        return {}
    return {f"bits/{e.name}": float(e.bits()) for e in memory.size_entries(model) if e.quantizer is not None}


def size_report(model):
    """Per-layer bits and the totals of a tfdq model, as plain data."""
    rows = tfdq.summary(model, print_fn=None)
    total = rows[-1]
    layers = rows[:-1]
    acts = [r for r in layers if r["kind"] == "activation" and not r["input"]]
    act_count = sum(r["count"] for r in acts)
    return {
        "layers": layers,
        "weight_kb": total["weight_kb"],
        "activation_kb_sum": total["activation_kb_sum"],
        "activation_kb_max": total["activation_kb_max"],
        "mean_weight_bits": total["mean_weight_bits"],
        "mean_activation_bits": (sum(r["count"] * r["bits"] for r in acts) / act_count)
        if act_count
        else None,
        "table": _table(rows),
    }


def _table(rows):
    from tfdq.summary import format_table  # noqa: PLC0415

    return format_table(rows)


def bitwidth_chart(model, path, title=None):
    """The learned bits and sizes per layer with the budgets (:func:`tfdq.plot_bitwidths`), saved as PNG."""
    return tfdq.plot_bitwidths(model, path, title=title)


def _pct(value):
    return "-" if value is None else f"{100.0 * value:.2f}%"


def _kb(value, target=None):
    if value is None:
        return "-"
    text = f"{value:.2f} kB"
    if target:
        text += f" (target {target:g})"
    return text


def _both_numbers(s, stage):
    """The paper's rule and the final model, labelled (when both are known)."""
    best, final = s.get(f"{stage}_accuracy_best"), s.get(f"{stage}_accuracy_final")
    if best is None and final is None:
        return []
    where = f"epoch {s.get(f'{stage}_best_epoch')}"
    if s.get(f"{stage}_best_step"):
        where += f", step {s[f'{stage}_best_step']}"
    feasible = s.get(f"{stage}_final_feasible")
    final_label = (
        "final model (last epoch" + ("" if feasible in (None, True) else ", constraints NOT met") + ")"
    )
    best_label = f"paper's rule (best held-out, {where if best is not None else 'none feasible'})"
    return [f"      {best_label:<48} {_pct(best)}", f"      {final_label:<48} {_pct(final)}"]


def format_summary(summary):
    """The one-screen summary printed at the end of a run."""
    s = summary
    lines = [
        "=" * 72,
        f"tfdq training summary: {s['dataset']} / {s['model']}    model_dir: {s['model_dir']}",
        "-" * 72,
        f"  accuracy (held-out, {s.get('val_examples', '?')} examples; selection: {s.get('selection', 'paper')})",
        f"    float                     {_pct(s.get('float_accuracy'))}",
    ]
    lines += _both_numbers(s, "float")
    lines += [
        f"    quantized (Keras)         {_pct(s.get('quant_accuracy'))}"
        + (f"   [{s['quant_checkpoint']}]" if s.get("quant_checkpoint") else ""),
    ]
    lines += _both_numbers(s, "quant")
    lines += [
        f"    TFLite                    {_pct(s.get('tflite_accuracy'))}"
        + (f"   {s['export_note']}" if s.get("export_note") else ""),
    ]
    if s.get("weight_kb") is not None:
        lines += [
            "  memory",
            f"    weights                   {_kb(s['weight_kb'], s.get('target_weight_kb'))}"
            f"   (float: {_kb(s.get('float_weight_kb'))})",
            f"    activations, sum (8b)     {_kb(s['activation_kb_sum'], s.get('target_activation_kb') if s.get('activation_constraint') == 'sum' else None)}",
            f"    activations, max (8c)     {_kb(s['activation_kb_max'], s.get('target_activation_kb') if s.get('activation_constraint') == 'max' else None)}",
            f"    average bits              weights {s['mean_weight_bits']:.2f}"
            + (
                f", activations {s['mean_activation_bits']:.2f}"
                if s.get("mean_activation_bits") is not None
                else ""
            ),
        ]
        if s.get("tflite_kb") is not None:
            lines.append(f"    .tflite file              {_kb(s['tflite_kb'])}")
    met = s.get("constraints_met")
    if met is not None:
        if not met:
            lines.append("  constraints                 none set")
        else:
            text = ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in met.items())
            lines.append(f"  constraints                 {text}")
    if s.get("times"):
        lines.append(
            "  time                        " + ", ".join(f"{k} {v:.0f} s" for k, v in s["times"].items())
        )
    outputs = [k for k in ("bitwidth_chart", "tflite", "export_report") if s.get(k)]
    for k in outputs:
        lines.append(f"  {k:<27} {s[k]}")
    lines.append("=" * 72)
    return "\n".join(lines)


def write_summary(model_dir, summary):
    from tfdq.train.checkpoint import atomic_write_json, atomic_write_text  # noqa: PLC0415

    atomic_write_json(os.path.join(model_dir, "summary.json"), summary)
    text = format_summary(summary)
    atomic_write_text(os.path.join(model_dir, "summary.txt"), text + "\n")
    return text


def load_json(path, default=None):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)
