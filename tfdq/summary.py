"""``tfdq.summary``: per-layer bitwidths, quantizer parameters and sizes."""

from __future__ import annotations

from tfdq import memory


def _row(entry):
    q = entry.quantizer
    row = {
        "name": entry.name,
        "kind": entry.kind,
        "count": entry.count,
        "bits": float(entry.bits()),
        "kb": float(entry.kb()),
        "input": entry.is_input,
        "quantizer": None if q is None else type(q).__name__,
        "signed": None if q is None else q.signed,
    }
    if q is not None:
        params = q.describe()
        for key in ("d", "q_min", "q_max"):
            if key in params:
                row[key] = params[key]
    return row


def summary(model, print_fn=print) -> list[dict]:
    """Print a table of the model's quantized tensors and return it as data.

    One row per weight tensor (parameter count, bitwidth b, step d or q_min,
    q_max, size in kB) and per activation quantizer (elements per sample,
    b, d, q_max, kB), then the totals: weight kB (8a), activation kB sum
    (8b) and max (8c), the latter two without the input image quantizer.
    Float tensors count at 32 bits. Pass ``print_fn=None`` to only get the
    rows (a list of dicts; the last one, ``kind == "total"``, has the totals).
    """
    sizes = memory.Sizes(model)
    entries = sizes.entries
    rows = [_row(e) for e in entries]
    weights = [r for r in rows if r["kind"] == "weight"]
    n_weights = sum(r["count"] for r in weights)
    total = {
        "kind": "total",
        "weight_count": n_weights,
        "weight_kb": float(sizes.weight_kb()),
        "activation_kb_sum": float(sizes.activation_kb("sum")),
        "activation_kb_max": float(sizes.activation_kb("max")),
        "mean_weight_bits": float(sizes.mean_weight_bits()),
    }
    rows.append(total)
    if print_fn is not None:
        print_fn(format_table(rows))
    return rows


def _fmt(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def format_table(rows):
    """Render :func:`summary` rows as a fixed-width text table."""
    header = ("layer", "kind", "quantizer", "count", "bits", "d/q_min", "q_max", "kB")
    lines = []
    for r in rows:
        if r["kind"] == "total":
            continue
        step = r.get("d", r.get("q_min"))
        kind = r["kind"] + (" (input)" if r["input"] else "")
        q = r["quantizer"] or "float"
        if r["signed"] is False:
            q += " u"
        lines.append((r["name"], kind, q, r["count"], r["bits"], step, r.get("q_max"), r["kb"]))
    table = [header] + [tuple(_fmt(v) for v in line) for line in lines]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in table]
    out.insert(1, "-" * len(out[0]))
    t = rows[-1]
    out.append("-" * len(out[0]))
    out.append(
        f"weights: {t['weight_count']} params, {t['weight_kb']:.2f} kB, "
        f"mean {t['mean_weight_bits']:.2f} bits | activations: sum "
        f"{t['activation_kb_sum']:.2f} kB, max {t['activation_kb_max']:.2f} kB"
    )
    return "\n".join(out)
