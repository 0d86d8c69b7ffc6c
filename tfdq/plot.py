"""Plots for people: the learned bitwidths and sizes of a tfdq model.

matplotlib is optional (it comes with the ``train`` extra); it is imported
only when a plot is drawn, always with the file-only ``Agg`` backend.
"""

from __future__ import annotations

import os


def pyplot():
    """``matplotlib.pyplot`` on the file-only ``Agg`` backend (no screen needed).

    Raises an ImportError that names the extra to install when matplotlib is
    missing.
    """
    try:
        import matplotlib  # noqa: PLC0415 (optional, heavy)
    except ImportError as e:
        raise ImportError(
            "Plotting needs matplotlib: pip install 'tfdq[train]' (or pip install matplotlib)."
        ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def save_figure(fig, path, dpi=120):
    """Write ``fig`` to ``path`` atomically and close it.

    The image is rendered in memory and written through
    :func:`tfdq.callbacks.atomic_write_bytes` (hidden ``.tmp-*`` file,
    ``fsync``, rename), so a kill never leaves a partial image in place of a
    good one. The format follows the suffix (PNG without one).
    """
    import io  # noqa: PLC0415

    from tfdq.callbacks import atomic_write_bytes  # noqa: PLC0415

    plt = pyplot()
    path = os.fspath(path)
    fmt = os.path.splitext(path)[1][1:].lower() or "png"
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, dpi=dpi, format=fmt)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _budget_targets(model):
    """``{"weight": kB, "sum" | "max": kB}`` of the model's memory budget ({} without one)."""
    budget = getattr(model, "memory_budget", None)
    if budget is None:
        return {}
    targets = {}
    if getattr(budget, "weight_kb", None) is not None:
        targets["weight"] = float(budget.weight_kb)
    if getattr(budget, "activation_kb", None) is not None:
        targets[budget.activation] = float(budget.activation_kb)
    return targets


def plot_bitwidths(model, path: str | os.PathLike, title: str | None = None) -> str:
    """Draw the learned bits and sizes of every quantized tensor, like the paper's Fig. 5.

    Four panels, layers in network order: weight bits per layer; weight kB
    per layer with the running total, and the weight budget (8a) as a line
    against that total; activation bits per quantized feature map; activation
    kB per map, with the largest-map budget (8c) as a line against each bar
    or the total budget (8b) as a line against the running total. A layer
    whose bar reaches a budget line is what keeps that budget tight; a small
    layer with many bits costs little. The numbers are those of
    :func:`tfdq.summary` (float tensors count at 32 bits; the input image's
    quantizer is drawn but, as in the budgets, not added to the totals).

    Args:
        model: a model returned by :func:`tfdq.quantize_model` (with or
            without :func:`tfdq.constrain`).
        path: where to write the image (PNG unless the suffix says otherwise).
        title: figure title (default: the model's name).

    Returns:
        ``path``.

    Example::

        qmodel = tfdq.constrain(tfdq.quantize_model(model), weight_kb=8.0)
        ...  # fit
        tfdq.plot_bitwidths(qmodel, "bits.png")
    """
    import numpy as np  # noqa: PLC0415

    from tfdq.summary import summary  # noqa: PLC0415

    plt = pyplot()
    rows = summary(model, print_fn=None)
    total = rows[-1]
    rows = rows[:-1]
    weights = [r for r in rows if r["kind"] == "weight"]
    acts = [r for r in rows if r["kind"] == "activation"]
    if not weights and not acts:
        raise ValueError(
            "plot_bitwidths needs a quantized model: this one has no weight or activation quantizers "
            "(pass the model returned by tfdq.quantize_model)."
        )
    targets = _budget_targets(model)
    n = max(len(weights), len(acts), 1)
    fig, axes = plt.subplots(4, 1, figsize=(max(7.0, 0.38 * n + 2.5), 11.0))

    def names(group):
        return [r["name"] + (" (in)" if r["input"] else "") for r in group]

    def bits_panel(ax, group, color, label):
        x = np.arange(len(group))
        ax.bar(x, [r["bits"] for r in group], color=color)
        for i, r in enumerate(group):
            ax.text(i, r["bits"] + 0.1, f"{r['bits']:g}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x)
        ax.set_xticklabels(names(group), rotation=90, fontsize=7)
        ax.set_ylabel(label)
        ax.set_ylim(0, max([8.5] + [r["bits"] + 1 for r in group]))
        ax.grid(axis="y", alpha=0.3)

    def kb_panel(ax, group, color, label, sum_target=None, bar_target=None, sum_label=""):
        x = np.arange(len(group))
        kb = np.array([r["kb"] for r in group], dtype=float)
        ax.bar(x, kb, color=color, alpha=0.8, label="per layer")
        counted = np.array([0.0 if r["input"] else r["kb"] for r in group])
        running = np.cumsum(counted)
        ax2 = ax.twinx()
        ax2.plot(x, running, color="black", marker=".", lw=1, label="running total")
        ax2.set_ylabel("running total (kB)", fontsize=8)
        if sum_target is not None:
            ax2.axhline(sum_target, color="tab:red", ls="--", lw=1.2, label=f"{sum_label} {sum_target:g} kB")
            ax2.set_ylim(0, max(sum_target, running[-1] if len(running) else 0) * 1.1)
        if bar_target is not None:
            ax.axhline(bar_target, color="tab:red", ls="--", lw=1.2, label=f"(8c) budget {bar_target:g} kB")
        ax.set_xticks(x)
        ax.set_xticklabels(names(group), rotation=90, fontsize=7)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        handles = ax.get_legend_handles_labels()
        handles2 = ax2.get_legend_handles_labels()
        ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], fontsize=7, loc="upper left")

    bits_panel(axes[0], weights, "tab:blue", "weight bits")
    kb_panel(
        axes[1],
        weights,
        "tab:blue",
        "weight kB",
        sum_target=targets.get("weight"),
        sum_label="(8a) budget",
    )
    bits_panel(axes[2], acts, "tab:orange", "activation bits")
    kb_panel(
        axes[3],
        acts,
        "tab:orange",
        "activation kB",
        sum_target=targets.get("sum"),
        bar_target=targets.get("max"),
        sum_label="(8b) budget",
    )
    head = title or f"Learned bitwidths per layer: {model.name}"
    axes[0].set_title(
        f"{head}\nweights {total['weight_kb']:.2f} kB (mean {total['mean_weight_bits']:.2f} bits), "
        f"activations sum {total['activation_kb_sum']:.2f} kB, max {total['activation_kb_max']:.2f} kB",
        fontsize=9,
    )
    fig.tight_layout()
    return save_figure(fig, path)
