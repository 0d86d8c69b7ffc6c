"""What the benchmark scripts share: results (JSON with provenance, PNG,
text tables) and the command-line plumbing.

* :func:`write_result`, :func:`save_report`, :func:`write_run`: one JSON per
  experiment with the machine, versions, date and the command that
  reproduces it; :func:`load_result` reads one back (``--replot``);
* :func:`result_name`: ``<name>`` or, for a smoke run, ``<name>_quick``;
* :func:`pyplot`, :func:`save_figure`: matplotlib on the Agg backend (set up
  once, in ``tfdq.plot``), a figure laid out, written and closed;
* :func:`format_table`: a text table of fixed-width columns;
* :data:`RESULTS_DIR`, :data:`THREADS_HELP`: the default ``--out_dir`` and
  the ``--threads`` help that every script shares (each script defines its
  own flags, so that ``--help`` lists them); :func:`set_threads`;
  :func:`flag_kwargs`: a ``run()`` function's keyword arguments from the
  flags of the same names, with the ``--quick`` settings over them;
  :func:`script_main`: the whole ``main`` of such a script, ``--replot``
  included; :func:`given_or_not_quick`.
"""

import json
import os
import platform
import time

from absl import flags

FLAGS = flags.FLAGS
RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")  # the default --out_dir
THREADS_HELP = "TensorFlow intra- and inter-op threads (0: TensorFlow's default)."  # --threads


# -- results ------------------------------------------------------------------------


def write_result(out_dir, name, experiment, command, payload):
    """Write ``payload`` plus provenance to ``<out_dir>/<name>.json``; return the path."""
    import tensorflow as tf  # noqa: PLC0415

    out = {
        "experiment": experiment,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared)",
        "tensorflow": tf.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
    }
    out.update(payload)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")
    return path


def save_report(out_dir, name, experiment, command, payload, complete=True, draw=None):
    """Write ``payload``: the final result with provenance, or, while runs are
    still missing, a partial ``<name>.json`` marked as such. Returns the
    payload as JSON would read it back (the report); once complete, ``draw``
    (if given) draws the report's figures: ``draw(report, out_dir)``."""
    if complete:
        write_result(out_dir, name, experiment, command, payload)
    else:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(dict(payload, experiment="partial: run in progress"), f, indent=1)
    report = json.loads(json.dumps(payload))
    if complete and draw is not None:
        draw(report, out_dir)
    return report


def write_run(out_dir, name, experiment, payload, quick=False):
    """:func:`write_result` of the script ``benchmarks.<name>``: to
    ``<name>.json``, or ``<name>_quick.json`` for its ``--quick`` run, with
    the command ``python -m benchmarks.<name>`` (``--quick``)."""
    command = f"python -m benchmarks.{name}" + (" --quick" if quick else "")
    return write_result(out_dir, result_name(name, quick), experiment, command, payload)


def load_result(out_dir, name):
    """The JSON written to ``<out_dir>/<name>.json`` (for ``--replot``)."""
    path = os.path.join(out_dir, f"{name}.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: run the benchmark first, or point --out_dir at its results"
        )
    with open(path) as f:
        return json.load(f)


def result_name(name, quick):
    """File stem of a result: ``name``, or ``name_quick`` for a smoke run."""
    return f"{name}_quick" if quick else name


# -- figures and tables -------------------------------------------------------------


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (``tfdq.plot`` sets it up)."""
    from tfdq.plot import pyplot as _pyplot  # noqa: PLC0415 (matplotlib only when a figure is drawn)

    return _pyplot()


def save_figure(fig, path, dpi=120, rect=None):
    """Lay out ``fig`` (``tight_layout``, within ``rect`` if given), write it
    to ``path`` (``tfdq.plot.save_figure``: folder created, written
    atomically) and close it; return ``path``."""
    from tfdq.plot import save_figure as _save  # noqa: PLC0415

    if rect is None:
        fig.tight_layout()
    else:
        fig.tight_layout(rect=rect)
    return _save(fig, path, dpi=dpi)


def format_table(columns, rows):
    """A text table: a header, a rule, then one line per row.

    ``columns``: ``(title, width)`` pairs; the first column is left-aligned,
    the others right-aligned. A row is a sequence of cell strings, or a
    string printed as it is (a note across the table).
    """

    def line(cells):
        return " ".join(
            f"{c:<{w}s}" if i == 0 else f"{c:>{w}s}" for i, (c, (_, w)) in enumerate(zip(cells, columns))
        )

    head = line([title for title, _ in columns])
    return "\n".join([head, "-" * len(head)] + [r if isinstance(r, str) else line(r) for r in rows])


# -- command line -------------------------------------------------------------------


def set_threads(threads):
    """Use ``threads`` TensorFlow threads (intra- and inter-op; ``--threads``);
    0 keeps TF's default. Must run before the first TensorFlow op."""
    if not threads:
        return
    import tensorflow as tf  # noqa: PLC0415

    tf.config.threading.set_intra_op_parallelism_threads(int(threads))
    tf.config.threading.set_inter_op_parallelism_threads(int(threads))


def flag_kwargs(names, quick=None):
    """``{name: --name}`` for ``names``; with ``--quick``, ``quick``'s settings replace them."""
    kwargs = {name: FLAGS[name].value for name in names}
    if quick is not None and FLAGS.quick:
        kwargs.update(quick)
    return kwargs


def script_main(run, run_flags, quick=None, replot=None):
    """The absl ``main`` of a script whose work is ``run(**kwargs)``.

    The keyword arguments come from the flags named ``run_flags``, with
    ``--quick`` the ``quick`` settings over them (:func:`flag_kwargs`); where
    the script defines ``--threads``, TensorFlow's thread pools are set first.
    ``replot``: ``(name, redraw)``; with ``--replot`` nothing runs:
    ``redraw(report, out_dir)`` gets the report in ``<out_dir>/<name>.json``.
    """

    def main(argv):
        del argv
        if replot is not None and FLAGS.replot:
            name, redraw = replot
            redraw(load_result(FLAGS.out_dir, name), FLAGS.out_dir)
            return
        if "threads" in FLAGS:
            set_threads(FLAGS.threads)
        run(**flag_kwargs(run_flags, quick))

    return main


def given_or_not_quick(name):
    """A boolean flag that a smoke run leaves off unless it is given explicitly
    (e.g. ``--tfmot``, which needs another environment)."""
    return FLAGS[name].value and (not FLAGS.quick or FLAGS[name].present)
